//! QR codes of pairing URIs, as SVG images (a phone's camera reads them off the screen).

/// `text` as a QR code: black modules on white with the standard quiet zone, at least
/// 256 px wide. Error correction M, enough for a screen.
pub fn svg(text: &str) -> Result<String, qrcode::types::QrError> {
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::M)?;
    Ok(code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(256, 256)
        .dark_color(qrcode::render::svg::Color("#000000"))
        .light_color(qrcode::render::svg::Color("#ffffff"))
        .quiet_zone(true)
        .build())
}
