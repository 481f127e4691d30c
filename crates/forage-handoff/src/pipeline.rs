//! The handoff pipeline's threads (the paper's section 4.3): a feeder cuts the modified
//! chunks into segments, worker threads encode them in parallel in the current operating
//! mode, the caller's thread hands them to the transport in order, and an adaptation
//! thread measures P, R and the acknowledged bandwidth every [`crate::adapt::TICK`] and
//! switches modes ([`crate::adapt::Adapter`]). Every channel is bounded, so memory stays
//! within `(2 * depth + workers)` segments whatever the VM's size.
//!
//! Each tick also writes a trace row (input, output and potential output throughput, the
//! mode, switches): the paper's Figure 17.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::adapt::{link_capacity, Adapter, LookupTable, Mode, Observation, Prior};
use crate::segment::{encode, ChunkId, Modified, CHUNK};

/// Gets every trace row as soon as it is made (a live chart of the handoff).
#[derive(Clone)]
pub struct TraceSink(pub Arc<dyn Fn(&TraceRow) + Send + Sync>);

impl std::fmt::Debug for TraceSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TraceSink")
    }
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub workers: usize,
    /// Chunks per segment (256: 1 MiB).
    pub segment_chunks: usize,
    /// Segments queued between stages.
    pub depth: usize,
    pub start: Mode,
    /// `None`: a static mode.
    pub adapt: Option<LookupTable>,
    /// A better table that may arrive while the pipeline runs (measured on the VM's own
    /// data, [`crate::sample`]): the adaptation takes it at its next tick, if it holds
    /// the current mode.
    pub adapt_later: Option<Arc<std::sync::OnceLock<LookupTable>>>,
    /// What the last handoff to this destination learned (what its link carried, how
    /// loaded the cores were): with the table measured on the VM's own data, the first
    /// decision is made when that table arrives instead of after a second of this link's
    /// measures, and no probe goes above the link's known rate ([`link_capacity`]).
    pub prior: Option<Prior>,
    /// Encode only [`PACE_AHEAD`] of the link ahead of what the destination acknowledged
    /// (the transport acknowledges): a segment encoded early sits in the socket's buffer
    /// in the mode of its time, and a switch applies only to what is encoded after it.
    pub pace: bool,
    /// How long a mode is kept at least (the paper: 5 s).
    pub hold: Duration,
    /// Told every trace row as it is made.
    pub on_trace: Option<TraceSink>,
    /// Counters updated as segments are encoded, for whoever steers QEMU's iterations.
    pub progress: Option<Arc<Progress>>,
}

/// What the encoders have done so far (bytes of modified state in, segment bytes out).
#[derive(Debug, Default)]
pub struct Progress {
    pub input_bytes: AtomicU64,
    pub output_bytes: AtomicU64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            segment_chunks: 256,
            depth: 4,
            start: crate::adapt::parse_mode("xor+zstd3").expect("a mode"),
            adapt: None,
            adapt_later: None,
            prior: None,
            pace: false,
            hold: crate::adapt::MIN_HOLD,
            on_trace: None,
            progress: None,
        }
    }
}

/// How long the adaptation waits for the table measured on the VM's own data before it
/// decides on the reference table alone.
const OWN_TABLE_WAIT: Duration = Duration::from_secs(3);

/// With [`PipelineConfig::pace`], a segment's encoding starts only while the output
/// handed to the transport and not yet acknowledged is under
/// this much of the link's rate (the larger of the last second's and the known one) ...
pub const PACE_AHEAD: Duration = Duration::from_millis(500);
/// ... or this many bytes, whichever is more (the link's rate is not known yet; a
/// round trip's worth of a fast link).
pub const PACE_FLOOR: u64 = 256 << 10;

/// A paced worker that has seen no acknowledgement for this long encodes anyway: its
/// segment then meets the transport, which says whether the destination is gone (waiting
/// on, it would leave the pipeline's threads waiting for ever after a cut link).
pub const PACE_STALL: Duration = Duration::from_secs(2);

/// Ticks the measures are taken over (1 s).
const SMOOTHING: usize = 10;

/// One tick of the trace (throughputs over the last second).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceRow {
    pub t_s: f64,
    /// Modified state taken in, bytes/s.
    pub input_bps: f64,
    /// Bytes/s acknowledged by the destination.
    pub output_bps: f64,
    /// What processing could produce in the current mode, bytes/s of output.
    pub potential_output_bps: f64,
    pub mode: String,
    /// The mode changed at this tick.
    pub switched: bool,
    /// Bytes acknowledged since the start (exact, where the throughputs are over a second).
    #[serde(default)]
    pub acked_bytes: u64,
    /// Output encoded and not yet acknowledged at the tick, bytes.
    #[serde(default)]
    pub in_flight_bytes: u64,
    /// An encoder worked during the tick.
    #[serde(default)]
    pub encoding: bool,
}

/// The adaptation's trace as CSV (the VM handoff paper's Figure 17): t_s, input, output
/// and potential output throughput (bytes/s), mode, switched; then what
/// [`crate::account`] reads: bytes acknowledged so far, bytes in flight, encoding.
pub fn write_trace_csv(rows: &[TraceRow], out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, "t_s,input_bps,output_bps,potential_output_bps,mode,switched,acked_bytes,in_flight_bytes,encoding")?;
    for r in rows {
        writeln!(
            out,
            "{:.2},{:.0},{:.0},{:.0},{},{},{},{},{}",
            r.t_s,
            r.input_bps,
            r.output_bps,
            r.potential_output_bps,
            r.mode,
            r.switched,
            r.acked_bytes,
            r.in_flight_bytes,
            r.encoding
        )?;
    }
    out.flush()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineReport {
    pub segments: u64,
    pub chunks: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    pub trace: Vec<TraceRow>,
    pub switches: Vec<String>,
    /// The most the link carried over a second in which output waited for it (at least
    /// [`PACE_FLOOR`] of it), bytes/s: the next handoff to the same destination's
    /// [`Prior::link_bps`]. Not the last second: it holds the VM's stop and the final
    /// acknowledgements, a third of the link's rate in the bench (25 Mbit/s measured as 7).
    /// The most is high where acknowledgements come in bursts (a segment is acknowledged
    /// once applied): twice a 5 Mbit/s link in the bench. The median of those seconds
    /// was tried and is worse: on the Debian app it put a 25 Mbit/s link at 12-19 Mbit/s,
    /// and the first decision then chose bsdiff+bzip2-9 (+23% against none+zstd-1).
    pub link_bps: Option<f64>,
    /// The encoders' processing time over what the VM's own table predicted for the same
    /// chunks in the same modes, once that table was in use (at least [`CPU_SCALE_CHUNKS`]
    /// chunks): the next handoff's [`Prior::cpu_scale`].
    pub cpu_scale: Option<f64>,
}

/// Chunks encoded after the VM's own table arrived that [`PipelineReport::cpu_scale`]
/// needs (4 MiB).
pub const CPU_SCALE_CHUNKS: u64 = 1024;

#[derive(Default)]
struct Window {
    chunks: u64,
    input: u64,
    output: u64,
    busy_s: f64,
}

/// Put `ids` in a random order (levels the processing load: modified pages come in runs).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    fastrand::Rng::with_seed(seed).shuffle(items);
}

/// Run `chunks` through the pipeline; `send` gets each segment's wire bytes in order and
/// returns when the transport took them; `acked` counts bytes the destination confirmed.
/// A `None` among the chunks sends the chunks gathered so far as a segment of their own
/// (the source has gone quiet). Stops at the first error of `send`.
pub fn run(
    config: &PipelineConfig,
    chunks: impl Iterator<Item = Option<Modified>> + Send,
    mut send: impl FnMut(u64, Vec<u8>) -> std::io::Result<()>,
    acked: Arc<AtomicU64>,
) -> std::io::Result<PipelineReport> {
    let start = Instant::now();
    let mode = Arc::new(Mutex::new(config.start));
    let window = Arc::new(Mutex::new(Window::default()));
    let totals = Arc::new(Mutex::new(PipelineReport::default()));
    let done = Arc::new(AtomicBool::new(false));
    let (batch_tx, batch_rx) = sync_channel::<(u64, Vec<Modified>)>(config.depth);
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let (out_tx, out_rx) = sync_channel::<(u64, Vec<u8>)>(config.depth);
    let trace = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    // Output handed to the transport so far, and how far ahead of the acknowledgements
    // output may be when a segment's encoding starts. The segment the transport waits for
    // is gated on what was handed over (the segments go in order: gated on what was
    // encoded, it could wait for later ones that wait for it); the others on `encoded_out`.
    let delivered = Arc::new(AtomicU64::new(0));
    // Output encoded so far (handed over or waiting for an earlier segment), and the
    // sequence number the transport waits for: under load the delivering thread may lag,
    // and a gate on `delivered` alone lets a worker encode segment after segment past it.
    let encoded_out = Arc::new(AtomicU64::new(0));
    // Encoders at work now (the trace's `encoding`).
    let encoding = Arc::new(AtomicU64::new(0));
    let next_seq = Arc::new(AtomicU64::new(0));
    let pace_floor =
        config.prior.map_or(PACE_FLOOR, |p| PACE_FLOOR.max((p.link_bps * PACE_AHEAD.as_secs_f64()) as u64));
    let ahead = Arc::new(AtomicU64::new(if config.pace { pace_floor } else { u64::MAX }));
    let result = std::thread::scope(|s| {
        // Feeder.
        let seg = config.segment_chunks.max(1);
        s.spawn(move || {
            let mut seq = 0;
            let mut batch = Vec::with_capacity(seg);
            for c in chunks {
                // `None`: nothing came for a while; what waits goes now (a short segment)
                // rather than sit in the queue while its source is held back.
                let full = match c {
                    Some(c) => {
                        batch.push(c);
                        batch.len() == seg
                    }
                    None => !batch.is_empty(),
                };
                if full {
                    if batch_tx.send((seq, std::mem::take(&mut batch))).is_err() {
                        return;
                    }
                    seq += 1;
                }
            }
            if !batch.is_empty() {
                let _ = batch_tx.send((seq, batch));
            }
        });
        // Workers. Only they hold the batch receiver: if they stop (the transport failed),
        // the feeder's sends fail and it stops too.
        let batch_rx = batch_rx;
        for _ in 0..config.workers.max(1) {
            let (rx, tx, mode, window) = (batch_rx.clone(), out_tx.clone(), mode.clone(), window.clone());
            let (delivered, ahead, acked, done) = (delivered.clone(), ahead.clone(), acked.clone(), done.clone());
            let (encoded_out, next_seq, encoding) = (encoded_out.clone(), next_seq.clone(), encoding.clone());
            let progress = config.progress.clone();
            s.spawn(move || loop {
                let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((seq, batch)) = next else { return };
                // Paced: wait until the link has taken most of what was handed to it,
                // then encode in the mode of that moment.
                let (mut seen, mut since) = (acked.load(Ordering::Relaxed), Instant::now());
                loop {
                    let a = acked.load(Ordering::Relaxed);
                    if a != seen {
                        (seen, since) = (a, Instant::now());
                    }
                    // What was encoded counts; the segment the transport waits for is
                    // held back only by what was handed over (else it would wait for
                    // later segments that wait for it).
                    let limit = ahead.load(Ordering::Relaxed);
                    let ahead_now = encoded_out.load(Ordering::Relaxed).saturating_sub(a);
                    let head = seq == next_seq.load(Ordering::Relaxed)
                        && delivered.load(Ordering::Relaxed).saturating_sub(a) <= limit;
                    if ahead_now <= limit || head || done.load(Ordering::Relaxed) || since.elapsed() >= PACE_STALL {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let m = *mode.lock().unwrap_or_else(|p| p.into_inner());
                encoding.fetch_add(1, Ordering::Relaxed);
                let (wire, st) = encode(m, &batch);
                encoding.fetch_sub(1, Ordering::Relaxed);
                if let Some(p) = &progress {
                    p.input_bytes.fetch_add(st.input_bytes, Ordering::Relaxed);
                    p.output_bytes.fetch_add(st.output_bytes, Ordering::Relaxed);
                }
                {
                    let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                    w.chunks += st.chunks;
                    w.input += st.input_bytes;
                    w.output += st.output_bytes;
                    w.busy_s += st.seconds;
                }
                encoded_out.fetch_add(wire.len() as u64, Ordering::Relaxed);
                if tx.send((seq, wire)).is_err() {
                    return;
                }
            });
        }
        drop(out_tx);
        drop(batch_rx);
        // Adaptation and trace.
        {
            let (mode, window, done, acked, trace, totals) =
                (mode.clone(), window.clone(), done.clone(), acked.clone(), trace.clone(), totals.clone());
            let (ahead, pace, encoding) = (ahead.clone(), config.pace, encoding.clone());
            let table = config.adapt.clone();
            let mut later = config.adapt_later.clone();
            let (workers, hold, start_mode) = (config.workers.max(1) as f64, config.hold, config.start);
            let prior = config.prior.filter(|p| p.link_bps > 0.0);
            let on_trace = config.on_trace.clone();
            s.spawn(move || {
                let mut adapter = table.clone().map(|t| Adapter::new(t, start_mode, Instant::now()).with_hold(hold));
                let mut last_acked = acked.load(Ordering::Relaxed);
                // Output encoded so far, against `acked`: what waits for the link.
                let mut encoded = last_acked;
                let acked_at_start = last_acked;
                let mut last = Instant::now();
                // The last second of ticks: one 100 ms tick holds a segment or none, so
                // measures over single ticks swing between 0 and several times the link.
                let mut recent: VecDeque<(f64, Window, u64)> = VecDeque::with_capacity(SMOOTHING + 1);
                // Since when the measures hold acknowledged traffic in the current mode:
                // the first acknowledgement, then each switch.
                let mut measuring_since: Option<Instant> = None;
                // The VM's own table once in use, and against it the encoders' time and
                // what the table predicted for the same chunks.
                let mut own: Option<LookupTable> = None;
                let (mut busy_s, mut predicted_s, mut own_chunks) = (0.0, 0.0, 0u64);
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(crate::adapt::TICK);
                    let now = Instant::now();
                    let dt = now.duration_since(last).as_secs_f64().max(1e-6);
                    last = now;
                    let w = std::mem::take(&mut *window.lock().unwrap_or_else(|p| p.into_inner()));
                    {
                        let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                        t.chunks += w.chunks;
                        t.input_bytes += w.input;
                    }
                    let a = acked.load(Ordering::Relaxed);
                    let encoded_in = *mode.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(prof) = own.as_ref().and_then(|t| t.get(&encoded_in)).filter(|_| w.chunks > 0) {
                        busy_s += w.busy_s;
                        predicted_s += w.chunks as f64 * prof.p;
                        own_chunks += w.chunks;
                        if own_chunks >= CPU_SCALE_CHUNKS && predicted_s > 0.0 {
                            totals.lock().unwrap_or_else(|p| p.into_inner()).cpu_scale = Some(busy_s / predicted_s);
                        }
                    }
                    if a > last_acked && measuring_since.is_none() {
                        // The tick's acknowledgements came during it: measure from its start.
                        measuring_since = Some(now - Duration::from_secs_f64(dt));
                    }
                    encoded += w.output;
                    let encoded_in_tick = w.busy_s > 0.0 || encoding.load(Ordering::Relaxed) > 0;
                    recent.push_back((dt, w, a - last_acked));
                    last_acked = a;
                    if recent.len() > SMOOTHING {
                        recent.pop_front();
                    }
                    let span: f64 = recent.iter().map(|r| r.0).sum();
                    let sum = recent.iter().fold(Window::default(), |mut s, (_, w, _)| {
                        s.chunks += w.chunks;
                        s.input += w.input;
                        s.output += w.output;
                        s.busy_s += w.busy_s;
                        s
                    });
                    // The last half second, if faster: the link is at least that fast
                    // (the connection's start, a link that sped up, drags the average).
                    let rate = |ticks: &mut dyn Iterator<Item = &(f64, Window, u64)>| {
                        let (t, b) = ticks.fold((0.0, 0u64), |(t, b), r| (t + r.0, b + r.2));
                        b as f64 / t.max(1e-6)
                    };
                    let acked_bps = rate(&mut recent.iter()).max(rate(&mut recent.iter().rev().take(SMOOTHING / 2)));
                    let queued = encoded.saturating_sub(a);
                    let probing = !crate::adapt::link_saturated(acked_bps, queued);
                    // A slow encoder's segments in flight (two workers' worth) are not a
                    // queue: bsdiff+lzma-9's 0.3 MB/s were remembered as a 25 Mbit/s link's
                    // rate. A paced pipeline that waits for the link keeps at least
                    // PACE_FLOOR handed over.
                    if !probing && recent.len() == SMOOTHING && queued >= PACE_FLOOR {
                        let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                        t.link_bps = Some(t.link_bps.map_or(acked_bps, |b| b.max(acked_bps)));
                    }
                    let seen = totals.lock().unwrap_or_else(|p| p.into_inner()).link_bps;
                    let known = match (seen, prior) {
                        (Some(b), Some(p)) => Some(b.max(p.link_bps)),
                        (b, p) => b.or(p.map(|p| p.link_bps)),
                    };
                    let bandwidth = link_capacity(acked_bps, queued, known);
                    if pace {
                        let by_rate = (acked_bps * PACE_AHEAD.as_secs_f64()) as u64;
                        ahead.store(pace_floor.max(by_rate), Ordering::Relaxed);
                    }
                    let measured = measuring_since.map_or(Duration::ZERO, |t| now.duration_since(t));
                    let mut current = *mode.lock().unwrap_or_else(|p| p.into_inner());
                    let mut decided = None;
                    if let (Some(ad), Some(t)) = (adapter.as_mut(), later.as_ref().and_then(|l| l.get())) {
                        match t.get(&current) {
                            Some(_) => {
                                ad.set_table(t.clone());
                                own = Some(t.clone());
                                // The link is known from before: no need to wait for its measures.
                                if let Some(prior) = prior.filter(|_| measured < crate::adapt::MIN_MEASURE) {
                                    decided = ad.decide_on_prior(prior, workers, now);
                                    tracing::info!(link_bps = prior.link_bps, cpu_scale = prior.cpu_scale, switch = decided.is_some(), "the first decision on what the last handoff there learned");
                                }
                            }
                            None => tracing::info!(mode = %current, "the measured table lacks the current mode: not taken"),
                        }
                        later = None;
                    }
                    let mut switched = false;
                    let (p, r) = (sum.busy_s / sum.chunks.max(1) as f64, sum.output as f64 / sum.input.max(1) as f64);
                    // While the VM's own table is being measured (about a second), the
                    // reference table would only guess.
                    let own_table_pending = later.is_some() && start.elapsed() < OWN_TABLE_WAIT;
                    if decided.is_none() && sum.chunks > 0 && bandwidth > 0.0 && !own_table_pending {
                        let obs = Observation { p, r, bandwidth, cores: workers, measured, probing };
                        decided = adapter.as_mut().and_then(|ad| ad.tick(&obs, now));
                    }
                    if let Some(sw) = decided {
                        *mode.lock().unwrap_or_else(|p| p.into_inner()) = sw.to;
                        tracing::info!(from = %sw.from, to = %sw.to, predicted = sw.predicted_system, current = sw.current_system, "handoff mode switch");
                        trace.lock().unwrap_or_else(|p| p.into_inner()).1.push(format!("{:.1}s {} -> {} (predicted {:.0} vs {:.0} chunks/s)", start.elapsed().as_secs_f64(), sw.from, sw.to, sw.predicted_system, sw.current_system));
                        switched = true;
                        current = sw.to; // the trace row names the mode switched to
                        // Measures of the old mode say nothing of the new one.
                        recent.clear();
                        measuring_since = Some(now);
                    }
                    let potential = if sum.chunks > 0 { workers / p.max(1e-9) * CHUNK as f64 * r } else { 0.0 };
                    let row = TraceRow {
                        t_s: start.elapsed().as_secs_f64(),
                        input_bps: sum.input as f64 / span,
                        output_bps: acked_bps,
                        potential_output_bps: potential,
                        mode: current.to_string(),
                        switched,
                        acked_bytes: a.saturating_sub(acked_at_start),
                        in_flight_bytes: queued,
                        encoding: encoded_in_tick,
                    };
                    if let Some(sink) = &on_trace {
                        (sink.0)(&row);
                    }
                    trace.lock().unwrap_or_else(|p| p.into_inner()).0.push(row);
                }
            });
        }
        // In order to the transport.
        let r = deliver(out_rx, &mut send, &totals, &delivered, &next_seq);
        done.store(true, Ordering::Relaxed);
        r
    });
    result?;
    let mut report = std::mem::take(&mut *totals.lock().unwrap_or_else(|p| p.into_inner()));
    let w = std::mem::take(&mut *window.lock().unwrap_or_else(|p| p.into_inner()));
    report.chunks += w.chunks;
    report.input_bytes += w.input;
    let (rows, switches) = std::mem::take(&mut *trace.lock().unwrap_or_else(|p| p.into_inner()));
    report.trace = rows;
    report.switches = switches;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

fn deliver(
    out_rx: Receiver<(u64, Vec<u8>)>,
    send: &mut impl FnMut(u64, Vec<u8>) -> std::io::Result<()>,
    totals: &Mutex<PipelineReport>,
    delivered: &AtomicU64,
    next_seq: &AtomicU64,
) -> std::io::Result<()> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for (seq, wire) in out_rx {
        pending.insert(seq, wire);
        while let Some(w) = pending.remove(&next) {
            let len = w.len() as u64;
            send(next, w)?;
            delivered.fetch_add(len, Ordering::Relaxed);
            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
            t.segments += 1;
            t.output_bytes += len;
            next += 1;
            next_seq.store(next, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Chunk ids in a random order, for callers that list modified chunks first.
pub fn shuffled_ids(mut ids: Vec<ChunkId>, seed: u64) -> Vec<ChunkId> {
    shuffle(&mut ids, seed);
    ids
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
