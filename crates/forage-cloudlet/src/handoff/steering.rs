//! Steering QEMU's iterations so that the VM runs while its state moves and stops only
//! for a last round that fits the downtime limit (the paper's section 6.4).
//!
//! Left alone, QEMU ends its iterations once what is left would take no longer than the
//! downtime limit at its own bandwidth estimate, and that estimate counts the unchanged
//! pages the feeder skips at memory speed: QEMU stops the VM after its first pass and
//! everything queued toward the link is sent while the VM is stopped. So, while it
//! iterates, QEMU gets a 1 ms limit (its least; 0 would make it finish after its first
//! pass) and a capped rate, and forage decides:
//! - **flow**: QEMU is held (its rate cut to [`HELD_BANDWIDTH`]) while what is queued
//!   for the link would take more than [`QUEUE_HIGH`] to send, and let go below
//!   [`QUEUE_LOW`]: QEMU also ends the iterations by itself whenever a dirty sync finds
//!   nothing (an idle moment of the guest), and what is queued then is downtime;
//! - **last round**: once QEMU has made its first full pass and what is still to send
//!   (the queue and QEMU's remaining dirty memory at the current output ratio) would take
//!   no longer than the downtime limit (less [`RESUME_ALLOWANCE`] for the destination's
//!   resume) at the acknowledged bandwidth, QEMU gets that limit and finishes at the end
//!   of its round.
//!
//! Only where QEMU tracks every write across rounds ([`VmSpec::dirty_tracking_exact`]):
//! under TCG, QEMU 7.2 loses writes made after a dirty sync unless the VM's RAM length
//! takes its slow path (see [`forage_vm::spec::RAM_TAIL_KIB`]). Elsewhere (VMs made
//! before the tail) QEMU ends its iterations itself.
//!
//! [`VmSpec::dirty_tracking_exact`]: forage_vm::VmSpec::dirty_tracking_exact

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forage_handoff::pipeline::Progress;
use forage_vm::qmp::QmpError;
use forage_vm::Vm;
use serde_json::json;

/// Rounds after which QEMU is let finish whatever the estimate (a VM that dirties memory
/// faster than the link carries it would iterate for ever).
const MAX_ROUNDS: u64 = 30;
/// QEMU's rate while it iterates: far above what a WAN carries even compressed, low
/// enough that its "1 ms of bandwidth" is a few dozen pages. The rate counts every page
/// QEMU streams, the many the feeder drops as equal to the base too: at 64 MiB/s the
/// Debian app's 1 GiB took the first pass seconds the link sat idle (static none+zstd-1
/// at 25 Mbit/s: 6.7 s, 4.5 s at this rate).
const ITERATION_BANDWIDTH: u64 = 256 << 20;
/// QEMU's rate while held: a page every few hundred milliseconds.
const HELD_BANDWIDTH: u64 = 16 << 10;
/// Seconds of encoded, unacknowledged segments above which QEMU is held, and below which
/// it is let go: whatever is queued when QEMU stops the VM is downtime, and QEMU may stop
/// it at any sync that finds no page dirty (its pending size 0). Chunks gathered and not
/// yet encoded are not counted: in a mode bound by the CPU they are the encoders' work,
/// and holding QEMU for them starved the link (totals +30% to +180% at 5 Mbit/s); the
/// pipeline's own queues are kept short instead. The pipeline is paced too (it encodes
/// half a second of the link ahead, `PipelineConfig::pace`), so QEMU is mostly held by
/// its own socket: the feeder stops reading while the pipeline's short queues are full.
const QUEUE_HIGH: f64 = 0.5;
const QUEUE_LOW: f64 = 0.25;
/// What of the downtime limit the destination needs once everything arrived: apply the
/// last segments, load the device state into its QEMU, resume, answer (0.2-0.4 s under
/// TCG here). The rest of the limit is what the link may still carry.
const RESUME_ALLOWANCE: f64 = 0.4;
/// Acknowledgements come a segment at a time: the bandwidth is measured over seconds.
const BANDWIDTH_WINDOW: Duration = Duration::from_secs(5);

/// QEMU's migration parameters while forage steers: the least downtime limit, a capped
/// rate.
pub(super) fn iterating() -> serde_json::Value {
    json!({ "downtime-limit": 1, "max-bandwidth": ITERATION_BANDWIDTH })
}

pub(super) struct Steering<'a> {
    /// Bytes of chunks handed to the pipeline.
    pub(super) fed: &'a AtomicU64,
    pub(super) progress: &'a Progress,
    /// Segment bytes the destination acknowledged.
    pub(super) acked: &'a AtomicU64,
    pub(super) limit: Duration,
}

impl Steering<'_> {
    /// Runs until QEMU has its last round (or its migration is over). An error means QEMU
    /// refused its last round's limit: left at 1 ms, it would iterate until the handoff
    /// stalls, so the caller cancels the migration at once (the VM runs on here).
    pub(super) async fn run(&self, vm: &Vm) -> Result<(), QmpError> {
        let set = |params: serde_json::Value| async move {
            vm.qmp().execute("migrate-set-parameters", Some(params)).await.map(|_| ()).inspect_err(|e| {
                tracing::warn!(error = %e, "steering QEMU's migration: migrate-set-parameters failed");
            })
        };
        let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut held = false;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Ok(q) = vm.qmp().execute("query-migrate", None).await else { return Ok(()) };
            if !matches!(q["status"].as_str(), Some("setup" | "active")) {
                return Ok(());
            }
            let now = Instant::now();
            let acked = self.acked.load(Ordering::Relaxed);
            samples.push_back((now, acked));
            while samples.len() > 2 && now.duration_since(samples[0].0) > BANDWIDTH_WINDOW {
                samples.pop_front();
            }
            let (t0, a0) = samples[0];
            let dt = now.duration_since(t0).as_secs_f64();
            if dt < 1.0 || acked == a0 {
                continue; // no bandwidth measured yet
            }
            let bandwidth = (acked - a0) as f64 / dt;
            let input = self.progress.input_bytes.load(Ordering::Relaxed);
            let output = self.progress.output_bytes.load(Ordering::Relaxed);
            let ratio = if input > 0 { output as f64 / input as f64 } else { 1.0 };
            // Encoded and not yet acknowledged: what the link carries before QEMU's next
            // pages; with what is gathered, what it carries before the VM's last pages.
            let in_flight = output.saturating_sub(acked) as f64;
            let queued = self.fed.load(Ordering::Relaxed).saturating_sub(input) as f64 * ratio + in_flight;
            let rounds = q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
            let remaining = q["ram"]["remaining"].as_u64().unwrap_or(0) as f64 * ratio;
            let estimate = (queued + remaining) / bandwidth;
            let budget = (self.limit.as_secs_f64() - RESUME_ALLOWANCE).max(0.1);
            if rounds >= 2 && (estimate <= budget || rounds >= MAX_ROUNDS) {
                tracing::info!(
                    rounds,
                    estimate_s = estimate,
                    queued_bytes = queued as u64,
                    bandwidth_bps = bandwidth as u64,
                    "the rest fits in the downtime limit: last round"
                );
                let last = json!({ "downtime-limit": self.limit.as_millis() as u64, "max-bandwidth": 1u64 << 40 });
                // QMP answers one command at a time: a second try covers a passing hitch.
                if set(last.clone()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    set(last).await?;
                }
                return Ok(());
            }
            let queued_s = in_flight / bandwidth;
            if !held && queued_s > QUEUE_HIGH {
                held = set(json!({ "max-bandwidth": HELD_BANDWIDTH })).await.is_ok();
                tracing::info!(
                    queued_s,
                    in_flight = in_flight as u64,
                    bandwidth_bps = bandwidth as u64,
                    "QEMU held: the link is behind"
                );
            } else if held && queued_s < QUEUE_LOW {
                held = set(json!({ "max-bandwidth": ITERATION_BANDWIDTH })).await.is_err();
                tracing::info!(queued_s, in_flight = in_flight as u64, bandwidth_bps = bandwidth as u64, "QEMU let go");
            }
        }
    }
}
