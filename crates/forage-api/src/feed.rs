//! The live feed, `GET /v1/events`: server-sent events of [`FeedEvent`]s, which is how
//! the web UI stays current without reloading (`docs/web-ui.md` has the sequence).
//!
//! Every connection starts with `hello`, then the whole state, one event per part
//! (status, host, bases, services, instances, sessions, cache, credentials, cloudlets,
//! handoffs); after
//! that, a part again whenever it changed: the state's tables at once (their generation
//! moved), the rest every two seconds, and each point of a running handoff's trace as the
//! pipeline makes it. A reconnection (`Last-Event-ID`) gets the whole state again: the
//! feed carries state, not a log, so nothing is lost between two connections.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State as Ctx;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};

use crate::access::Caller;
use crate::context::ApiContext;
use crate::error::ApiError;
use crate::routes::{blocking, instance_list, status_view, DEFAULT_SESSION_LIMIT};
use crate::views::{BaseList, CacheList, ServiceList, SessionList};
use crate::views_live::{CredentialList, FeedEvent, HandoffEvent, HandoffList};

/// Feeds open at once (browser tabs); more are refused until one closes.
pub const MAX_FEEDS: usize = 32;
/// How often the state's generation is looked at.
const POLL: Duration = Duration::from_millis(250);
/// How often the parts that change by themselves (host, traffic, uptime, network) are.
const SLOW: Duration = Duration::from_secs(2);
/// How long a browser waits before it reconnects.
const RETRY: Duration = Duration::from_secs(2);

/// This daemon's run, in event ids (`RUN-SEQ`): ids of another run are still accepted.
fn run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{:x}", (t as u64) ^ ((std::process::id() as u64) << 32))
    })
}

/// `Last-Event-ID` as this feed writes them: `RUN-SEQ`, hex and decimal.
fn valid_event_id(id: &str) -> bool {
    let Some((run, seq)) = id.split_once('-') else { return false };
    (1..=16).contains(&run.len())
        && run.bytes().all(|b| b.is_ascii_hexdigit())
        && (1..=20).contains(&seq.len())
        && seq.bytes().all(|b| b.is_ascii_digit())
}

/// A place among the [`MAX_FEEDS`], given back when the feed ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_FEEDS).then_some(n + 1))
            .ok()
            .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The live feed: the whole state, then what changes (server-sent events).
#[utoipa::path(
    get, path = "/v1/events", tag = "web",
    params(("Last-Event-ID" = Option<String>, Header, description = "The last event's id, when reconnecting")),
    responses(
        (status = 200, description = "Server-sent events, each `data:` a FeedEvent", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A Last-Event-ID this feed never sends", body = crate::views::ErrorBody),
        (status = 401, description = "May not read", body = crate::views::ErrorBody),
        (status = 503, description = "Too many feeds open", body = crate::views::ErrorBody),
    )
)]
pub async fn events(
    Ctx(ctx): Ctx<ApiContext>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    if let Some(last) = headers.get("last-event-id") {
        let ok = last.to_str().is_ok_and(valid_event_id);
        if !ok {
            let shown: String = String::from_utf8_lossy(last.as_bytes()).chars().take(40).collect();
            return Err(ApiError::BadRequest(format!(
                "Last-Event-ID {shown:?} is not an id this feed sends (RUN-SEQ): reconnect without it"
            )));
        }
    }
    let slot = Slot::take(&ctx.feeds).ok_or_else(|| {
        ApiError::Busy(format!("{MAX_FEEDS} live feeds are open on this cloudlet: close a tab and try again"))
    })?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let handoffs = ctx.control.watch_handoffs();
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = produce(&ctx, &caller, handoffs, &tx).await {
            tracing::debug!("live feed ended: {e}");
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Why a feed stopped.
#[derive(Debug, thiserror::Error)]
enum FeedEnd {
    #[error("the browser went away")]
    Gone,
    #[error("its session ended")]
    SignedOut,
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Sends events, numbered, and remembers what each part last was.
struct Sender<'a> {
    tx: &'a mpsc::Sender<Event>,
    seq: u64,
    last: std::collections::HashMap<&'static str, String>,
}

impl Sender<'_> {
    async fn send(&mut self, event: FeedEvent) -> Result<(), FeedEnd> {
        let data = serde_json::to_string(&event).expect("feed events serialize");
        self.seq += 1;
        let e = Event::default().id(format!("{}-{}", run_id(), self.seq)).retry(RETRY).data(data);
        self.tx.send(e).await.map_err(|_| FeedEnd::Gone)
    }

    /// Send a part only if it differs from what this feed sent of it last.
    async fn changed(&mut self, event: FeedEvent) -> Result<(), FeedEnd> {
        let data = serde_json::to_string(&event).expect("feed events serialize");
        if self.last.get(event.name()) == Some(&data) {
            return Ok(());
        }
        self.last.insert(event.name(), data);
        self.send(event).await
    }
}

async fn produce(
    ctx: &ApiContext,
    caller: &Caller,
    mut handoffs: broadcast::Receiver<HandoffEvent>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), FeedEnd> {
    let mut out = Sender { tx, seq: 0, last: Default::default() };
    let csrf_token = caller.session.as_ref().map(|s| s.csrf.clone());
    out.send(FeedEvent::Hello { csrf_token, can_change: caller.can_change }).await?;
    tables(ctx, &mut out).await?;
    slow(ctx, &mut out).await?;
    out.changed(handoff_list(ctx).await?).await?;
    let mut generation = ctx.state.generation();
    let mut slow_at = Instant::now();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tx.closed() => return Err(FeedEnd::Gone),
            _ = tick.tick() => {
                if let Some(s) = &caller.session {
                    if !ctx.access.sessions.live(s) {
                        return Err(FeedEnd::SignedOut);
                    }
                }
                let now = ctx.state.generation();
                if now != generation {
                    generation = now;
                    tables(ctx, &mut out).await?;
                }
                if slow_at.elapsed() >= SLOW {
                    slow_at = Instant::now();
                    slow(ctx, &mut out).await?;
                }
            }
            heard = handoffs.recv() => match heard {
                Ok(HandoffEvent::Tick(t)) => out.send(FeedEvent::HandoffTick(t)).await?,
                Ok(HandoffEvent::Changed(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    out.changed(handoff_list(ctx).await?).await?
                }
                // The daemon is going away: the feed ends with it.
                Err(broadcast::error::RecvError::Closed) => return Err(FeedEnd::Gone),
            },
        }
    }
}

/// The parts kept in the state's tables.
async fn tables(ctx: &ApiContext, out: &mut Sender<'_>) -> Result<(), FeedEnd> {
    out.changed(FeedEvent::Status(status_view(ctx)?)).await?;
    out.changed(FeedEvent::Instances(instance_list(ctx, false).await?)).await?;
    let sessions = ctx.state.list_sessions(DEFAULT_SESSION_LIMIT as usize).map_err(ApiError::from)?;
    out.changed(FeedEvent::Sessions(SessionList { sessions: sessions.into_iter().map(Into::into).collect() })).await?;
    let entries = ctx.state.cache_list().map_err(ApiError::from)?;
    out.changed(FeedEvent::Cache(CacheList { entries: entries.into_iter().map(Into::into).collect() })).await
}

/// The parts that change by themselves or outside the state: the host, bases and
/// services, instances' traffic, uptime, pairing, the network.
async fn slow(ctx: &ApiContext, out: &mut Sender<'_>) -> Result<(), FeedEnd> {
    out.changed(FeedEvent::Status(status_view(ctx)?)).await?;
    out.changed(FeedEvent::Host(blocking(crate::host::host).await?)).await?;
    let control = ctx.control.clone();
    let (bases, services) = blocking(move || (control.bases(), control.services())).await?;
    out.changed(FeedEvent::Bases(BaseList { bases })).await?;
    out.changed(FeedEvent::Services(ServiceList { services })).await?;
    out.changed(FeedEvent::Instances(instance_list(ctx, false).await?)).await?;
    let control = ctx.control.clone();
    let credentials = blocking(move || control.credentials()).await?;
    out.changed(FeedEvent::Credentials(CredentialList { credentials })).await?;
    let control = ctx.control.clone();
    out.changed(FeedEvent::Cloudlets(blocking(move || control.cloudlets()).await?)).await
}

async fn handoff_list(ctx: &ApiContext) -> Result<FeedEvent, ApiError> {
    let control = ctx.control.clone();
    Ok(FeedEvent::Handoffs(HandoffList { handoffs: blocking(move || control.handoffs()).await? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_this_feeds_shape_only() {
        assert!(valid_event_id(&format!("{}-1", run_id())));
        assert!(valid_event_id("0-18446744073709551615"));
        for bad in
            ["", "-", "1-", "-1", "x-1", "1-x", "1-1-1", "11111111111111111-1", "1-111111111111111111111", "1 -1"]
        {
            assert!(!valid_event_id(bad), "{bad:?}");
        }
    }
}
