//! What runs in the instance `forage bench handoff` moves (hashsearch growing and
//! churning a working set, or a sample app answering its probe before and after), and
//! what one run of it measured.

use std::path::PathBuf;

use anyhow::bail;
use forage_handoff::account::TimeAccount;
use serde::Serialize;

use crate::cli::BenchHandoffArgs;

/// The bench service VM's name on both cloudlets.
pub(crate) const SERVICE: &str = "bench-handoff";

/// What one run measured, forage's or QEMU's.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) total_s: f64,
    pub(crate) downtime_s: f64,
    pub(crate) bytes: u64,
    pub(crate) mode: String,
    pub(crate) switches: Vec<String>,
    pub(crate) qemu_rounds: u64,
    pub(crate) disk_chunks: Option<u64>,
    /// Whether the move completed (QEMU's migration may be given up: `--qemu-give-up-s`).
    pub(crate) converged: bool,
    /// Where a forage run's time went (QEMU's runs: none).
    pub(crate) time: Option<TimeSplit>,
}

/// Where a forage run's time went: the stream while the VM ran and in its last round,
/// each by what held it up ([`forage_handoff::account`]), and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimeSplit {
    pub running: TimeAccount,
    /// From the VM's stop to the stream's end; the downtime holds it.
    pub last_round: TimeAccount,
    /// The rest of the downtime: what was still in flight when the stream ended, the
    /// commit (QEMU's device state) and the resume there.
    pub to_resume_s: f64,
    /// Neither the stream while the VM ran nor the downtime: connecting, starting QEMU's
    /// migration, the sample of modes on the VM's pages (when it delays the stream).
    pub other_s: f64,
}

impl TimeSplit {
    pub(crate) fn of(r: &forage_api::HandoffReport) -> Self {
        let (running, last_round) = r.time_account();
        Self {
            running,
            last_round,
            to_resume_s: (r.downtime_s - last_round.total_s()).max(0.0),
            other_s: (r.total_s - running.total_s() - r.downtime_s).max(0.0),
        }
    }
}

impl std::fmt::Display for TimeSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM running {}; stopped: last round {}, then {:.1} s to the resume (the segments in flight, the commit, the resume); other {:.1} s",
            self.running, self.last_round, self.to_resume_s, self.other_s
        )
    }
}

/// What runs in the instance that moves.
pub(crate) enum Workload {
    /// hashsearch: a working set that grows to `--working-mib`, its hot part rewritten.
    Hashsearch,
    /// A sample app: its request and expected answer.
    App(forage_agent::app::AppManifest),
}

impl Workload {
    pub(crate) fn of(args: &BenchHandoffArgs) -> anyhow::Result<Self> {
        let Some(name) = &args.app else { return Ok(Workload::Hashsearch) };
        let dir = forage_image::locate_guest_binary(&format!("apps/{name}"))?;
        let m = forage_agent::app::AppPackage::open(&dir)?.manifest().clone();
        if m.probe.is_none() {
            bail!("app {name} has no probe request to check it after the move");
        }
        Ok(Workload::App(m))
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Workload::Hashsearch => "hashsearch",
            Workload::App(m) => &m.name,
        }
    }

    pub(crate) fn app_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(forage_image::locate_guest_binary(&format!("apps/{}", self.name()))?)
    }

    /// The request that checks the service.
    pub(crate) fn check_line(&self) -> String {
        match self {
            Workload::Hashsearch => "count".into(),
            Workload::App(m) => m.probe.clone().unwrap_or_default(),
        }
    }

    /// Whether `answer` (to [`Self::check_line`]) is right: the whole working set, or the
    /// app's expected answer.
    pub(crate) fn answer_ok(&self, args: &BenchHandoffArgs, answer: &str) -> bool {
        match self {
            Workload::Hashsearch => {
                answer.starts_with("ok") && answer.contains(&format!("working={}", args.working_mib << 20))
            }
            Workload::App(m) => m.probe_answer_ok(answer),
        }
    }
}
