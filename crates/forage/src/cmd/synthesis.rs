//! `forage serve` and `forage synthesize`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use forage_cloudlet::Cloudlet;
use forage_datadir::DataDir;

pub async fn serve(data: &DataDir, listen: SocketAddr, service_addr: Option<Ipv4Addr>, name: String) -> anyhow::Result<()> {
    let service_addr = match (service_addr, listen.ip()) {
        (Some(a), _) => a,
        (None, IpAddr::V4(a)) if !a.is_unspecified() => a,
        (None, _) => bail!("listening on {listen}: say which address services are forwarded on with --service-addr"),
    };
    let cloudlet = Arc::new(Cloudlet { name, data: data.clone(), accel: super::accel(), service_addr });
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let bases: Vec<String> = forage_synth::BaseVm::list(data).into_iter().filter_map(|(n, b)| b.ok().map(|b| format!("{n} ({})", forage_synth::package::short(b.digest())))).collect();
    eprintln!("cloudlet {} listening on {listen}; bases: {}", cloudlet.name, if bases.is_empty() { "none (forage base create ...)".into() } else { bases.join(", ") });
    tokio::select! {
        r = forage_cloudlet::serve(listener, cloudlet) => r.context("accepting devices")?,
        _ = tokio::signal::ctrl_c() => eprintln!("cloudlet stopping"),
    }
    Ok(())
}

pub async fn synthesize(file: &Path, cloudlet: SocketAddr, hold: bool, json: bool) -> anyhow::Result<()> {
    let (report, session) = forage_client::synthesize(file, cloudlet, "forage-cli").await?;
    if json {
        super::print_json(&report);
    } else {
        print_report(&report);
    }
    if hold {
        eprintln!("instance held at {}; Ctrl-C releases it", report.endpoint);
        tokio::signal::ctrl_c().await?;
    }
    session.close().await;
    Ok(())
}

pub fn print_report(r: &forage_client::SynthesisReport) {
    println!("synthesized on cloudlet {} ({} KiB overlay, pipelined):", r.cloudlet, r.overlay_bytes >> 10);
    println!(
        "  transfer {:.2} s | apply (cloudlet) {:.2} s | resume {:.2} s | ready {:.2} s | first response {:.2} s",
        r.transfer_s, r.apply_s, r.resume_s, r.ready_s, r.first_response_s
    );
    println!("  service at {} answered: {}", r.endpoint, r.answer);
}
