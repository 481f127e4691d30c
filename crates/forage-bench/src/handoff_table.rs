//! The table `forage bench handoff` prints (and its `--json` rows): one row per approach
//! and link, the median of `--repeat` runs with their spread, and the targets of issue #17
//! marked met or missed.

use serde::Serialize;

use crate::cli::BenchHandoffArgs;
use crate::handoff_workload::{Run, TimeSplit, Workload};
use crate::link_schedule::Link;

/// Row names of the static modes: this and the mode.
pub(crate) const STATIC: &str = "forage-static:";

/// One approach at one rate: a row of the table and of `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct HandoffRow {
    pub approach: String,
    /// The link: its rate in Mbit/s, or its schedule (`0:5,4:35,8:5`).
    pub link: String,
    pub mbps: f64,
    pub total_s: f64,
    pub downtime_s: f64,
    pub bytes: u64,
    /// Memory and disk that differ from the base (forage's measure, the same workload).
    pub modified_bytes: u64,
    pub mode: String,
    pub switches: Vec<String>,
    pub qemu_rounds: u64,
    pub disk_chunks: Option<u64>,
    /// False for a QEMU migration cancelled after `--qemu-give-up-s` (total is then the
    /// time it was given, downtime 0: the VM never stopped).
    pub converged: bool,
    /// Every run's total, in the order run (`--repeat`); the row's other fields are the
    /// median run's.
    pub runs_total_s: Vec<f64>,
    /// Where the median run's time went (forage's rows).
    pub time: Option<TimeSplit>,
}

/// The run with the median total (the lower of the two middle ones for an even count).
/// A whole run is taken, not each field's median, so that a row is one handoff.
pub(crate) fn median_index(runs: &[Run]) -> Option<usize> {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| runs[a].total_s.total_cmp(&runs[b].total_s));
    order.get(runs.len().checked_sub(1)? / 2).copied()
}

/// The row of `runs` of one approach (at least one).
pub(crate) fn row(approach: &str, link: &Link, runs: &[Run], modified_bytes: u64) -> HandoffRow {
    let r = &runs[median_index(runs).unwrap_or(0)];
    HandoffRow {
        approach: approach.into(),
        link: link.label(),
        mbps: link.first_mbps(),
        total_s: r.total_s,
        downtime_s: r.downtime_s,
        bytes: r.bytes,
        modified_bytes,
        mode: r.mode.clone(),
        switches: r.switches.clone(),
        qemu_rounds: r.qemu_rounds,
        disk_chunks: r.disk_chunks,
        converged: r.converged,
        runs_total_s: runs.iter().map(|r| r.total_s).collect(),
        time: r.time,
    }
}

pub(crate) fn summary(r: &Run) -> String {
    format!(
        "total {:.1} s, downtime {:.2} s, {:.1} MiB sent, mode {}",
        r.total_s,
        r.downtime_s,
        r.bytes as f64 / (1 << 20) as f64,
        r.mode
    )
}

pub(crate) fn print_table(rows: &[HandoffRow], args: &BenchHandoffArgs, links: &[Link], workload: &Workload) {
    match workload {
        Workload::Hashsearch => println!(
            "VM handoff over an emulated WAN (tc tbf): hashsearch on {} with a {} MiB working set, {} KiB of it rewritten every 100 ms; destination holds the base:",
            args.image, args.working_mib, args.hot_kib
        ),
        Workload::App(m) => println!(
            "VM handoff over an emulated WAN (tc tbf): {} on {} (its probe answered before and after the move); destination holds the base:",
            m.name, args.image
        ),
    }
    if args.repeat > 1 {
        println!("  (each forage row is the median of {} runs, interleaved; \"runs\" is their range)", args.repeat);
    }
    println!(
        "  {:<32} {:>12} {:>9} {:>11} {:>12} {:>14} {:>10}  mode",
        "approach", "link Mbit/s", "total s", "downtime s", "bytes", "modified bytes", "runs"
    );
    for r in rows {
        let total = match r.converged {
            true => format!("{:.1}", r.total_s),
            false => format!(">{:.0}", r.total_s),
        };
        let lo = r.runs_total_s.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.runs_total_s.iter().copied().fold(0.0, f64::max);
        let spread = if r.runs_total_s.len() > 1 { format!("{lo:.1}-{hi:.1}") } else { "1".into() };
        println!(
            "  {:<32} {:>12} {:>9} {:>11.2} {:>12} {:>14} {:>10}  {}",
            r.approach, r.link, total, r.downtime_s, r.bytes, r.modified_bytes, spread, r.mode
        );
    }
    let met = |ok: bool| if ok { "met" } else { "missed" };
    if rows.iter().any(|r| r.time.is_some()) {
        println!(
            "  where the time goes, in 100 ms ticks of the stream: link = something sent and not yet acknowledged; encoders = nothing in flight while they worked; waiting for pages = nothing to encode or send (QEMU held between iterations, or no new dirty pages yet)"
        );
    }
    for link in links {
        let l = link.label();
        let at: Vec<&HandoffRow> = rows.iter().filter(|r| r.link == l).collect();
        let get = |a: &str| at.iter().copied().find(|r| r.approach == a);
        let statics: Vec<&HandoffRow> = at.iter().copied().filter(|r| r.approach.starts_with(STATIC)).collect();
        let best = statics.iter().copied().min_by(|a, b| a.total_s.total_cmp(&b.total_s));
        let Some(ad) = get("forage-adaptive") else { continue };
        for q in ["qemu-live-migration", "qemu-copy-storage"].iter().filter_map(|a| get(a)) {
            if !q.converged {
                println!(
                    "  at {l}: {} did not converge in {:.0} s ({} QEMU rounds, {} bytes sent); forage moved it in {:.1} s",
                    q.approach, q.total_s, q.qemu_rounds, q.bytes, ad.total_s
                );
                continue;
            }
            println!(
                "  at {l}: forage {:.1}x faster than {} (target >= 10x at 10 Mbit/s)",
                q.total_s / ad.total_s,
                q.approach
            );
        }
        if let Some(best) = best {
            let ratio = ad.total_s / best.total_s;
            match link {
                Link::Fixed(_) => println!(
                    "  at {l}: adaptive {:+.0}% against the best static mode ({}): target within 5%: {}",
                    (ratio - 1.0) * 100.0,
                    best.approach.trim_start_matches(STATIC),
                    met(ratio <= 1.05)
                ),
                Link::Schedule(_) => println!(
                    "  at {l}: adaptive {:+.0}% against the best static mode ({}): target faster than every static mode: {}",
                    (ratio - 1.0) * 100.0,
                    best.approach.trim_start_matches(STATIC),
                    met(ratio < 1.0)
                ),
            }
        }
        // Where the time goes: the adaptive run's, and the best static mode's beside it.
        for r in std::iter::once(ad).chain(best) {
            if let Some(t) = r.time {
                println!(
                    "  at {l}: {} {:.1} s, downtime {:.2} s: {t}",
                    r.approach.trim_start_matches("forage-"),
                    r.total_s,
                    r.downtime_s
                );
            }
        }
        if matches!(link, Link::Fixed(m) if *m == 10.0) {
            println!(
                "  at {l}: adaptive downtime {:.2} s: target <= 1 s: {}",
                ad.downtime_s,
                met(ad.downtime_s <= 1.0)
            );
        }
        if ad.bytes > 0 {
            println!(
                "  at {l}: adaptive sent 1/{:.1} of the modified state (target <= 1/5)",
                ad.modified_bytes as f64 / ad.bytes as f64
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(total_s: f64) -> Run {
        Run {
            total_s,
            downtime_s: total_s / 10.0,
            bytes: (total_s * 1000.0) as u64,
            mode: format!("m{total_s}"),
            switches: Vec::new(),
            qemu_rounds: 0,
            disk_chunks: None,
            converged: true,
            time: None,
        }
    }

    #[test]
    fn a_row_is_the_median_run_whole_with_every_total() {
        let runs = [run(3.0), run(2.0), run(9.0)];
        let r = row("forage-adaptive", &Link::Fixed(25.0), &runs, 1);
        assert_eq!((r.total_s, r.bytes, r.mode.as_str()), (3.0, 3000, "m3"), "the middle run, all its fields");
        assert_eq!(r.runs_total_s, vec![3.0, 2.0, 9.0], "in the order run");
        assert_eq!(median_index(&[run(4.0), run(1.0)]), Some(1), "the lower middle of an even count");
        assert_eq!(median_index(&[]), None);
    }
}
