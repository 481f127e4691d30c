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

/// The link bandwidth the model uses, from the acknowledged rate and the output waiting.
///
/// The acknowledged rate is the link's capacity only while output queues for it. When the
/// encoder is the bottleneck the link idles and the acknowledged rate is the encoder's
/// output: taken as the link, it makes every mode look network-bound and the smallest
/// (slowest) one win, which is what the bench's traces showed (none+bzip2-9 producing
/// 0.7 MB/s on a 4.4 MB/s link, and kept). Then the capacity is unknown and above what was
/// seen: the model probes upward by [`CAPACITY_PROBE`] per decision until output queues.
pub fn link_capacity(acked_bps: f64, queued_bytes: u64) -> f64 {
    if link_saturated(acked_bps, queued_bytes) {
        acked_bps
    } else {
        acked_bps * CAPACITY_PROBE
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
}

impl Adapter {
    pub fn new(table: LookupTable, start: Mode, now: Instant) -> Self {
        Self { table, current: start, started: now, since: now, hold: MIN_HOLD, fresh_table: false, probed: false }
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

    /// Decide before this handoff has measured anything, on the table alone and a link
    /// `bandwidth` (bytes/s) known from before: what the link to this destination carried
    /// at most in the last handoff to it, kept as Linux's `tcp_metrics` keeps a
    /// route's window. Only a table measured on the VM's own data is worth it (its P and
    /// R are taken as they are), so this follows [`Adapter::set_table`]. A stale prior
    /// costs one hold: the ticks after it correct the choice on what this link carries.
    pub fn decide_on_prior(&mut self, bandwidth: f64, cores: f64, now: Instant) -> Option<Switch> {
        let own = self.table.get(&self.current)?;
        let obs = Observation { p: own.p, r: own.r, bandwidth, cores, measured: Duration::ZERO, probing: false };
        self.fresh_table = false;
        let preds = predict(&self.table, self.current, &obs);
        self.choose(&preds, now, false)
    }

    /// Switch to the best of `preds` if it beats the current mode by [`SWITCH_GAIN`].
    fn choose(&mut self, preds: &[Prediction], now: Instant, probing: bool) -> Option<Switch> {
        let current = preds.iter().find(|p| p.mode == self.current)?.system();
        let best = preds.iter().max_by(|a, b| a.system().total_cmp(&b.system()))?;
        // Ties and gains within the model's error keep the current mode.
        if best.mode == self.current || best.system() <= current * SWITCH_GAIN {
            return None;
        }
        let switch =
            Switch { from: self.current, to: best.mode, predicted_system: best.system(), current_system: current };
        self.current = best.mode;
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
mod tests {
    use super::*;

    fn m(s: &str) -> Mode {
        parse_mode(s).unwrap()
    }

    fn table() -> LookupTable {
        LookupTable {
            chunk_bytes: 4096,
            modes: vec![
                (m("none+none"), Profile { p: 1e-6, r: 1.0 }),
                (m("xor+zstd1"), Profile { p: 10e-6, r: 0.30 }),
                (m("xor+lzma9"), Profile { p: 200e-6, r: 0.15 }),
            ],
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn obs(p: f64, r: f64, bandwidth: f64, measured: Duration) -> Observation {
        Observation { p, r, bandwidth, cores: 1.0, measured, probing: false }
    }

    #[test]
    fn the_best_mode_follows_the_bottleneck() {
        let t = table();
        let start = Instant::now();
        // Slow link: compress hard, once a second of acknowledgements says so.
        let mut a = Adapter::new(t.clone(), m("none+none"), start);
        let slow = |measured| obs(1e-6, 1.0, 5e6 / 8.0, measured);
        let at = start + Duration::from_secs(3);
        assert_eq!(a.tick(&slow(Duration::from_millis(900)), at), None, "no decision on 0.9 s of measures");
        let s = a.tick(&slow(MIN_MEASURE), at).expect("a switch");
        assert_eq!(s.to, m("xor+lzma9"));
        // Fast link: compressing hard is now the bottleneck; but the mode chosen 3 s in
        // is kept 1.5 s, whatever the measures say.
        let fast = obs(200e-6, 0.15, 1e9 / 8.0, 2 * SECOND);
        assert_eq!(a.hold_at(at), Duration::from_millis(1500));
        assert_eq!(a.tick(&fast, at + Duration::from_millis(1400)), None);
        let s = a.tick(&fast, at + Duration::from_millis(1500)).expect("a switch");
        assert_ne!(s.to, m("xor+lzma9"));
        assert!(s.predicted_system > s.current_system);
    }

    #[test]
    fn a_switch_on_a_probed_capacity_is_not_held() {
        let start = Instant::now();
        let mut a = Adapter::new(table(), m("xor+lzma9"), start);
        let at = start + 6 * SECOND;
        // LZMA's output (5000 chunks/s) is all the link carried, nothing waits: a probe
        // of three times that.
        let idle =
            |measured| Observation { probing: true, ..obs(200e-6, 0.15, 3.0 * 5000.0 * 4096.0 * 0.15, measured) };
        assert_eq!(a.tick(&idle(SECOND), at).expect("a probe").to, m("xor+zstd1"));
        // The next decision needs a second of measures in the new mode, no 3 s hold.
        let zstd = |measured| Observation { probing: true, ..obs(10e-6, 0.30, 1e9, measured) };
        assert_eq!(a.tick(&zstd(Duration::from_millis(500)), at + Duration::from_millis(500)), None);
        assert_eq!(a.tick(&zstd(SECOND), at + SECOND).expect("the next step").to, m("none+none"));
    }

    #[test]
    fn the_hold_grows_with_the_handoff() {
        let start = Instant::now();
        let a = Adapter::new(table(), m("none+none"), start);
        assert_eq!(a.hold_at(start), MIN_MEASURE, "a second at least");
        assert_eq!(a.hold_at(start + 4 * SECOND), 2 * SECOND);
        assert_eq!(a.hold_at(start + 60 * SECOND), MIN_HOLD, "the paper's 5 s at most");
        let short = Adapter::new(table(), m("none+none"), start).with_hold(Duration::from_millis(200));
        assert_eq!(short.hold_at(start + 60 * SECOND), Duration::from_millis(200));
    }

    #[test]
    fn an_idle_link_is_not_taken_for_a_slow_one() {
        // 0.7 MB/s acknowledged with 2 MB waiting: the link is the bottleneck.
        assert_eq!(link_capacity(700e3, 2_000_000), 700e3);
        // 0.7 MB/s acknowledged and nothing waiting: the encoder is; the link can do more.
        assert_eq!(link_capacity(700e3, 10_000), 1.4e6);
        // With a slow encoder, an idle link no longer makes the smallest mode win.
        let t = table();
        let (cur, obs_p, obs_r) = (m("xor+lzma9"), 200e-6, 0.15);
        let pick = |bw: f64| {
            let preds = predict(&t, cur, &obs(obs_p, obs_r, bw, SECOND));
            preds.iter().max_by(|a, b| a.system().total_cmp(&b.system())).unwrap().mode
        };
        let acked = 5000.0 * 4096.0 * 0.15 * 0.2; // lzma's whole output, far under the link
        assert_eq!(pick(acked), m("xor+lzma9"), "taken as the link, lzma's own output keeps lzma");
        let mut bw = acked;
        for _ in 0..4 {
            bw = link_capacity(bw, 0);
        }
        assert_eq!(pick(bw), m("xor+zstd1"), "probing finds the faster mode");
    }

    #[test]
    fn a_table_from_the_vms_own_data_replaces_a_guess_at_once() {
        let start = Instant::now();
        let mut a = Adapter::new(table(), m("none+none"), start);
        let slow = obs(1e-6, 1.0, 5e6 / 8.0, 2 * SECOND);
        let at = start + 4 * SECOND;
        assert_eq!(a.tick(&slow, at).unwrap().to, m("xor+lzma9"), "the guess");
        // The VM's own data says LZMA buys nothing over zstd here and costs far more.
        let own = LookupTable {
            chunk_bytes: 4096,
            modes: vec![
                (m("none+none"), Profile { p: 1e-6, r: 1.0 }),
                (m("xor+zstd1"), Profile { p: 10e-6, r: 0.30 }),
                (m("xor+lzma9"), Profile { p: 4000e-6, r: 0.29 }),
            ],
        };
        a.set_table(own);
        let lz = |measured| obs(4000e-6, 0.29, 5e6 / 8.0, measured);
        let soon = at + Duration::from_millis(200);
        assert_eq!(a.tick(&lz(Duration::from_millis(200)), soon), None, "the new table waits for measures too");
        let s = a.tick(&lz(MIN_MEASURE), at + MIN_MEASURE).expect("no hold on a guess");
        assert_eq!(s.to, m("xor+zstd1"));
        assert_eq!(a.tick(&slow, at + 2 * SECOND), None, "then the hold again");
    }

    #[test]
    fn a_known_link_decides_before_any_measure_and_the_ticks_correct_a_stale_one() {
        let start = Instant::now();
        // The VM's own table says lzma9 keeps up with a 5 Mbit/s link and outputs half.
        let mut a = Adapter::new(table(), m("xor+zstd1"), start);
        a.set_table(table());
        let arrived = start + Duration::from_millis(300);
        let s = a.decide_on_prior(5e6 / 8.0, 1.0, arrived).expect("a switch on the prior alone");
        assert_eq!(s.to, m("xor+lzma9"));
        // On a link the encoder cannot keep up with, the prior keeps the fast mode.
        let mut fast = Adapter::new(table(), m("xor+zstd1"), start);
        assert_eq!(fast.decide_on_prior(2e8, 1.0, arrived), None);
        // The prior was stale (the link is fast now): once a hold of measures says so,
        // the ticks move on.
        let lz = table().get(&m("xor+lzma9")).unwrap();
        let fast_link = Observation { p: lz.p, r: lz.r, bandwidth: 1e9, cores: 1.0, measured: SECOND, probing: false };
        assert_eq!(a.tick(&fast_link, start + Duration::from_millis(800)), None, "held");
        let back = a.tick(&fast_link, start + 2 * SECOND).expect("corrected");
        assert_ne!(back.to, m("xor+lzma9"));
        // A mode the table lacks: no decision.
        let mut lost = Adapter::new(table(), m("bsdiff+gzip9"), start);
        assert_eq!(lost.decide_on_prior(5e6 / 8.0, 1.0, start), None);
    }

    #[test]
    fn measured_ratios_scale_the_table() {
        let t = table();
        // The workload compresses twice as badly and processes 3x slower than the
        // reference: every prediction moves by the same factors.
        let obs = Observation { p: 30e-6, r: 0.60, bandwidth: 1e6, cores: 2.0, measured: SECOND, probing: false };
        let p = predict(&t, m("xor+zstd1"), &obs);
        let lz = p.iter().find(|x| x.mode == m("xor+lzma9")).unwrap();
        assert!((lz.processing - 2.0 / (200e-6 * 3.0)).abs() < 1e-6);
        assert!((lz.network - 1e6 / (4096.0 * 0.30)).abs() < 1e-6);
        assert!(predict(&t, m("bsdiff+gzip9"), &obs).is_empty(), "a mode not in the table predicts nothing");
    }

    #[test]
    fn modes_parse_and_print() {
        for s in ["none+none", "xor+zstd-3", "bsdiff+lzma-9", "xor+gzip-1", "none+bzip2-9", "none+bzip2"] {
            match parse_mode(s) {
                Ok(mode) => assert_eq!(mode.to_string(), s),
                Err(e) => assert!(s == "none+bzip2" && e.contains("LEVEL"), "{s}: {e}"),
            }
        }
        assert_eq!(parse_mode("xor+zstd3").unwrap().to_string(), "xor+zstd-3", "the dash is optional");
        assert!(parse_mode("xor").is_err());
        assert_eq!(all_modes().len(), 3 * (5 + 27));
        assert_eq!(table().fastest(), Some(m("none+none")));
        assert_eq!(table().smallest(), Some(m("xor+lzma9")));
    }
}
