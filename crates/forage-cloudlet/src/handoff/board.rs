//! The handoffs this cloudlet sends, as they run: each one's trace grows every 100 ms
//! (the pipeline's [`TraceSink`]) and watchers (the operator's live chart) hear every
//! point and every start and end. The last few that ended are kept for a look afterwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forage_api::{HandoffEvent, HandoffReport, HandoffStatus, HandoffTick, HandoffView};
use forage_handoff::adapt::{LookupTable, Mode, Prior};
use forage_handoff::pipeline::{TraceRow, TraceSink};
use tokio::sync::broadcast;

/// Handoffs that ended, kept for a look.
const KEEP_ENDED: usize = 8;
/// How long the table one handoff measured on its VM's pages stands in for a new sample
/// of the same app's pages to the same destination ([`HandoffBoard::own_table`]).
pub(crate) const OWN_TABLE_FOR: Duration = Duration::from_secs(600);
/// Destinations remembered at most; past it the one heard of longest ago is forgotten
/// (a device may ask its instance to follow it anywhere).
const KEEP_DESTINATIONS: usize = 256;
/// Events a slow watcher may fall behind by before it misses some (it then reads the
/// whole list again).
const BACKLOG: usize = 1024;

pub struct HandoffBoard {
    handoffs: Mutex<Vec<HandoffView>>,
    events: broadcast::Sender<HandoffEvent>,
    next: AtomicU64,
    /// What the last handoffs to each destination learned (what its link carried,
    /// how much slower the encoders ran than the VM's own table said, the mode the last
    /// adaptive one ended in), in memory only: the next adaptive handoff there starts in
    /// that mode and makes its first choice on the rest
    /// (`forage_handoff::pipeline::PipelineConfig::prior`), and the table the last sample
    /// measured.
    links: Mutex<HashMap<SocketAddr, Learned>>,
}

/// What the handoffs to one destination learned.
#[derive(Debug, Clone, Default)]
struct Learned {
    prior: Option<Prior>,
    ended_in: Option<Mode>,
    own_table: Option<OwnTable>,
    /// When a handoff there last ended.
    ended: Option<Instant>,
}

/// A table measured on a moving VM's own pages (`super::sampling`), for the next
/// handoffs of the same app.
#[derive(Debug, Clone)]
struct OwnTable {
    /// What the VM runs: its base and its name (`launch-APP` for an app's instances).
    app: String,
    table: LookupTable,
    measured: Instant,
}

impl Default for HandoffBoard {
    fn default() -> Self {
        Self {
            handoffs: Mutex::new(Vec::new()),
            events: broadcast::channel(BACKLOG).0,
            next: AtomicU64::new(1),
            links: Mutex::default(),
        }
    }
}

/// Keep what a handoff to `to` learned, forgetting the destination heard of longest ago
/// past [`KEEP_DESTINATIONS`].
fn keep(links: &mut HashMap<SocketAddr, Learned>, to: SocketAddr, learned: Learned) {
    links.insert(to, Learned { ended: Some(Instant::now()), ..learned });
    if links.len() > KEEP_DESTINATIONS {
        if let Some(oldest) = links.iter().min_by_key(|(_, l)| l.ended).map(|(a, _)| *a) {
            links.remove(&oldest);
        }
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl HandoffBoard {
    /// Every handoff running, then the last ones that ended, newest first.
    pub fn list(&self) -> Vec<HandoffView> {
        let mut all = self.lock().clone();
        all.sort_by(|a, b| b.started_unix_ms.cmp(&a.started_unix_ms).then_with(|| b.id.cmp(&a.id)));
        all
    }

    /// Hear every start, point and end from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HandoffEvent> {
        self.events.subscribe()
    }

    /// What the last handoffs to `to` learned.
    pub(crate) fn prior(&self, to: SocketAddr) -> Option<Prior> {
        self.links().get(&to).and_then(|l| l.prior)
    }

    /// The mode the last adaptive handoff to `to` ended in.
    pub(crate) fn ended_in(&self, to: SocketAddr) -> Option<Mode> {
        self.links().get(&to).and_then(|l| l.ended_in)
    }

    /// The table the last sample of `app`'s pages measured, for a handoff of it to `to`,
    /// if it was measured less than [`OWN_TABLE_FOR`] ago, and how long ago: the sample
    /// takes 0.3-0.5 s of every core while the encoders need them.
    pub(crate) fn own_table(&self, to: SocketAddr, app: &str) -> Option<(LookupTable, Duration)> {
        let links = self.links();
        let own = links.get(&to)?.own_table.as_ref().filter(|t| t.app == app)?;
        let age = own.measured.elapsed();
        (age < OWN_TABLE_FOR).then(|| (own.table.clone(), age))
    }

    /// Keep the table a sample of `app`'s pages just measured for a handoff to `to`.
    pub(crate) fn remember_table(&self, to: SocketAddr, app: &str, table: LookupTable) {
        let mut links = self.links();
        let last = links.get(&to).cloned().unwrap_or_default();
        let own_table = Some(OwnTable { app: app.to_string(), table, measured: Instant::now() });
        keep(&mut links, to, Learned { own_table, ..last });
    }

    /// Keep what a handoff to `to` measured: the link's rate (bytes/s) replaces the last
    /// one; the encoders' scale and the mode it ended in replace the last ones only if
    /// this handoff adapted (a static mode measures no scale and chose nothing).
    pub(crate) fn remember(
        &self,
        to: SocketAddr,
        link_bps: Option<f64>,
        cpu_scale: Option<f64>,
        ended_in: Option<Mode>,
    ) {
        let ok = |v: &f64| v.is_finite() && *v > 0.0;
        let mut links = self.links();
        let last = links.get(&to).cloned().unwrap_or_default();
        let prior = link_bps.filter(ok).or(last.prior.map(|p| p.link_bps)).map(|link_bps| Prior {
            link_bps,
            cpu_scale: cpu_scale.filter(ok).or(last.prior.map(|p| p.cpu_scale)).unwrap_or(1.0),
        });
        keep(&mut links, to, Learned { prior, ended_in: ended_in.or(last.ended_in), ..last });
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Learned>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HandoffView>> {
        self.handoffs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handoff of `instance` to `to` starts: its id.
    pub(crate) fn start(&self, instance: &str, to: std::net::SocketAddr, mode: Option<String>) -> String {
        let id = format!("h{}", self.next.fetch_add(1, Ordering::Relaxed));
        let view = HandoffView {
            id: id.clone(),
            instance: instance.to_string(),
            to: to.to_string(),
            mode,
            started_unix_ms: now_unix_ms(),
            ended_unix_ms: None,
            status: HandoffStatus::Running,
            error: None,
            trace: Vec::new(),
            total_s: None,
            downtime_s: None,
            bytes: None,
            modified_bytes: None,
        };
        {
            let mut all = self.lock();
            all.push(view.clone());
            // Forget the oldest that ended beyond the few kept.
            let ended = all.iter().filter(|h| h.status != HandoffStatus::Running).count();
            if ended > KEEP_ENDED {
                if let Some(oldest) = all
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.status != HandoffStatus::Running)
                    .min_by_key(|(_, h)| h.started_unix_ms)
                    .map(|(i, _)| i)
                {
                    all.remove(oldest);
                }
            }
        }
        let _ = self.events.send(HandoffEvent::Changed(view));
        id
    }

    /// Where the pipeline's trace rows of handoff `id` go.
    pub(crate) fn sink(self: &Arc<Self>, id: &str) -> TraceSink {
        let (board, id) = (self.clone(), id.to_string());
        TraceSink(Arc::new(move |row: &TraceRow| board.tick(&id, row.clone())))
    }

    fn tick(&self, id: &str, row: TraceRow) {
        if let Some(h) = self.lock().iter_mut().find(|h| h.id == id) {
            h.trace.push(row.clone());
        }
        let _ = self.events.send(HandoffEvent::Tick(HandoffTick { id: id.to_string(), row }));
    }

    /// Handoff `id` ended: moved (with its report), or not (why).
    pub(crate) fn end(&self, id: &str, outcome: Result<&HandoffReport, String>) {
        let view = {
            let mut all = self.lock();
            let Some(h) = all.iter_mut().find(|h| h.id == id) else { return };
            h.ended_unix_ms = Some(now_unix_ms());
            match outcome {
                Ok(r) => {
                    h.status = HandoffStatus::Done;
                    h.total_s = Some(r.total_s);
                    h.downtime_s = Some(r.downtime_s);
                    h.bytes = Some(r.bytes);
                    h.modified_bytes = Some(r.modified_bytes);
                    // The report's trace is the whole one (rows made after the last one
                    // a watcher heard included).
                    h.trace = r.trace.clone();
                }
                Err(why) => {
                    h.status = HandoffStatus::Failed;
                    h.error = Some(why);
                }
            }
            h.clone()
        };
        let _ = self.events.send(HandoffEvent::Changed(view));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: f64) -> TraceRow {
        TraceRow {
            t_s: t,
            input_bps: 1e6,
            output_bps: 5e5,
            potential_output_bps: 8e5,
            mode: "xor+zstd-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn watchers_hear_the_start_every_point_and_the_end() {
        let board = Arc::new(HandoffBoard::default());
        let mut rx = board.subscribe();
        let id = board.start("i1", "10.0.0.2:7878".parse().unwrap(), None);
        let sink = board.sink(&id);
        (sink.0)(&row(0.1));
        (sink.0)(&row(0.2));
        assert_eq!(board.list()[0].trace.len(), 2, "the list has the points so far");
        board.end(&id, Err("link cut".into()));
        let mut heard = Vec::new();
        while let Ok(e) = rx.try_recv() {
            heard.push(e);
        }
        assert!(matches!(&heard[0], HandoffEvent::Changed(h) if h.status == HandoffStatus::Running));
        assert!(matches!(&heard[1], HandoffEvent::Tick(t) if t.id == id && t.row.t_s == 0.1));
        assert!(matches!(&heard[2], HandoffEvent::Tick(t) if t.row.t_s == 0.2));
        assert!(
            matches!(&heard[3], HandoffEvent::Changed(h) if h.status == HandoffStatus::Failed && h.error.as_deref() == Some("link cut"))
        );
    }

    #[test]
    fn only_the_last_few_ended_are_kept() {
        let board = HandoffBoard::default();
        let running = board.start("busy", "10.0.0.2:7878".parse().unwrap(), None);
        for i in 0..KEEP_ENDED + 3 {
            let id = board.start(&format!("i{i}"), "10.0.0.2:7878".parse().unwrap(), None);
            board.end(&id, Err("no".into()));
        }
        let all = board.list();
        assert!(all.iter().any(|h| h.id == running), "a running one is never forgotten");
        assert!(all.iter().filter(|h| h.status != HandoffStatus::Running).count() <= KEEP_ENDED + 1);
    }

    #[test]
    fn a_destination_remembers_its_link_and_where_the_last_adaptive_handoff_ended() {
        let board = HandoffBoard::default();
        let (to, other): (SocketAddr, SocketAddr) =
            ("10.0.0.2:7878".parse().unwrap(), "10.0.0.3:7878".parse().unwrap());
        let bzip2 = forage_handoff::adapt::parse_mode("none+bzip2-9").unwrap();
        assert_eq!((board.prior(to), board.ended_in(to)), (None, None));
        // An adaptive handoff that measured no link still leaves its mode.
        board.remember(to, None, None, Some(bzip2));
        assert_eq!((board.prior(to), board.ended_in(to)), (None, Some(bzip2)));
        board.remember(to, Some(3e6), Some(1.5), None);
        assert_eq!(board.prior(to), Some(Prior { link_bps: 3e6, cpu_scale: 1.5 }));
        // A static one: a new link rate; the scale and the mode stay.
        board.remember(to, Some(1e6), None, None);
        assert_eq!(board.prior(to), Some(Prior { link_bps: 1e6, cpu_scale: 1.5 }));
        assert_eq!(board.ended_in(to), Some(bzip2));
        assert_eq!((board.prior(other), board.ended_in(other)), (None, None), "per destination");
        board.remember(to, Some(f64::NAN), Some(-1.0), None);
        assert_eq!(board.prior(to), Some(Prior { link_bps: 1e6, cpu_scale: 1.5 }), "nonsense is not kept");
    }

    #[test]
    fn a_measured_table_stands_for_the_same_app_to_the_same_destination() {
        let board = HandoffBoard::default();
        let (to, other): (SocketAddr, SocketAddr) =
            ("10.0.0.2:7878".parse().unwrap(), "10.0.0.3:7878".parse().unwrap());
        let table = LookupTable::reference();
        assert!(board.own_table(to, "base/launch-ocr").is_none());
        board.remember_table(to, "base/launch-ocr", table.clone());
        board.remember(to, Some(3e6), Some(1.2), None);
        let (kept, age) = board.own_table(to, "base/launch-ocr").expect("kept, and kept by remember");
        assert_eq!(kept.modes.len(), table.modes.len());
        assert!(age < OWN_TABLE_FOR);
        assert!(board.own_table(to, "base/launch-vision").is_none(), "another app samples its own");
        assert!(board.own_table(other, "base/launch-ocr").is_none(), "per destination");
        board.remember_table(to, "base/launch-vision", table);
        assert!(board.own_table(to, "base/launch-ocr").is_none(), "the last app's table only");
    }

    #[test]
    fn destinations_beyond_the_few_kept_forget_the_oldest() {
        let board = HandoffBoard::default();
        let at = |i: usize| -> SocketAddr { format!("10.0.{}.{}:7878", i / 250, i % 250 + 1).parse().unwrap() };
        for i in 0..KEEP_DESTINATIONS + 10 {
            board.remember(at(i), Some(1e6), None, None);
        }
        assert_eq!(board.links().len(), KEEP_DESTINATIONS);
        assert!(board.prior(at(KEEP_DESTINATIONS + 9)).is_some(), "the newest is kept");
    }
}
