//! The handoff trace as a picture (the VM handoff paper's Figure 17): input, output and
//! potential output throughput over time, with the adaptation's mode switches marked.

use std::path::Path;

use anyhow::Context;
use forage_handoff::pipeline::TraceRow;
use plotters::prelude::*;

/// Write `report`'s trace to `path` as SVG.
pub fn plot(path: &Path, report: &forage_api::HandoffReport, mbps: f64) -> anyhow::Result<()> {
    let rows = &report.trace;
    let mib = (1 << 20) as f64;
    let series = |f: fn(&TraceRow) -> f64| -> Vec<(f64, f64)> { rows.iter().map(|r| (r.t_s, f(r) / mib)).collect() };
    let (input, output, potential) =
        (series(|r| r.input_bps), series(|r| r.output_bps), series(|r| r.potential_output_bps));
    let t_max = input.last().map_or(1.0, |p| p.0).max(0.1);
    let y_max = input.iter().chain(&output).chain(&potential).map(|p| p.1).fold(0.1, f64::max) * 1.1;
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("VM handoff at {mbps} Mbit/s: {} sent in {:.1} s", human(report.bytes as f64), report.total_s);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart.configure_mesh().x_desc("time (s)").y_desc("MiB/s").draw()?;
    for (data, color, label) in [
        (&input, BLUE, "input (modified state taken in)"),
        (&output, RED, "output (acknowledged by the destination)"),
        (&potential, GREEN, "potential output (processing in the current mode)"),
    ] {
        chart
            .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    // Mode switches: a vertical line, with the new mode.
    for r in rows.iter().filter(|r| r.switched) {
        chart.draw_series(LineSeries::new([(r.t_s, 0.0), (r.t_s, y_max)], BLACK.mix(0.5).stroke_width(1)))?;
        chart.draw_series(std::iter::once(Text::new(
            r.mode.clone(),
            (r.t_s, y_max * 0.95),
            ("sans-serif", 13).into_font(),
        )))?;
    }
    if let Some(first) = rows.first() {
        chart.draw_series(std::iter::once(Text::new(
            format!("start: {}", first.mode),
            (0.0, y_max * 0.88),
            ("sans-serif", 13).into_font(),
        )))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn human(b: f64) -> String {
    format!("{:.1} MiB", b / (1 << 20) as f64)
}
