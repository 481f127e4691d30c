//! `forage bench provision`: the tactical-cloudlet paper's Table I (payload the device
//! sends, application-ready time) for the five provisioning mechanisms, measured here.
//!
//! Every mechanism serves the same program (the sample `hashsearch`, no data set) and is
//! asked the same first request; the device and the cloudlet are separate forage processes
//! in two network namespaces joined by a veth shaped with `tc tbf` (as `bench synthesis`):
//! - vm_synthesis: the app's overlay, early start (the cloudlet's launch cache is off);
//! - cached_vm: a copy-on-write instance of the app's service VM, by service id;
//! - cloudlet_push: the client app downloaded from the app store, then its service;
//! - on_demand: a script that installs the app from the cloudlet's server code
//!   components into a copy of the baseline VM and starts it;
//! - app_virtualization: the app linked dynamically, packed with its library closure.
//!
//! The client app of cloudlet push comes from the app store over the paired channel.
//!
//! `ready_s` is until the service's first answer reached the device (the application is
//! ready to use); `cloudlet_ready_s` until the cloudlet said the instance is up. For
//! cloudlet push both include the client app's download from the app store.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use forage_client::{ProvisionReport, SynthesisReport};
use forage_datadir::DataDir;
use forage_service::Repository;
use forage_synth::build::{BlobOrder, OverlayRequest};
use forage_synth::create::CreateOptions;
use serde::Serialize;

use crate::cli::BenchProvisionArgs;
use crate::common::{bench_base, forage_exe, print_json};
use crate::synthesis::{pair_bench_device, wait_for_line, Guard};

/// One mechanism (the median run): a row of the table and of `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ProvisionRow {
    pub mechanism: String,
    pub mbps: f64,
    pub runs: usize,
    /// Bytes the device sent to provision.
    pub payload_bytes: u64,
    /// Until the service's first answer reached the device.
    pub ready_s: f64,
    /// Until the cloudlet said the instance is up.
    pub cloudlet_ready_s: f64,
    pub answer: Option<String>,
}

const CLOUDLET_PORT: u16 = 7878;
const REQUEST: &str = "search bench 12";
const SERVICE: &str = "bench-hashsearch";
const CLIENT_APP: &str = "bench-hashsearch-client";
const BASELINE: &str = "bench-baseline";
const COMPONENT: &str = "bench-hashsearch";

/// The on-demand provisioning script: install the server code component and start it.
const SCRIPT: &str = r#"#!/bin/sh
# forage bench: install hashsearch from the cloudlet's components and start it.
set -e
mkdir -p /data/apps/hashsearch
cp /opt/components/bench-hashsearch/hashsearch /data/apps/hashsearch/hashsearch
chmod 755 /data/apps/hashsearch/hashsearch
cd /data/apps/hashsearch
setsid ./hashsearch 8080 >log 2>&1 </dev/null &
"#;

pub async fn run(data: &DataDir, args: BenchProvisionArgs) -> anyhow::Result<()> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let base = bench_base(data, &args.base, forage_image::TINY, &say).await?;
    let work = data.work().join(format!("bench-provision-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = async {
        let app = crate::bench_app::bench_app(&work, 0)?;
        let exe = forage_exe()?;
        let forage = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new(&exe).arg("--data-dir").arg(data.root()).args(args).stdout(Stdio::null()).output()?;
            if !out.status.success() {
                bail!("forage {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        // What the cloudlet holds: the app's service VM with a client app, the baseline
        // VM, the app as a server code component.
        let repo = Repository::new(data);
        for id in [SERVICE, BASELINE] {
            if repo.open(id).is_ok() {
                forage(&["service", "rm", id])?;
            }
        }
        let client = work.join("hashsearch-client.sh");
        std::fs::write(&client, "#!/bin/sh\n# hashsearch client: one request to the service at $1 (host:port).\nprintf '%s\\n' \"${2:-search hello 12}\" | nc \"${1%:*}\" \"${1##*:}\"\n")?;
        say("service VM of the app, baseline VM, component ...");
        let client_arg = format!("{CLIENT_APP}=any:{}", client.display());
        forage(&["service", "create", SERVICE, "--base", &args.base, "--app", &app.to_string_lossy(), "--client-app", &client_arg])?;
        forage(&["service", "create", BASELINE, "--base", &args.base])?;
        let binary = forage_image::locate_guest_binary("apps/hashsearch")?.join("hashsearch");
        forage(&["service", "component", COMPONENT, &binary.to_string_lossy()])?;
        std::fs::write(work.join("provision.sh"), SCRIPT)?;
        say("the app's overlay (access order) ...");
        let ovl = work.join("bench.ovl");
        let options = CreateOptions { segment_bytes: 256 << 10, ..CreateOptions::default() };
        let request = OverlayRequest { base: args.base.clone(), app: app.clone(), options, order: BlobOrder::Access, output: ovl.clone(), packages: false };
        forage_synth::build::build_overlay(data, &request, &|_| {}).await?;
        let dynamic = forage_image::locate_guest_binary("apps/hashsearch-dynamic/hashsearch").context("the dynamically linked sample (built by `make guest`)")?;
        let bundle = work.join("hashsearch.fapp");
        let bytes = forage_service::appvirt::pack(&[dynamic.to_string_lossy().into_owned(), "8080".into()], "hashsearch", 8080, Some(REQUEST.into()), &[])?;
        std::fs::write(&bundle, bytes)?;
        let rows = measure(data, &work, &ovl, &bundle, base.manifest().name.as_str(), &args, &say)?;
        if args.json {
            print_json(&rows);
        } else {
            print_table(&rows, args.mbps);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn measure(
    data: &DataDir,
    work: &Path,
    ovl: &Path,
    bundle: &Path,
    _base: &str,
    args: &BenchProvisionArgs,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<ProvisionRow>> {
    let link = forage_testkit::wan::WanLink::create(args.mbps)
        .context("emulating the WAN link (needs root, iproute2 and tc)")?;
    let exe = forage_exe()?;
    let (device, cloudlet) = (&link.a, &link.b);
    let addr = SocketAddr::from((cloudlet.addr, CLOUDLET_PORT)).to_string();
    pair_bench_device(data, addr.parse()?)?;
    let log = work.join("cloudlet.log");
    let mut serve = cloudlet.command(&exe);
    serve.arg("--data-dir").arg(data.root()).args([
        "serve",
        "--listen",
        &addr,
        "--no-api",
        "--no-cache",
        "--no-advertise",
        "--name",
        "bench-cloudlet",
    ]);
    let _cloudlet = Guard(serve.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).spawn()?);
    wait_for_line(&log.to_path_buf(), "listening", Duration::from_secs(30))?;
    let (ovl_s, bundle_s, script_s, dl) = (
        ovl.to_string_lossy().into_owned(),
        bundle.to_string_lossy().into_owned(),
        work.join("provision.sh").to_string_lossy().into_owned(),
        work.join("dl").to_string_lossy().into_owned(),
    );
    let mechanisms: Vec<(&str, Vec<&str>)> = vec![
        ("vm_synthesis", vec!["synthesize", &ovl_s, "--cloudlet", &addr]),
        ("app_virtualization", vec!["app", "run", &bundle_s, "--cloudlet", &addr, "--request", REQUEST]),
        ("cached_vm", vec!["offload", "--service", SERVICE, "--cloudlet", &addr, "--request", REQUEST]),
        ("cloudlet_push", vec!["apps", "get", CLIENT_APP, "-o", &dl, "--cloudlet", &addr, "--request", REQUEST]),
        (
            "on_demand",
            vec![
                "provision",
                &script_s,
                "--port",
                "8080",
                "--component",
                COMPONENT,
                "--cloudlet",
                &addr,
                "--request",
                REQUEST,
            ],
        ),
    ];
    let mut rows = Vec::new();
    for (mechanism, argv) in mechanisms {
        let mut runs = Vec::new();
        for run in 0..args.runs.max(1) {
            let t = std::time::Instant::now();
            let out = device.command(&exe).arg("--data-dir").arg(data.root()).args(&argv).arg("--json").output()?;
            let wall = t.elapsed().as_secs_f64();
            if !out.status.success() {
                bail!(
                    "{mechanism} (run {run}) failed: {}\ncloudlet log: {}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            let output = || format!("{mechanism} output");
            let row = match mechanism {
                "vm_synthesis" => {
                    let r: SynthesisReport = serde_json::from_slice(&out.stdout).with_context(output)?;
                    ProvisionRow {
                        mechanism: mechanism.into(),
                        mbps: args.mbps,
                        runs: 0,
                        payload_bytes: r.overlay_bytes,
                        ready_s: r.first_response_s,
                        cloudlet_ready_s: r.ready_s,
                        answer: Some(r.answer),
                    }
                }
                _ => {
                    let r: ProvisionReport = serde_json::from_slice(&out.stdout).with_context(output)?;
                    let ready_s = r.first_response_s.context("the mechanism's report has no first response")?;
                    ProvisionRow {
                        mechanism: mechanism.into(),
                        mbps: args.mbps,
                        runs: 0,
                        payload_bytes: r.payload_bytes,
                        ready_s,
                        cloudlet_ready_s: r.ready_s,
                        answer: r.answer,
                    }
                }
            };
            say(&format!(
                "  {mechanism}: ready {:.2} s (command {wall:.2} s), {} bytes sent",
                row.ready_s, row.payload_bytes
            ));
            runs.push(row);
            std::thread::sleep(Duration::from_millis(500)); // the cloudlet stops the instance
        }
        runs.sort_by(|a, b| a.ready_s.total_cmp(&b.ready_s));
        let n = runs.len();
        let mut r = runs.swap_remove(n / 2);
        r.runs = n;
        rows.push(r);
    }
    Ok(rows)
}

fn print_table(rows: &[ProvisionRow], mbps: f64) {
    println!("Provisioning mechanisms over an emulated WAN of {mbps} Mbit/s (tc tbf); the same hashsearch service, first request `{REQUEST}`:");
    println!("  {:<20} {:>14} {:>10} {:>18}", "mechanism", "payload bytes", "ready s", "cloudlet ready s");
    for r in rows {
        println!("  {:<20} {:>14} {:>10.2} {:>18.2}", r.mechanism, r.payload_bytes, r.ready_s, r.cloudlet_ready_s);
    }
    println!("  payload: bytes the device sent to provision (for cloudlet push, not counting its request for the client app); ready: until the service's first answer reached the device");
}
