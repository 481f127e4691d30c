//! Dynamic adaptation of the handoff pipeline (the VM handoff paper, section 6).
//!
//! An **operating mode** is one choice of delta encoding and compression. For each mode a
//! lookup table, profiled offline on a reference workload, holds P (processing seconds per
//! chunk, on one core) and R (output bytes / input bytes). P and R of the live handoff are
//! workload-specific, but their ratios between modes are not, so every 100 ms the
//! [`Adapter`] scales the table by what the current mode measures:
//!
//! ```text
//! Scale_P = P_current / P_lookup(current)      Scale_R = R_current / R_lookup(current)
//! P(M) = P_lookup(M) * Scale_P                 R(M) = R_lookup(M) * Scale_R
//! Thru_processing(M) = cores / P(M)            (chunks/s)
//! Thru_network(M)    = bandwidth / (chunk * R(M))
//! Thru_system(M)     = min(Thru_processing(M), Thru_network(M))
//! ```
//!
//! and picks the mode that maximizes `Thru_system`, keeping a mode for a while
//! (hysteresis, [`Adapter::hold_at`]) unless the current one is not in the table.
//!
//! Two guards keep a short handoff from living with a decision made on nothing:
//! - No decision before [`MIN_MEASURE`] of acknowledged traffic in the current mode: the
//!   first tenths of a second hold the connection's start (TCP opening its window, the
//!   first segment still being encoded) and an acknowledged rate far under the link's,
//!   which the model reads as a slow link (hashsearch at 25 Mbit/s picked bsdiff+bzip2-9
//!   0.8 s in, on 0.3 s of acknowledgements, and was 174% slower than static xor+zstd-3).
//! - The hold grows with the handoff: half of the time it has run, between
//!   [`MIN_MEASURE`] and [`MIN_HOLD`]. How long a handoff will last is not known when it
//!   starts (the modified state is found as QEMU streams it); the time it has run is the
//!   estimate at hand. The paper's 5 s suit handoffs of minutes; the bench's last 3-12 s,
//!   and a 5 s hold kept a mode the link had changed under (5 -> 35 Mbit/s) to the end.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often the adapter looks (the paper: 100 ms).
pub const TICK: Duration = Duration::from_millis(100);
/// The longest a mode is kept at least (the paper: 5 s), once the handoff has run 10 s.
pub const MIN_HOLD: Duration = Duration::from_secs(5);
/// No decision on less than this much acknowledged traffic in the current mode (the
/// start mode is a guess: the hold is there against oscillation, not to keep a guess).
pub const MIN_MEASURE: Duration = Duration::from_secs(1);
/// The hold is this part of the time the handoff has run (between [`MIN_MEASURE`] and
/// [`MIN_HOLD`]).
pub const HOLD_PER_ELAPSED: f64 = 0.5;

/// A mode is left for one predicted at least this much faster. The model's error on the
/// VM's own data is several percent (hashsearch: bsdiff+bzip2-8 predicted 3.5% faster
/// than none+bzip2-9, which was smaller on the wire): switching on less chased noise,
/// back and forth, each switch spending [`MIN_MEASURE`] on measures of the new mode.
pub const SWITCH_GAIN: f64 = 1.10;
/// The first switch of a handoff needs less: the start mode was chosen before anything of
/// this handoff was measured, and the modes compared are then both predictions from one
/// table. On the Debian app, none+bzip2-9 sent 6-10% less than the start mode
/// none+zstd-1 at 5 and 10 Mbit/s; at [`SWITCH_GAIN`] every adaptive run kept
/// none+zstd-1 and took 5-10% longer than static none+bzip2-9 (medians of 3). At 5% the
/// next bench's sample still put none+bzip2-9 under 5% ahead (docs/handoff-bench.md,
/// step 9); hashsearch's first switches at 5-10% were kept. A mode left is come back to
/// only at [`SWITCH_GAIN`], so this cannot go back and forth.
pub const FIRST_SWITCH_GAIN: f64 = 1.05;

/// Difference encoding against the chunk the destination already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delta {
    None,
    Xor,
    Bsdiff,
}

/// Compression of a segment (about 1 MiB of encoded chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "codec", content = "level", rename_all = "lowercase")]
pub enum Codec {
    None,
    Zstd(i32),
    Gzip(u32),
    Bzip2(u32),
    Lzma(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mode {
    pub delta: Delta,
    pub codec: Codec,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = match self.delta {
            Delta::None => "none",
            Delta::Xor => "xor",
            Delta::Bsdiff => "bsdiff",
        };
        match self.codec {
            Codec::None => write!(f, "{d}+none"),
            Codec::Zstd(l) => write!(f, "{d}+zstd-{l}"),
            Codec::Gzip(l) => write!(f, "{d}+gzip-{l}"),
            Codec::Bzip2(l) => write!(f, "{d}+bzip2-{l}"),
            Codec::Lzma(l) => write!(f, "{d}+lzma-{l}"),
        }
    }
}

/// P and R of one mode on the reference workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Processing seconds per chunk on one core (delta + compression).
    pub p: f64,
    /// Output bytes per input byte.
    pub r: f64,
}

/// The offline profile of every mode considered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LookupTable {
    pub chunk_bytes: u64,
    pub modes: Vec<(Mode, Profile)>,
}

impl LookupTable {
    /// The table `forage bench handoff-profile` measured on the reference machine (2 cores,
    /// the bench app's modified memory; `docs/handoff-segment.md`): used until a cloudlet
    /// profiles its own (`DATA/handoff-lookup.json`). The adaptation scales it by what it
    /// measures, so the absolute numbers matter less than the modes' relations.
    pub fn reference() -> Self {
        serde_json::from_str(include_str!("lookup-reference.json")).expect("the reference table parses")
    }

    pub fn get(&self, m: &Mode) -> Option<Profile> {
        self.modes.iter().find(|(k, _)| k == m).map(|(_, p)| *p)
    }

    /// The mode with the least processing (the paper's FASTEST_SPEED) and the one with
    /// the smallest output (HIGHEST_COMPRESSION), the static modes handoff is compared to.
    pub fn fastest(&self) -> Option<Mode> {
        self.modes.iter().min_by(|a, b| a.1.p.total_cmp(&b.1.p)).map(|(m, _)| *m)
    }

    pub fn smallest(&self) -> Option<Mode> {
        self.modes.iter().min_by(|a, b| a.1.r.total_cmp(&b.1.r)).map(|(m, _)| *m)
    }
}

/// What the running handoff measured over the last tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Seconds of processing per chunk per core, in the current mode.
    pub p: f64,
    /// Output/input ratio in the current mode.
    pub r: f64,
    /// Bytes per second acknowledged by the destination.
    pub bandwidth: f64,
    /// Cores the pipeline may use.
    pub cores: f64,
    /// How long the measures cover: acknowledged traffic in the current mode, counted
    /// from the first acknowledgement (or the last switch) up to this tick.
    pub measured: Duration,
    /// `bandwidth` is a probe above what an idle link carried ([`link_capacity`]), not
    /// the link's measured capacity.
    pub probing: bool,
}

/// Output waiting for the link (encoded, not yet acknowledged) that shows the link is the
/// bottleneck, in seconds of the acknowledged rate.
pub const QUEUED_FOR_SATURATION: f64 = 0.25;
/// How far above the acknowledged rate an idle link's capacity is assumed to be.
pub const CAPACITY_PROBE: f64 = 2.0;

/// An acknowledged rate up to this much above the link's known rate is still that link
/// (its measures spread by about this much).
pub const KNOWN_LINK_SPREAD: f64 = 1.10;

/// The link bandwidth the model uses, from the acknowledged rate, the output waiting and
/// the most the link is `known` to have carried (bytes/s: over a saturated second of this
/// handoff or of the last one to the same destination).
///
/// The acknowledged rate is the link's capacity only while output queues for it. When the
/// encoder is the bottleneck the link idles and the acknowledged rate is the encoder's
/// output: taken as the link, it makes every mode look network-bound and the smallest
/// (slowest) one win, which is what the bench's traces showed (none+bzip2-9 producing
/// 0.7 MB/s on a 4.4 MB/s link, and kept). Then the capacity is unknown and above what was
/// seen: the model probes upward by [`CAPACITY_PROBE`] per decision until output queues.
///
/// A probe goes no higher than a known rate the link is still at (within
/// [`KNOWN_LINK_SPREAD`]): an encoder whose output nearly fills the link leaves the queue
/// short now and then, and probing twice the link then traded it for a faster, larger
/// mode the link could not carry (hashsearch at 25 Mbit/s left bzip2-8 for zstd-1 1.5 s
/// in: +15% against static bzip2-9). Above the known rate the link got faster: probe.
pub fn link_capacity(acked_bps: f64, queued_bytes: u64, known: Option<f64>) -> f64 {
    if link_saturated(acked_bps, queued_bytes) {
        return acked_bps;
    }
    let probe = acked_bps * CAPACITY_PROBE;
    match known {
        Some(k) if acked_bps <= k * KNOWN_LINK_SPREAD => probe.min(k.max(acked_bps)),
        _ => probe,
    }
}

/// Output waits for the link: the acknowledged rate is what the link carries.
pub fn link_saturated(acked_bps: f64, queued_bytes: u64) -> bool {
    queued_bytes as f64 >= acked_bps * QUEUED_FOR_SATURATION
}

/// A mode's predicted throughputs, in chunks per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub mode: Mode,
    pub processing: f64,
    pub network: f64,
}

impl Prediction {
    pub fn system(&self) -> f64 {
        self.processing.min(self.network)
    }
}

/// Predict every mode's throughputs from what `current` measures.
pub fn predict(table: &LookupTable, current: Mode, obs: &Observation) -> Vec<Prediction> {
    let Some(base) = table.get(&current) else { return Vec::new() };
    let scale_p = if base.p > 0.0 { obs.p / base.p } else { 1.0 };
    let scale_r = if base.r > 0.0 { obs.r / base.r } else { 1.0 };
    let chunk = table.chunk_bytes.max(1) as f64;
    table
        .modes
        .iter()
        .map(|(m, prof)| {
            let p = (prof.p * scale_p).max(1e-12);
            let r = (prof.r * scale_r).max(1e-12);
            Prediction { mode: *m, processing: obs.cores / p, network: obs.bandwidth / (chunk * r) }
        })
        .collect()
}

/// What the last handoff to a destination learned, for the first decision of the next one
/// there ([`Adapter::decide_on_prior`]). In memory only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prior {
    /// The most the link carried over a second in which output waited for it, bytes/s.
    pub link_bps: f64,
    /// How much longer the encoders took live than the VM's own table said for the same
    /// chunks in the same modes (the guest, QEMU and the other encoders share the cores);
    /// 1.0 when not measured.
    pub cpu_scale: f64,
}

/// [`Prior::cpu_scale`] is taken within 1/this and this.
pub const MAX_CPU_SCALE: f64 = 8.0;

/// A change of mode, for the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Switch {
    pub from: Mode,
    pub to: Mode,
    pub predicted_system: f64,
    pub current_system: f64,
}

/// The adaptation loop's state: the current mode and since when.
pub struct Adapter {
    table: LookupTable,
    current: Mode,
    started: Instant,
    since: Instant,
    hold: Duration,
    /// The table changed since the last decision: decide without holding.
    fresh_table: bool,
    /// The last switch was made on a probed capacity: the next probe needs only new
    /// measures, not a hold (one x2 step per hold climbed too slowly when the link
    /// went from 5 to 35 Mbit/s).
    probed: bool,
    /// This handoff has left its start mode ([`FIRST_SWITCH_GAIN`] no longer applies).
    switched: bool,
}

impl Adapter {
    pub fn new(table: LookupTable, start: Mode, now: Instant) -> Self {
        Self {
            table,
            current: start,
            started: now,
            since: now,
            hold: MIN_HOLD,
            fresh_table: false,
            probed: false,
            switched: false,
        }
    }

    /// Keep a mode at most `hold` instead of [`MIN_HOLD`] (tests, short handoffs); it
    /// also caps the measuring a decision needs.
    pub fn with_hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    pub fn mode(&self) -> Mode {
        self.current
    }

    /// Predict from `table` from now on (one measured on the VM's own data). A mode chosen
    /// on the old table was a guess from other data: the next tick may replace it at once
    /// instead of holding it (the Debian app's handoffs spent 5 s in bsdiff+bzip2-9,
    /// picked from the reference table 0.2 s before their own arrived).
    pub fn set_table(&mut self, table: LookupTable) {
        self.table = table;
        self.fresh_table = true;
    }

    /// How long a mode chosen at `now` is kept at least: [`HOLD_PER_ELAPSED`] of the
    /// time the handoff has run, between the measuring a decision needs and the cap.
    pub fn hold_at(&self, now: Instant) -> Duration {
        let measure = MIN_MEASURE.min(self.hold);
        now.duration_since(self.started).mul_f64(HOLD_PER_ELAPSED).clamp(measure, self.hold.max(measure))
    }

    /// One tick: switch to the best predicted mode if the measures cover
    /// [`MIN_MEASURE`], the current mode has been held long enough ([`Adapter::hold_at`]
    /// its choice) and another beats it.
    pub fn tick(&mut self, obs: &Observation, now: Instant) -> Option<Switch> {
        if obs.measured < MIN_MEASURE.min(self.hold) {
            return None;
        }
        let held = now.duration_since(self.since);
        let hold = if self.probed { Duration::ZERO } else { self.hold_at(self.since) };
        if !self.fresh_table && self.since != self.started && held < hold {
            return None;
        }
        self.fresh_table = false;
        let preds = predict(&self.table, self.current, obs);
        self.choose(&preds, now, obs.probing)
    }

    /// Decide before this handoff has measured anything, on the table alone and what the
    /// last handoff to this destination learned (`prior`), kept as Linux's `tcp_metrics`
    /// keeps a route's window. Only a table measured on the VM's own data is worth it, so
    /// this follows [`Adapter::set_table`]; its R is taken as it is, its P times the
    /// prior's [`Prior::cpu_scale`] (the sample's threads ran without the pipeline beside
    /// them: on the Debian app the sample's P chose bsdiff+bzip2-9, which then produced
    /// 2 MB/s for a 3 MB/s link). A stale prior costs one hold: the ticks after it correct
    /// the choice on what this link carries.
    pub fn decide_on_prior(&mut self, prior: Prior, cores: f64, now: Instant) -> Option<Switch> {
        let own = self.table.get(&self.current)?;
        let p = own.p * prior.cpu_scale.clamp(1.0 / MAX_CPU_SCALE, MAX_CPU_SCALE);
        let bandwidth = prior.link_bps;
        let obs = Observation { p, r: own.r, bandwidth, cores, measured: Duration::ZERO, probing: false };
        self.fresh_table = false;
        let preds = predict(&self.table, self.current, &obs);
        self.choose(&preds, now, false)
    }

    /// Switch to the best of `preds` if it beats the current mode by [`SWITCH_GAIN`]
    /// ([`FIRST_SWITCH_GAIN`] while the handoff is still in its start mode).
    fn choose(&mut self, preds: &[Prediction], now: Instant, probing: bool) -> Option<Switch> {
        let current = preds.iter().find(|p| p.mode == self.current)?.system();
        let best = preds.iter().max_by(|a, b| a.system().total_cmp(&b.system()))?;
        let gain = if self.switched { SWITCH_GAIN } else { FIRST_SWITCH_GAIN };
        // Ties and gains within the model's error keep the current mode.
        if best.mode == self.current || best.system() <= current * gain {
            return None;
        }
        let switch =
            Switch { from: self.current, to: best.mode, predicted_system: best.system(), current_system: current };
        self.current = best.mode;
        self.switched = true;
        self.since = now;
        self.probed = probing;
        Some(switch)
    }
}

/// Modes by name, for command lines (`xor+zstd-3`, `bsdiff+lzma-9`, `none+none`; the
/// dash is optional).
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    let (d, c) = s.split_once('+').ok_or_else(|| format!("mode {s:?}: DELTA+CODEC, e.g. xor+zstd-3"))?;
    let delta = match d {
        "none" => Delta::None,
        "xor" => Delta::Xor,
        "bsdiff" => Delta::Bsdiff,
        other => return Err(format!("unknown delta {other:?} (none, xor, bsdiff)")),
    };
    let level = |name: &str| -> Result<u32, String> {
        c[name.len()..].trim_start_matches('-').parse().map_err(|_| format!("codec {c:?}: {name}-LEVEL"))
    };
    let codec = if c == "none" {
        Codec::None
    } else if c.starts_with("zstd") {
        Codec::Zstd(level("zstd")? as i32)
    } else if c.starts_with("gzip") {
        Codec::Gzip(level("gzip")?)
    } else if c.starts_with("bzip2") {
        Codec::Bzip2(level("bzip2")?)
    } else if c.starts_with("lzma") {
        Codec::Lzma(level("lzma")?)
    } else {
        return Err(format!("unknown codec {c:?} (none, zstdN, gzipN, bzip2N, lzmaN)"));
    };
    Ok(Mode { delta, codec })
}

/// Every mode `forage bench handoff` profiles: three deltas, and gzip, bzip2, LZMA at
/// levels 1-9 as in the paper, plus zstd and no compression.
pub fn all_modes() -> Vec<Mode> {
    let mut out = BTreeMap::new();
    for delta in [Delta::None, Delta::Xor, Delta::Bsdiff] {
        let mut codecs = vec![Codec::None, Codec::Zstd(1), Codec::Zstd(3), Codec::Zstd(9), Codec::Zstd(19)];
        for l in 1..=9 {
            codecs.extend([Codec::Gzip(l), Codec::Bzip2(l), Codec::Lzma(l)]);
        }
        for codec in codecs {
            let m = Mode { delta, codec };
            out.insert(m, ());
        }
    }
    out.into_keys().collect()
}

#[cfg(test)]
#[path = "adapt_tests.rs"]
mod tests;
