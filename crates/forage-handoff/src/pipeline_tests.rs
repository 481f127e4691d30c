//! The pipeline's tests: order, adaptation, the link prior, pacing, failures.
use super::*;
use crate::adapt::{parse_mode, Profile};
use crate::segment::{decode, Space};

fn modified(n: u64) -> Vec<Modified> {
    (0..n)
        .map(|i| {
            let index = i % 700;
            let base: Vec<u8> = (0..CHUNK).map(|j| ((j as u64 * 7 + index) % 253) as u8).collect();
            let mut data = base.clone();
            for k in 0..(i % 64) as usize {
                data[(k * 61 + i as usize) % CHUNK] = (k as u8).wrapping_mul(3);
            }
            Modified { chunk: ChunkId { space: Space::Memory, index }, data, base: Some(base) }
        })
        .collect()
}

#[test]
fn segments_arrive_in_order_and_rebuild_the_state_over_a_slow_link() {
    let chunks = modified(2000);
    // The last version of each chunk is what the destination must end with.
    let mut want = BTreeMap::new();
    for c in &chunks {
        want.insert(c.chunk, c.data.clone());
    }
    let bases: BTreeMap<ChunkId, Vec<u8>> = chunks.iter().map(|c| (c.chunk, c.base.clone().unwrap())).collect();
    // The table's costs are relative: what a debug build under load measures for
    // none+none scales them. Compressing costs twice as much per chunk here, so the
    // 4 MB/s link stays the bottleneck whatever this machine's speed.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let live = seen.clone();
    let table = |xor_r| LookupTable {
        chunk_bytes: CHUNK as u64,
        modes: vec![
            (parse_mode("none+none").unwrap(), Profile { p: 1e-6, r: 1.0 }),
            (parse_mode("xor+zstd3").unwrap(), Profile { p: 2e-6, r: xor_r }),
        ],
    };
    // The table it starts with (from elsewhere) says compressing buys nothing; the
    // one measured on this data, which arrives while it runs, says it does.
    let measured = Arc::new(std::sync::OnceLock::new());
    measured.set(table(0.05)).unwrap();
    let progress = Arc::new(Progress::default());
    let config = PipelineConfig {
        workers: 2,
        segment_chunks: 64,
        depth: 2,
        start: parse_mode("none+none").unwrap(),
        adapt: Some(table(1.0)),
        adapt_later: Some(measured),
        prior: None,
        pace: false,
        hold: Duration::from_millis(200),
        on_trace: Some(TraceSink(Arc::new(move |r: &TraceRow| live.lock().unwrap().push(r.clone())))),
        progress: Some(progress.clone()),
    };
    let acked = Arc::new(AtomicU64::new(0));
    let mut got = BTreeMap::new();
    let mut seqs = Vec::new();
    let a2 = acked.clone();
    // A 4 MB/s link.
    let send = |seq: u64, wire: Vec<u8>| {
        std::thread::sleep(Duration::from_secs_f64(wire.len() as f64 / 4e6));
        a2.fetch_add(wire.len() as u64, Ordering::Relaxed);
        // Deltas are against the destination's base chunk, whatever arrived before.
        let mut own = |id: ChunkId| bases.get(&id).cloned();
        for (id, data) in decode(&wire, &mut own).unwrap() {
            got.insert(id, data);
        }
        seqs.push(seq);
        Ok(())
    };
    // A pause in the middle: the chunks before it leave as a short segment.
    let mut paused: Vec<Option<Modified>> = chunks.into_iter().map(Some).collect();
    paused.insert(650, None);
    let report = run(&config, paused.into_iter(), send, acked).unwrap();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "in order");
    assert!(
        got == want,
        "the destination ends with the last version of every chunk ({} of {} chunks differ)",
        want.iter().filter(|(k, v)| got.get(*k) != Some(*v)).count(),
        want.len()
    );
    assert_eq!(report.chunks, 2000);
    assert_eq!(report.segments, 33, "10 of 64 chunks, a short one of 10, 21 of 64, the last 6");
    assert!(!report.switches.is_empty(), "the slow link and the measured table made it compress: {:?}", report.trace);
    assert!(report.trace.iter().any(|r| r.mode == "xor+zstd-3"), "{:?}", report.switches);
    assert!(report.output_bytes < report.input_bytes);
    assert_eq!(*seen.lock().unwrap(), report.trace, "the sink saw every row as it was made");
    assert_eq!(progress.input_bytes.load(Ordering::Relaxed), report.input_bytes, "the steering's counters");
    assert_eq!(progress.output_bytes.load(Ordering::Relaxed), report.output_bytes);
}

/// `chunks` of [`modified`] through the pipeline over a link of `bytes_per_s` that
/// acknowledges each segment once it has carried it.
fn over_link(config: &PipelineConfig, chunks: u64, bytes_per_s: f64) -> PipelineReport {
    let acked = Arc::new(AtomicU64::new(0));
    let a2 = acked.clone();
    let send = |_, wire: Vec<u8>| {
        std::thread::sleep(Duration::from_secs_f64(wire.len() as f64 / bytes_per_s));
        a2.fetch_add(wire.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    run(config, modified(chunks).into_iter().map(Some), send, acked).unwrap()
}

/// Adaptive from none+none, with `table` as the VM's own (already measured).
fn with_own_table(table: LookupTable) -> PipelineConfig {
    let measured = Arc::new(std::sync::OnceLock::new());
    measured.set(table.clone()).unwrap();
    PipelineConfig {
        start: parse_mode("none+none").unwrap(),
        adapt: Some(table),
        adapt_later: Some(measured),
        ..Default::default()
    }
}

#[test]
fn a_link_known_from_before_decides_at_the_first_tick() {
    let table = LookupTable {
        chunk_bytes: CHUNK as u64,
        modes: vec![
            (parse_mode("none+none").unwrap(), Profile { p: 1e-6, r: 1.0 }),
            (parse_mode("xor+zstd3").unwrap(), Profile { p: 2e-6, r: 0.05 }),
        ],
    };
    let config = PipelineConfig { prior: Some(Prior { link_bps: 4e6, cpu_scale: 1.0 }), ..with_own_table(table) };
    let report = over_link(&config, 1000, 4e6);
    let first = report.trace.first().expect("a trace");
    assert!(first.switched && first.mode == "xor+zstd-3", "not on the first tick: {:?}", report.trace);
}

#[test]
fn the_encoders_time_is_measured_against_the_vms_own_table() {
    // A table that says none+none takes a nanosecond a chunk: no encoder is that fast.
    let table = LookupTable {
        chunk_bytes: CHUNK as u64,
        modes: vec![(parse_mode("none+none").unwrap(), Profile { p: 1e-9, r: 1.0 })],
    };
    let report = over_link(&with_own_table(table), 4 * CPU_SCALE_CHUNKS, 8e6);
    let scale = report.cpu_scale.expect("measured once the table was in use");
    assert!(scale > 1.0, "slower than the table said: {scale}");
    // Static: no table, nothing to measure against.
    let fixed = PipelineConfig { start: parse_mode("none+none").unwrap(), ..Default::default() };
    assert_eq!(over_link(&fixed, 2 * CPU_SCALE_CHUNKS, 8e6).cpu_scale, None);
}

#[test]
fn the_link_is_measured_while_output_waits_for_it() {
    let config = PipelineConfig { start: parse_mode("none+none").unwrap(), ..Default::default() };
    // 8 MB over a 4 MB/s link: two seconds with segments queued.
    let report = over_link(&config, 2000, 4e6);
    let link = report.link_bps.expect("the link was measured while output waited for it");
    assert!((2e6..6e6).contains(&link), "{link}");
}

#[test]
fn a_slow_encoders_segments_in_flight_are_not_taken_for_the_link() {
    // LZMA's small segments over a transport that takes 100 ms a segment, whatever its
    // size: the link idles between segments and never carries more than the encoders give.
    let config = PipelineConfig { start: parse_mode("none+lzma9").unwrap(), ..Default::default() };
    let acked = Arc::new(AtomicU64::new(0));
    let a2 = acked.clone();
    let send = |_, wire: Vec<u8>| {
        std::thread::sleep(Duration::from_millis(100));
        a2.fetch_add(wire.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    let report = run(&config, modified(3000).into_iter().map(Some), send, acked).unwrap();
    assert!(report.seconds > 1.0, "long enough for a second of measures: {report:?}");
    assert_eq!(report.link_bps, None, "no second in which output waited for the link");
}

#[test]
fn paced_encoding_stays_half_a_second_ahead_of_the_acknowledgements() {
    // The transport takes every segment at once (a socket's buffer) and a link thread
    // acknowledges them at 400 KB/s: unpaced, the encoders run through everything.
    let ahead_of_link = |pace: bool| {
        let config = PipelineConfig {
            start: parse_mode("none+none").unwrap(),
            segment_chunks: 16,
            depth: 1,
            pace,
            ..Default::default()
        };
        let acked = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let link = {
            let (acked, sent, done) = (acked.clone(), sent.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    let a = acked.load(Ordering::Relaxed);
                    acked.store(sent.load(Ordering::Relaxed).min(a + 4000), Ordering::Relaxed);
                }
            })
        };
        let mut most = 0;
        let send = |_, wire: Vec<u8>| {
            let now_sent = sent.fetch_add(wire.len() as u64, Ordering::Relaxed) + wire.len() as u64;
            most = most.max(now_sent.saturating_sub(acked.load(Ordering::Relaxed)));
            Ok(())
        };
        run(&config, modified(300).into_iter().map(Some), send, acked.clone()).unwrap();
        done.store(true, Ordering::Relaxed);
        link.join().unwrap();
        most
    };
    let segment = 16 * CHUNK as u64;
    let paced = ahead_of_link(true);
    // What passed the gate before the link caught up: a segment per worker, one
    // queued, those waiting for an earlier one to go in order.
    assert!(paced <= PACE_FLOOR + 6 * segment, "paced: {paced} bytes ahead");
    let unpaced = ahead_of_link(false);
    assert!(unpaced > 3 * PACE_FLOOR, "unpaced: {unpaced} bytes ahead");
}

#[test]
fn a_paced_pipeline_ends_when_the_destination_vanishes() {
    // The destination acknowledges nothing and the connection fails at the tenth segment,
    // past the pace's 256 KiB (four segments) and what the queues hold: the paced workers
    // must not wait for acknowledgements for ever (without PACE_STALL this test hangs).
    let config = PipelineConfig {
        start: parse_mode("none+none").unwrap(),
        segment_chunks: 16,
        pace: true,
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut n = 0;
        let send = |_, _: Vec<u8>| {
            n += 1;
            if n >= 10 {
                Err(std::io::Error::other("connection closed"))
            } else {
                Ok(())
            }
        };
        let _ =
            tx.send(run(&config, modified(300).into_iter().map(Some), send, Arc::new(AtomicU64::new(0))).map(|_| ()));
    });
    let ended = rx.recv_timeout(Duration::from_secs(10)).expect("the pipeline ended");
    assert_eq!(ended.unwrap_err().to_string(), "connection closed");
}

#[test]
fn a_failing_transport_stops_the_pipeline() {
    let config = PipelineConfig { segment_chunks: 16, ..Default::default() };
    let mut n = 0;
    let r = run(
        &config,
        modified(500).into_iter().map(Some),
        |_, _| {
            n += 1;
            if n == 3 {
                Err(std::io::Error::other("link cut"))
            } else {
                Ok(())
            }
        },
        Arc::new(AtomicU64::new(0)),
    );
    assert_eq!(r.unwrap_err().to_string(), "link cut");
}

#[test]
fn shuffling_is_a_permutation() {
    let ids: Vec<ChunkId> = (0..100).map(|i| ChunkId { space: Space::Disk, index: i }).collect();
    let mut s = shuffled_ids(ids.clone(), 7);
    assert_ne!(s, ids);
    s.sort();
    assert_eq!(s, ids);
}
