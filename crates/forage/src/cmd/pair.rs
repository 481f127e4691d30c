//! `forage pair`: offline pairing of devices (and of cloudlets for handoff) with a
//! cloudlet, and the credentials on both sides.
//!
//! On the cloudlet: `forage pair` shows a one-time code; `forage pair --bundle F --name N`
//! writes credentials to carry over USB; `forage pair list | revoke WHO`.
//! On the device: `forage pair --cloudlet ADDR --code CODE`, `forage pair import F`,
//! `forage pair list | forget CLOUDLET`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_trust::date;
use forage_trust::{CloudletTrust, DeviceTrust, PeerKind};
use serde_json::json;

use crate::cli::{PairArgs, PairCommand, SignerCommand};

/// The name a cloudlet's authority is created with if `forage pair` runs before `serve`.
const DEFAULT_CLOUDLET: &str = "cloudlet";

pub async fn run(data: &DataDir, args: PairArgs) -> anyhow::Result<()> {
    let devices = DeviceTrust::new(&data.trust_peers());
    let valid = Duration::from_secs(args.valid_days.max(1) * 24 * 3600);
    let kind = if args.as_cloudlet { PeerKind::Cloudlet } else { PeerKind::Device };
    let mut args = args;
    if let Some(uri) = args.uri.take() {
        let uri: forage_trust::PairingUri = uri.parse()?;
        (args.cloudlet, args.code) = (Some(uri.cloudlet.to_string()), Some(uri.code));
    }
    match (args.command, args.cloudlet, args.bundle) {
        (Some(PairCommand::List { json: as_json }), _, _) => list(data, &devices, as_json || args.json),
        (Some(PairCommand::Revoke { who }), _, _) => {
            let n = authority(data)?.revoke(&who)?;
            println!("revoked {n} credential(s) of {who}: refused from their next connection");
            Ok(())
        }
        (Some(PairCommand::Import { file }), _, _) => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = devices.import_bundle(&bytes).with_context(|| format!("{}", file.display()))?;
            println!("paired with cloudlet {} (credentials valid until {})", r.cloudlet, date(r.not_after_unix));
            Ok(())
        }
        (Some(PairCommand::Forget { cloudlet }), _, _) => {
            devices.remove(&cloudlet)?;
            println!("forgot the pairing with {cloudlet}");
            Ok(())
        }
        (None, Some(addr), _) => {
            let code =
                args.code.context("pairing with a cloudlet needs --code (shown by `forage pair` on the cloudlet)")?;
            let addr: SocketAddr =
                addr.parse().with_context(|| format!("--cloudlet {addr}: an address like 10.0.0.5:7878"))?;
            let name = args.name.unwrap_or_else(hostname);
            let r = forage_client::pair(addr, &code, &name, &devices)
                .await
                .with_context(|| format!("pairing with {addr}"))?;
            if args.json {
                crate::output::print_json(&r);
            } else {
                println!(
                    "paired with cloudlet {} at {addr} as {name} (credentials valid until {})",
                    r.cloudlet,
                    date(r.not_after_unix)
                );
            }
            Ok(())
        }
        (None, None, Some(out)) => {
            let name = args.name.context("a bundle needs --name: who it is for")?;
            let addr = args.addr;
            let b = authority(data)?.issue_bundle(&name, kind, valid, addr)?;
            let partial = out.with_extension("partial");
            write_secret(&partial, &serde_json::to_vec_pretty(&b)?)?;
            std::fs::rename(&partial, &out).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "credentials for {name} written to {} (valid until {}); on the device: forage pair import {}",
                out.display(),
                date(b.not_after_unix),
                out.display()
            );
            Ok(())
        }
        (None, None, None) => {
            let trust = authority(data)?;
            let code = trust.new_code(forage_trust::Grant::new(kind, valid))?;
            let what = match kind {
                PeerKind::Cloudlet => "a cloudlet's credentials (it may hand VMs off to this one)",
                PeerKind::Device => "a device's credentials",
            };
            if args.json {
                crate::output::print_json(
                    &json!({"code": code.text, "expires_unix": code.expires_unix, "cloudlet_ca_sha256": trust.ca_fingerprint(), "kind": kind, "valid_days": args.valid_days.max(1)}),
                );
            } else {
                println!("pairing code: {}", code.text);
                println!("grants {what} for {} days; valid once, for 10 minutes; on the other host: forage pair --cloudlet ADDR --code {}", args.valid_days.max(1), code.text);
            }
            Ok(())
        }
    }
}

fn authority(data: &DataDir) -> anyhow::Result<CloudletTrust> {
    Ok(CloudletTrust::open_or_init(&data.trust_cloudlet(), DEFAULT_CLOUDLET)?)
}

fn list(data: &DataDir, devices: &DeviceTrust, as_json: bool) -> anyhow::Result<()> {
    let issued = if data.trust_cloudlet().join("ca.pem").exists() { authority(data)?.issued() } else { Vec::new() };
    let peers: Vec<_> = devices.peers().into_iter().map(|p| p.record).collect();
    if as_json {
        crate::output::print_json(&json!({"issued": issued, "paired_with": peers}));
        return Ok(());
    }
    if issued.is_empty() && peers.is_empty() {
        println!("no pairings (on a cloudlet: forage pair; on a device: forage pair --cloudlet ADDR --code CODE)");
    }
    for i in &issued {
        let state = match i.revoked_unix {
            Some(t) => format!("revoked {}", date(t)),
            None if i.not_after_unix <= now() => "expired".into(),
            None => format!("valid until {}", date(i.not_after_unix)),
        };
        println!("issued  {:<20} {:?} serial {:<4} via {:<6} {state}", i.name, i.kind, i.serial, i.via);
    }
    for p in &peers {
        let state = if p.not_after_unix <= now() {
            "expired".into()
        } else {
            format!("valid until {}", date(p.not_after_unix))
        };
        println!("paired  {:<20} {:<22} {state}", p.cloudlet, p.addr.as_deref().unwrap_or("-"));
    }
    Ok(())
}

/// This device's credentials for the cloudlet at `addr` (or named `name`).
fn write_secret(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "device".into())
}

/// `forage signer`: the signing key of this host, and the signers file of a cloudlet.
pub fn signer(data: &DataDir, cmd: SignerCommand) -> anyhow::Result<()> {
    let list = data.root().join("trust").join("signers");
    let read = || std::fs::read_to_string(&list).unwrap_or_default();
    let write = |text: String| -> anyhow::Result<()> {
        std::fs::create_dir_all(list.parent().expect("has a parent"))?;
        let partial = list.with_extension("partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &list).with_context(|| format!("writing {}", list.display()))
    };
    match cmd {
        SignerCommand::Show => {
            let s = forage_trust::signing::Signer::open_or_init(&forage_synth::build::signing_key(data))?;
            println!("{}", s.public_hex());
        }
        SignerCommand::Allow { key, note } => {
            let key = key.trim().to_lowercase();
            if key.len() != 64 || hex::decode(&key).is_err() {
                bail!("{key:?} is not an Ed25519 public key in hex (64 digits; `forage signer show` on the builder prints it)");
            }
            let mut text = read();
            if !text.lines().any(|l| l.split_whitespace().next() == Some(key.as_str())) {
                text.push_str(&format!("{key} # {note}\n"));
                write(text)?;
            }
            println!(
                "overlays signed by {} are accepted; overlays of other signers and unsigned ones are refused",
                forage_trust::short(&key)
            );
        }
        SignerCommand::Remove { key } => {
            let key = key.trim().to_lowercase();
            let text: String = read()
                .lines()
                .filter(|l| l.split_whitespace().next() != Some(key.as_str()))
                .map(|l| format!("{l}\n"))
                .collect();
            write(text)?;
            println!(
                "signer {} removed (an empty list still refuses every overlay: delete {} to accept any)",
                forage_trust::short(&key),
                list.display()
            );
        }
        SignerCommand::List => match forage_trust::signing::allowed_signers(&list)? {
            None => println!("no signers list: any overlay of a paired device is accepted ({} absent)", list.display()),
            Some(keys) => {
                for k in keys {
                    println!("{k}");
                }
            }
        },
    }
    Ok(())
}
