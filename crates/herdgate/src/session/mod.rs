//! One client socket: the Pusher protocol loop, its timers and its writer.
//!
//! The loop is generic over any `Stream + Sink` of websocket messages, so it
//! runs the same on a real upgraded TCP/TLS stream and on an in-memory pair
//! in unit tests. It owns the only writer of its socket: rooms hand it frames
//! through its bounded [`crate::outbound::Outbound`] queue and it writes them,
//! within `write_timeout`, whenever it is woken.
//!
//! The future is kept small on purpose: it lives as long as the socket, and
//! its size is paid for every idle connection.

mod deadlines;
mod grants;
mod handler;

pub mod transport;
pub mod websocket;
/// Public for the fuzz targets (`fuzz/`); sessions read through
/// [`websocket::server`].
pub mod ws_reader;
pub mod xhr;

use crate::apps::App;
use crate::op::Tell;
use crate::outbound::{CloseOrder, Outbound};
use crate::protocol::codes;
use crate::state::SessionContext as Context;
use crate::types::{ConnId, RoomKey};
use crate::worker::Subscriber;
use deadlines::{Deadlines, Expired};
use futures_util::{Stream, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use transport::Transport;

/// How a session ended, for the close frame, the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed, or the TCP connection went away.
    PeerGone,
    /// We close with this code.
    Close {
        code: u16,
        reason: &'static str,
        label: &'static str,
    },
}

impl End {
    pub(crate) fn close(code: u16, reason: &'static str, label: &'static str) -> End {
        End::Close {
            code,
            reason,
            label,
        }
    }

    /// The server is going away (drain, or its workers stopped): reconnect.
    pub(crate) fn shutdown() -> End {
        End::close(codes::RECONNECT, "server shutting down", "shutdown")
    }
}

pub(crate) struct Channel {
    name: Arc<str>,
    kind: crate::protocol::names::ChannelKind,
    /// The presence user id this socket joined as.
    user: Option<Arc<str>>,
}

pub(crate) struct SignedIn {
    id: Arc<str>,
    watchlist: Vec<Arc<str>>,
}

impl SignedIn {
    /// Sign out, and stop watching every user of the watchlist.
    async fn release(&self, router: &crate::router::Router, app: &Arc<str>, conn: ConnId) {
        let room = RoomKey::user(app, &self.id);
        let _ = router.tell(Tell::SignOut { room, conn }).await;
        for w in &self.watchlist {
            let room = RoomKey::user(app, w);
            let _ = router.tell(Tell::Unwatch { room, conn }).await;
        }
    }
}

pub struct Session {
    ctx: Arc<Context>,
    app: Arc<App>,
    id: ConnId,
    out: Arc<Outbound>,
    channels: Vec<Channel>,
    /// Signed in: as whom, and whom it watches (boxed: most sockets never sign in).
    user: Option<Box<SignedIn>>,
    limiter: Option<crate::ratelimit::TokenBucket>,
    /// Subscribe, unsubscribe and sign-in (`limits.channel_ops_per_second`):
    /// each can make a room tell every member, or a webhook fire.
    ops: Option<crate::ratelimit::TokenBucket>,
    /// Connected with `?herdgate_resume=1`: every subscription opts in to
    /// resume, whether or not it says so.
    pub resume_all: bool,
    /// The last auth grant proof verified on this socket (boxed: most
    /// sockets never present a grant).
    proven: Option<Box<crate::auth::grant::Proven>>,
}

impl Session {
    pub fn new(ctx: Arc<Context>, app: Arc<App>) -> Session {
        let live = ctx.node.live();
        let l = &live.config.limits;
        let out = Arc::new(Outbound::new(
            l.outbound_queue_messages,
            l.outbound_queue_bytes,
        ));
        Session {
            id: ConnId(rand::random()),
            out,
            app,
            ctx,
            channels: Vec::new(),
            user: None,
            limiter: None,
            ops: None,
            resume_all: false,
            proven: None,
        }
    }

    pub fn socket_id(&self) -> String {
        self.id.socket_id()
    }

    /// The app as the live config has it now, or how this socket ends
    /// because a reload revoked what it connected with: its key is gone
    /// (4001), the app is disabled (4003) or its secret changed while the
    /// socket holds something the old secret authorized (4203: reconnect
    /// and authorize again; a socket holding nothing of the kind goes on
    /// under the new secret). Nothing is ever verified against a secret the
    /// live config no longer has.
    fn current_app(&mut self) -> Result<Arc<App>, End> {
        let live = self.ctx.node.live();
        let why = match live.apps.by_key(&self.app.key) {
            Some(a) if a.id == self.app.id && a.enabled && a.secret == self.app.secret => {
                return Ok(a.clone())
            }
            Some(a) if a.id == self.app.id && !a.enabled => {
                End::close(codes::APP_DISABLED, "Application disabled", "app_disabled")
            }
            Some(a) if a.id == self.app.id && !self.authorized() => {
                self.app = a.clone();
                return Ok(a.clone());
            }
            Some(a) if a.id == self.app.id => End::close(
                codes::CREDENTIALS_CHANGED,
                "app credentials changed; reconnect",
                "app_credentials_changed",
            ),
            _ => End::close(
                codes::UNKNOWN_APP,
                "App key no longer configured",
                "app_removed",
            ),
        };
        if let End::Close { code, reason, .. } = why {
            self.out.push(&crate::protocol::error(Some(code), reason));
        }
        Err(why)
    }

    /// What the current load state asks the rooms to shed for this socket's commands.
    fn shed(&self) -> crate::types::Shed {
        let state = self.ctx.node.overload.state();
        let max = self
            .ctx
            .node
            .live()
            .config
            .overload
            .actions
            .member_events_max(state);
        crate::types::Shed {
            member_events_max: max,
            silent: false,
            announce: false,
        }
    }

    /// Signed in, or holding a private or presence subscription (which the
    /// app's backend authorized): what `require_user_authentication` asks.
    fn authorized(&self) -> bool {
        use crate::protocol::names::ChannelKind;
        self.user.is_some()
            || self.channels.iter().any(|c| {
                matches!(
                    c.kind,
                    ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
                )
            })
    }

    fn subscriber(&self) -> Subscriber {
        Subscriber::local(self.id, self.out.clone())
    }

    /// Let rooms write this socket directly while its writer is idle
    /// (plain TCP; see [`crate::outbound::direct`]).
    pub fn write_directly(&self, socket: crate::outbound::DirectSocket) {
        self.out.attach(socket);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // However the task ends, rooms still holding this socket's queue
        // must not keep its stream open or write to it.
        self.out.detach();
        // Normally `release` emptied both. A session task that panicked
        // (a bug) or was cancelled still leaves its rooms and the user
        // registry, from a task of its own: one per such session, never more.
        if self.channels.is_empty() && self.user.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let held = Held {
            channels: std::mem::take(&mut self.channels),
            user: self.user.take(),
        };
        let (ctx, app, id, shed) = (self.ctx.clone(), self.app.id.clone(), self.id, self.shed());
        if std::thread::panicking() {
            tracing::warn!(socket_id = %self.socket_id(), "session panicked; releasing its rooms");
        } else {
            // Cancelled (the runtime is stopping).
            tracing::debug!(socket_id = %self.socket_id(), "session cancelled; releasing its rooms");
        }
        runtime.spawn(async move { held.release(&ctx, &app, id, shed).await });
    }
}

/// Run a session to its end, then release everything it held. `reader`
/// yields what the client sends; `writer` is the only writer of the socket.
///
/// All three arguments live as long as the socket, so callers keep them on
/// the heap (`Box`) and lend them: an async fn stores its arguments in its
/// own future next to everything it awaits, which would double their size
/// for every idle connection.
pub async fn run<R, T>(reader: &mut R, writer: &mut T, session: &mut Session) -> End
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    T: Transport,
{
    let activity = session.ctx.node.live().config.server.activity_timeout.get();
    session.out.push(&crate::protocol::connection_established(
        &session.socket_id(),
        activity.as_secs(),
    ));
    let end = session.serve(reader, writer).await;
    // From here only the session writes: its close must not interleave.
    session.out.detach();
    // One-shot teardown is boxed: a future is as large as its largest state.
    Box::pin(finish(reader, writer, session, end)).await
}

/// Leave every room, then tell the client why (if we are the ones closing).
async fn finish<R, T>(reader: &mut R, writer: &mut T, session: &mut Session, end: End) -> End
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    T: Transport,
{
    session.release().await;
    if let End::Close {
        code,
        reason,
        label,
    } = end
    {
        metrics::counter!("herdgate_connections_closed_total", "reason" => label).increment(1);
        // What the session queued last (a pusher:error explaining the close)
        // goes out before the close frame; a slow consumer's queue is empty.
        let d = session.out.drain();
        writer.enqueue_partial(d.frames, d.sent);
        close(reader, writer, code, reason).await;
    } else {
        metrics::counter!("herdgate_connections_closed_total", "reason" => "client").increment(1);
    }
    tracing::debug!(?end, "session ended");
    end
}

/// An app's `write_delay` in whole milliseconds (0: none).
fn window_ms(app: &App) -> u32 {
    u32::try_from(app.features.write_delay.as_millis()).unwrap_or(u32::MAX)
}

/// With a write window of `window` ms, until when the queued room events
/// wait: `None` when they go now (no window, nothing held, something
/// urgent or a close queued, or the window since the oldest has passed).
fn hold_until(out: &Outbound, window: u32) -> Option<Instant> {
    if window == 0 {
        return None;
    }
    let at = out.held_since()? + Duration::from_millis(u64::from(window));
    (at > Instant::now()).then_some(at)
}

/// Hand what is queued (and a direct write's unfinished frame) to an idle
/// writer; returns the close order, if one was given. A moderator's removal
/// notice among the frames makes the socket forget that channel (the
/// owner, and the edge, already did): the client reads the notice only
/// after this, so whatever it does next meets a socket that agrees.
fn take_queue<T: Transport>(
    out: &Outbound,
    writer: &mut T,
    oldest: &mut Option<Instant>,
    channels: &mut Vec<Channel>,
) -> Option<CloseOrder> {
    let d = out.drain();
    if d.removal {
        for name in d
            .frames
            .iter()
            .filter_map(crate::protocol::claim_removed_channel)
        {
            channels.retain(|c| *c.name != *name);
        }
    }
    if !d.frames.is_empty() {
        writer.enqueue_partial(d.frames, d.sent);
        *oldest = d.oldest;
    }
    d.close
}

/// What a poll of the writer found.
enum Progress {
    /// Everything taken from the queue is written.
    Done,
    /// The peer stopped taking bytes: the write deadline, at this instant,
    /// starts now.
    Stalled(Instant),
    Failed,
}

/// Poll the writer; a stall is reported once (when it starts), so the loop
/// arms the write deadline only then, never for writes that just complete.
fn poll_progress<T: Transport>(
    writer: &mut T,
    cx: &mut std::task::Context<'_>,
    deadlines: &mut Deadlines,
) -> std::task::Poll<Progress> {
    use std::task::Poll;
    match writer.poll_send(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(Progress::Done),
        Poll::Ready(Err(_)) => Poll::Ready(Progress::Failed),
        Poll::Pending if !deadlines.is_stalled() => {
            Poll::Ready(Progress::Stalled(deadlines.stalled(Instant::now())))
        }
        Poll::Pending => Poll::Pending,
    }
}

fn end_for(order: CloseOrder) -> End {
    let label = if order.code == codes::OVER_CAPACITY {
        "slow_consumer"
    } else {
        "terminated"
    };
    End::close(order.code, order.reason, label)
}

impl Session {
    async fn serve<R, T>(&mut self, reader: &mut R, writer: &mut T) -> End
    where
        R: Stream<Item = Result<Message, WsError>> + Unpin,
        T: Transport,
    {
        // Node-wide signals (load state changes, drain) arrive through one
        // watch channel, awaited by a future created once and kept across
        // iterations: re-creating it would register and unregister every
        // socket in one shared waiter list on every message. A socket that
        // connects while the node is not normal is told at once.
        let mut rx = self.ctx.node.overload.subscribe();
        let (mut state, mut reloads) = {
            let s = rx.borrow_and_update();
            (s.state, s.reloads)
        };
        // A reload between the upgrade's look at the app and here is
        // judged now (later ones through the watch).
        let app = match self.current_app() {
            Ok(app) => app,
            Err(end) => return end,
        };
        // The app's write window (`write_delay`), in ms (≤ 1 s by config).
        let mut window = window_ms(&app);
        // Rooms' workers keep the window of a socket they write directly.
        self.out.set_window(window);
        let mut deadlines = {
            let live = self.ctx.node.live();
            let c = &live.config;
            // An app that requires authorized connections: sign in (or hold
            // a private or presence subscription) by then, or be closed
            // with 4009.
            let f = &app.features;
            let subscribe = c.limits.subscribe_deadline.get();
            Deadlines::new(
                Instant::now(),
                // The server pings after this much silence — sooner than the
                // activity_timeout advertised to the client (which pings on
                // its own after that), so a dead peer is found within
                // ping_interval + pong_timeout.
                c.server
                    .ping_interval
                    .get()
                    .min(c.server.activity_timeout.get()),
                c.server.pong_timeout.get(),
                c.limits.write_timeout.get(),
                (!subscribe.is_zero()).then_some(subscribe),
                f.require_user_authentication
                    .then_some(f.user_authentication_timeout),
            )
        };
        drop(app);
        if state != crate::overload::LoadState::Normal {
            self.out.push(&rx.borrow().frame);
        }
        let status = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let s = rx.borrow_and_update().clone();
            Some((s, rx))
        });
        tokio::pin!(status);

        // When the oldest frame being written was queued (delivery delay).
        let mut oldest: Option<Instant> = None;
        // A close order taken from the queue: it follows what is being written.
        let mut closing: Option<CloseOrder> = None;
        // One timer for every deadline of the socket, reset only when one changes.
        let timer = sleep_until(deadlines.first());
        tokio::pin!(timer);

        loop {
            // Not biased: reads, pongs and timers get their turn under a
            // sustained fan-out. The queue is taken only when the writer is
            // idle, so a stalled socket holds at most one queue's worth
            // outside the queue's own bounds.
            let busy = writer.is_busy();
            tokio::select! {
                _ = self.out.ready(), if !busy && closing.is_none() => {
                    // Room events of an app with a write window wait for
                    // it (the timer takes them); anything else goes now.
                    if let Some(at) = hold_until(&self.out, window) {
                        if timer.deadline() > at {
                            timer.as_mut().reset(at);
                        }
                    } else {
                        closing = take_queue(&self.out, writer, &mut oldest, &mut self.channels);
                        if !writer.is_busy() {
                            if let Some(order) = closing {
                                return end_for(order);
                            }
                        }
                    }
                }
                progress = std::future::poll_fn(|cx| poll_progress(writer, cx, &mut deadlines)), if busy => {
                    match progress {
                        Progress::Done => {
                            deadlines.unstalled();
                            self.out.written();
                            // Queued → handed to the kernel, for the oldest frame of the batch.
                            if let Some(t) = oldest.take() {
                                crate::outbound::delivery_delay().record(t.elapsed().as_secs_f64());
                            }
                            if let Some(order) = closing {
                                return end_for(order);
                            }
                            // Events held while this batch was written.
                            if window > 0 && self.out.held_since().is_some() {
                                match hold_until(&self.out, window) {
                                    Some(at) if timer.deadline() > at => timer.as_mut().reset(at),
                                    Some(_) => {}
                                    None => {
                                        closing = take_queue(&self.out, writer, &mut oldest, &mut self.channels);
                                        if !writer.is_busy() {
                                            if let Some(order) = closing {
                                                return end_for(order);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        Progress::Stalled(by) => {
                            if timer.deadline() > by {
                                timer.as_mut().reset(by);
                            }
                        }
                        Progress::Failed => return End::PeerGone,
                    }
                }
                Some(s) = status.next() => {
                    if s.reloads != reloads {
                        reloads = s.reloads;
                        match self.current_app() {
                            Ok(app) => {
                                // A window that changed applies to what is
                                // held too: the timer looks again now.
                                let now = window_ms(&app);
                                if now != window {
                                    window = now;
                                    self.out.set_window(now);
                                    timer.as_mut().reset(Instant::now());
                                }
                            }
                            Err(end) => {
                                tracing::debug!(?end, "closed by a config reload");
                                return end;
                            }
                        }
                    }
                    if s.state != state {
                        state = s.state;
                        self.out.push(&s.frame);
                    }
                    if s.closing && !deadlines.is_closing() {
                        // When the server drains, each socket picks its own
                        // moment within the drain period (the one in force
                        // now) to close, so reconnects reach other nodes
                        // spread out.
                        let drain_period = self.ctx.node.live().config.shutdown.drain_period.get();
                        let at = Instant::now() + drain_period.mul_f64(rand::random::<f64>());
                        if let Some(at) = deadlines.close_at(at) {
                            if timer.deadline() > at {
                                timer.as_mut().reset(at);
                            }
                        }
                    }
                }
                msg = reader.next() => {
                    deadlines.seen(Instant::now());
                    match msg {
                        None => return End::PeerGone,
                        Some(Ok(Message::Text(text))) => {
                            // Boxed: client messages are rare next to the
                            // socket's idle lifetime, and the handler's
                            // future is the largest state of this loop.
                            if let Err(end) = Box::pin(self.handle_text(text.as_str())).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            return End::close(codes::ws::UNSUPPORTED_DATA, "binary frames are not supported", "binary_frame");
                        }
                        Some(Ok(Message::Close(frame))) => {
                            // Answer the close handshake with the client's code.
                            let code = frame.map_or(1000, |f| u16::from(f.code));
                            self.out.detach();
                            if !writer.is_busy() {
                                take_queue(&self.out, writer, &mut oldest, &mut self.channels);
                            }
                            // Boxed: a rare step, kept out of the loop's future.
                            let _ = Box::pin(timeout(Duration::from_secs(1), writer.close(code, ""))).await;
                            return End::PeerGone;
                        }
                        Some(Ok(Message::Ping(payload))) => {
                            // Rooms stop writing in place until the pong is
                            // out, and a frame they left half-written goes first.
                            self.out.hold();
                            if !writer.is_busy() && closing.is_none() {
                                closing = take_queue(&self.out, writer, &mut oldest, &mut self.channels);
                            }
                            writer.pong(payload);
                        }
                        // Pongs (and raw frames) only count as activity.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return map_ws_error(e),
                    }
                }
                _ = &mut timer => {
                    // A write window that ended (or was shortened, or
                    // removed, by a reload): its events go out together.
                    if !writer.is_busy()
                        && closing.is_none()
                        && self.out.held_since().is_some()
                        && hold_until(&self.out, window).is_none()
                    {
                        closing = take_queue(&self.out, writer, &mut oldest, &mut self.channels);
                        if !writer.is_busy() {
                            if let Some(order) = closing {
                                return end_for(order);
                            }
                        }
                    }
                    let subscribed = || !self.channels.is_empty() || self.user.is_some();
                    match deadlines.due(Instant::now(), subscribed, || self.authorized()) {
                        Ok(wake) => {
                            if wake.ping {
                                self.out.push(&crate::protocol::ping());
                            }
                            let next = match hold_until(&self.out, window) {
                                Some(at) if at < wake.next => at,
                                _ => wake.next,
                            };
                            timer.as_mut().reset(next);
                        }
                        Err(expired) => return self.expired(expired),
                    }
                }
            }
        }
    }

    /// How a socket whose deadline passed is closed.
    fn expired(&self, expired: Expired) -> End {
        match expired {
            Expired::WriteStalled => {
                End::close(codes::OVER_CAPACITY, "write timeout", "write_timeout")
            }
            Expired::Drained => End::shutdown(),
            Expired::NoSubscription => End::close(
                codes::INACTIVE,
                "no subscription within the deadline",
                "idle_unsubscribed",
            ),
            Expired::NotAuthorized => {
                let why = "Connection not authorized within timeout";
                self.out
                    .push(&crate::protocol::error(Some(codes::UNAUTHORIZED), why));
                End::close(codes::UNAUTHORIZED, why, "not_authorized")
            }
            Expired::NoPong => End::close(
                codes::PONG_TIMEOUT,
                "pong reply not received",
                "pong_timeout",
            ),
        }
    }

    /// Leave every room and the user registry; called once, when the socket ends.
    async fn release(&mut self) {
        let held = Held {
            channels: std::mem::take(&mut self.channels),
            user: self.user.take(),
        };
        held.release(&self.ctx, &self.app.id, self.id, self.shed())
            .await;
    }
}

/// What a session holds in rooms and the user registry.
struct Held {
    channels: Vec<Channel>,
    user: Option<Box<SignedIn>>,
}

impl Held {
    async fn release(self, ctx: &Context, app: &Arc<str>, id: ConnId, shed: crate::types::Shed) {
        let router = &ctx.node.router;
        for ch in self.channels {
            let room = crate::types::RoomKey {
                app: app.clone(),
                channel: ch.name,
            };
            let _ = router
                .tell(Tell::Leave {
                    room,
                    conn: id,
                    shed,
                })
                .await;
        }
        if let Some(user) = self.user {
            user.release(router, app, id).await;
        }
    }
}

fn map_ws_error(e: WsError) -> End {
    use codes::ws;
    match e {
        WsError::Capacity(_) => {
            End::close(ws::MESSAGE_TOO_BIG, "message too big", "message_too_big")
        }
        WsError::Utf8(reason) if reason == ws_reader::INVALID_DEFLATE => End::close(
            ws::INVALID_PAYLOAD,
            "invalid compressed data",
            "invalid_deflate",
        ),
        WsError::Utf8(_) => End::close(ws::INVALID_PAYLOAD, "invalid UTF-8", "invalid_utf8"),
        WsError::Protocol(_) => End::close(
            ws::PROTOCOL_ERROR,
            "websocket protocol error",
            "protocol_error",
        ),
        _ => End::PeerGone,
    }
}

/// Send what is queued and a close frame, and give the peer a moment to
/// answer it, so the code reaches the client instead of being lost to a reset.
pub(crate) async fn close<R, T>(reader: &mut R, writer: &mut T, code: u16, reason: &'static str)
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    T: Transport,
{
    if !matches!(
        timeout(Duration::from_secs(2), writer.close(code, reason)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = reader.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    //! The session loop on an in-memory websocket pair, with paused time:
    //! timers are exercised without waiting for them.
    use super::*;
    use crate::config::Config;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tokio_tungstenite::WebSocketStream;

    async fn pair(
        extra: &str,
    ) -> (
        WebSocketStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<End>,
    ) {
        pair_with(extra, "").await
    }

    /// [`pair`], with `app_keys` in the app's table.
    async fn pair_with(
        extra: &str,
        app_keys: &str,
    ) -> (
        WebSocketStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<End>,
    ) {
        let (_, client, server) = pair_shared(extra, app_keys).await;
        (client, server)
    }

    /// [`pair_with`], and the session context.
    async fn pair_shared(
        extra: &str,
        app_keys: &str,
    ) -> (
        Arc<Context>,
        WebSocketStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<End>,
    ) {
        let text =
            format!("{extra}\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n{app_keys}\n");
        let ctx = Context::new(
            crate::state::Node::local(Config::from_toml_str(&text).unwrap())
                .unwrap()
                .0,
        );
        let app = ctx.node.live().apps.by_key("k").unwrap().clone();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                let (mut reader, mut writer) =
                    websocket::server(a, WebSocketConfig::default(), None, None);
                let mut session = Session::new(ctx, app);
                run(&mut reader, &mut writer, &mut session).await
            }
        });
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (ctx, client, server)
    }

    async fn assert_closed_with(server: tokio::task::JoinHandle<End>, code: u16) {
        let end = server.await.unwrap();
        assert!(
            matches!(end, End::Close { code: c, .. } if c == code),
            "{end:?}, expected {code}"
        );
    }

    async fn next_event(ws: &mut WebSocketStream<tokio::io::DuplexStream>) -> Option<String> {
        loop {
            match ws.next().await? {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                    return Some(v["event"].as_str().unwrap().to_string());
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Every byte of the session loop's future is paid by every idle
    /// socket (docs/BENCHMARKS.md: 912 bytes with its task, 2026-12-01;
    /// this loop alone was 896 bytes before its deadlines became one struct).
    /// The loop's state must not grow unnoticed.
    #[tokio::test]
    async fn the_session_loop_future_stays_small() {
        let text = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n";
        let ctx = Context::new(
            crate::state::Node::local(Config::from_toml_str(text).unwrap())
                .unwrap()
                .0,
        );
        let app = ctx.node.live().apps.by_key("k").unwrap().clone();
        let (a, _b) = tokio::io::duplex(1024);
        let (mut reader, mut writer) = websocket::server(a, WebSocketConfig::default(), None, None);
        let mut session = Session::new(ctx, app);
        let fut = run(&mut reader, &mut writer, &mut session);
        let size = std::mem::size_of_val(&fut);
        eprintln!("session loop future: {size} bytes");
        assert!(
            size <= 896,
            "the session loop's future grew to {size} bytes"
        );
    }

    /// A session on `config` (the app "k"), served in a task, with its
    /// outbound queue and context kept for the test to push to and reload.
    async fn served(
        config: &str,
    ) -> (
        Arc<Context>,
        Arc<Outbound>,
        WebSocketStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<End>,
    ) {
        let ctx = Context::new(
            crate::state::Node::local(Config::from_toml_str(config).unwrap())
                .unwrap()
                .0,
        );
        let app = ctx.node.live().apps.by_key("k").unwrap().clone();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut session = Session::new(ctx.clone(), app);
        let out = session.out.clone();
        let server = tokio::spawn(async move {
            let (mut reader, mut writer) =
                websocket::server(a, WebSocketConfig::default(), None, None);
            run(&mut reader, &mut writer, &mut session).await
        });
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (ctx, out, client, server)
    }

    /// `write_delay`: a room's events wait for the window that the first
    /// of them opened, then go out together; the socket's own answers are
    /// never held, and take what is waiting with them, in order.
    #[tokio::test(start_paused = true)]
    async fn room_events_wait_out_the_write_window_and_answers_do_not() {
        let text = "[limits]\nsubscribe_deadline = \"0s\"\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nwrite_delay = \"100ms\"\n";
        let (_ctx, out, mut client, server) = served(text).await;
        let t0 = Instant::now();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        assert_eq!(t0.elapsed(), Duration::ZERO, "its own answer is not held");

        let ev = |n: &str| crate::protocol::event(n, Some("c"), "{}");
        let t1 = Instant::now();
        out.push_shared(&ev("e1"));
        out.push_shared(&ev("e2"));
        tokio::time::advance(Duration::from_millis(40)).await;
        out.push_shared(&ev("e3"));
        for want in ["e1", "e2", "e3"] {
            assert_eq!(next_event(&mut client).await.as_deref(), Some(want));
        }
        assert_eq!(
            t1.elapsed(),
            Duration::from_millis(100),
            "one write when the window the first event opened ends"
        );

        let t2 = Instant::now();
        out.push_shared(&ev("e4"));
        tokio::time::advance(Duration::from_millis(10)).await;
        out.push(&crate::protocol::pong());
        assert_eq!(next_event(&mut client).await.as_deref(), Some("e4"));
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:pong")
        );
        assert_eq!(
            t2.elapsed(),
            Duration::from_millis(10),
            "an answer goes at once, with the event held before it"
        );

        // A window that opens again after an early flush is a new one.
        let t3 = Instant::now();
        out.push_shared(&ev("e5"));
        assert_eq!(next_event(&mut client).await.as_deref(), Some("e5"));
        assert_eq!(t3.elapsed(), Duration::from_millis(100));
        drop(client);
        server.await.unwrap();
    }

    /// A reload that removes the write window lets what is held go at once
    /// (and later events are not stuck behind it).
    #[tokio::test(start_paused = true)]
    async fn a_reload_that_removes_the_window_releases_what_is_held() {
        let with = |delay: &str| {
            format!("[limits]\nsubscribe_deadline = \"0s\"\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nwrite_delay = \"{delay}\"\n")
        };
        let (ctx, out, mut client, server) = served(&with("1s")).await;
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        out.push_shared(&crate::protocol::event("held", Some("c"), "{}"));
        tokio::time::advance(Duration::from_millis(100)).await;
        let t = Instant::now();
        crate::reload::apply(&ctx.node, None, Config::from_toml_str(&with("0s")).unwrap());
        assert_eq!(next_event(&mut client).await.as_deref(), Some("held"));
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "released by the reload, not the old window"
        );
        out.push_shared(&crate::protocol::event("after", Some("c"), "{}"));
        assert_eq!(next_event(&mut client).await.as_deref(), Some("after"));
        assert_eq!(t.elapsed(), Duration::ZERO);
        drop(client);
        server.await.unwrap();
    }

    /// Conflation in normal state (`[[apps.conflation]]`), on the paused
    /// clock: per key, the latest event goes out one interval after the
    /// first of that key's interval arrived.
    #[tokio::test(start_paused = true)]
    async fn conflated_events_go_once_per_interval_from_the_first_arrival() {
        let (ctx, mut client, _server) = pair_shared(
            "[limits]\nsubscribe_deadline = \"0s\"",
            "[[apps.conflation]]\nprefix = \"score-\"\ninterval = \"300ms\"\n",
        )
        .await;
        async fn next_with_data(
            ws: &mut WebSocketStream<tokio::io::DuplexStream>,
        ) -> (String, String) {
            loop {
                if let Ok(Message::Text(t)) = ws.next().await.unwrap() {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                    let data = v["data"].as_str().unwrap_or_default().to_string();
                    return (v["event"].as_str().unwrap().to_string(), data);
                }
            }
        }
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        let sub = r#"{"event":"pusher:subscribe","data":{"channel":"score-a"}}"#;
        client.send(Message::Text(sub.into())).await.unwrap();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher_internal:subscription_succeeded")
        );
        let room = crate::types::RoomKey {
            app: "1".into(),
            channel: "score-a".into(),
        };
        // A publish is in the owner's mailbox when this returns; asking the
        // owner about the room after it waits until it was handled (one
        // mailbox, in order), so the clock moves only after that.
        let publish = |name: &'static str, data: &'static str| {
            let (ctx, room) = (ctx.clone(), room.clone());
            async move {
                let router = &ctx.node.router;
                let frame = crate::protocol::event(name, Some("score-a"), data);
                let wait = Duration::from_secs(1);
                router
                    .publish(room.clone(), frame, None, None, wait)
                    .await?;
                router
                    .ask(crate::op::Ask::Info { room }, wait)
                    .await
                    .map(drop)
            }
        };
        let t0 = Instant::now();
        publish("goal", "1").await.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        publish("goal", "2").await.unwrap();
        publish("corner", "1").await.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        publish("goal", "3").await.unwrap();
        assert_eq!(
            next_with_data(&mut client).await,
            ("goal".into(), "3".into())
        );
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(300),
            "one interval after the first goal"
        );
        assert_eq!(
            next_with_data(&mut client).await,
            ("corner".into(), "1".into())
        );
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(400),
            "one interval after the corner, which came 100 ms later"
        );
        // The next interval starts with the next event.
        tokio::time::advance(Duration::from_millis(50)).await;
        let t1 = Instant::now();
        publish("goal", "4").await.unwrap();
        assert_eq!(
            next_with_data(&mut client).await,
            ("goal".into(), "4".into())
        );
        assert_eq!(t1.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_socket_gets_a_ping_then_4201_after_the_pong_wait() {
        let (mut client, server) = pair("[server]\nactivity_timeout = \"10s\"\npong_timeout = \"5s\"\n[limits]\nsubscribe_deadline = \"0s\"").await;
        let start = Instant::now();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:ping")
        );
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(next_event(&mut client).await, None, "the close frame");
        assert_eq!(start.elapsed(), Duration::from_secs(15));
        assert_closed_with(server, codes::PONG_TIMEOUT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_peer_is_found_within_75_s_while_120_s_is_advertised() {
        // Defaults: activity_timeout 120 s (what pusher-js is told),
        // ping_interval 45 s, pong_timeout 30 s.
        let (mut client, server) = pair("[limits]\nsubscribe_deadline = \"0s\"").await;
        let start = Instant::now();
        let first = loop {
            if let Message::Text(t) = client.next().await.unwrap().unwrap() {
                break t;
            }
        };
        let v: serde_json::Value = serde_json::from_str(first.as_str()).unwrap();
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["activity_timeout"], 120);
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:ping")
        );
        assert_eq!(start.elapsed(), Duration::from_secs(45));
        assert_eq!(next_event(&mut client).await, None, "the close frame");
        assert_eq!(start.elapsed(), Duration::from_secs(75));
        assert_closed_with(server, codes::PONG_TIMEOUT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_requiring_authorization_closes_an_anonymous_socket_4009_at_its_deadline() {
        let (mut client, server) = pair_with(
            "[limits]\nsubscribe_deadline = \"0s\"",
            "require_user_authentication = true\nuser_authentication_timeout = \"30s\"",
        )
        .await;
        let start = Instant::now();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        // A public subscription is not an authorization.
        let sub = r#"{"event":"pusher:subscribe","data":{"channel":"lobby"}}"#;
        client.send(Message::Text(sub.into())).await.unwrap();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher_internal:subscription_succeeded")
        );
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:error")
        );
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_closed_with(server, codes::UNAUTHORIZED).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_wakeup_does_not_cut_the_pong_wait_short() {
        // Ping at 2 s; the subscribe deadline wakes the loop at 5 s while the
        // pong is still awaited; the close must wait for 2 s + 10 s.
        let (mut client, server) =
            pair("[server]\nactivity_timeout = \"2s\"\npong_timeout = \"10s\"\n[limits]\nsubscribe_deadline = \"5s\"").await;
        let start = Instant::now();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        let sub = r#"{"event":"pusher:subscribe","data":{"channel":"lobby"}}"#;
        client.send(Message::Text(sub.into())).await.unwrap();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher_internal:subscription_succeeded")
        );
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:ping")
        );
        assert_eq!(next_event(&mut client).await, None, "the close frame");
        assert_eq!(start.elapsed(), Duration::from_secs(12));
        assert_closed_with(server, codes::PONG_TIMEOUT).await;
    }

    /// A session task that ends without its own teardown (aborted here; a
    /// panic unwinds through the same `Drop`) still leaves its rooms, so no
    /// ghost subscriber is counted or written to.
    #[tokio::test]
    async fn a_session_that_dies_mid_flight_still_leaves_its_rooms() {
        let (ctx, mut client, server) = pair_shared("", "").await;
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        let sub = r#"{"event":"pusher:subscribe","data":{"channel":"lobby"}}"#;
        client.send(Message::Text(sub.into())).await.unwrap();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher_internal:subscription_succeeded")
        );
        let room = crate::types::RoomKey {
            app: "1".into(),
            channel: "lobby".into(),
        };
        let count = || async {
            let ask = crate::op::Ask::Info { room: room.clone() };
            let info = ctx.node.router.ask(ask, Duration::from_secs(5)).await;
            info.and_then(crate::op::Answer::info)
                .unwrap()
                .subscription_count
        };
        assert_eq!(count().await, 1);
        server.abort();
        assert!(server.await.unwrap_err().is_cancelled());
        // The release runs on a task of its own: wait for it, not for a time.
        timeout(Duration::from_secs(10), async {
            while count().await != 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the aborted session's subscription was released");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_never_subscribes_is_closed_4202_at_the_deadline() {
        let (mut client, server) = pair("[limits]\nsubscribe_deadline = \"30s\"").await;
        let start = Instant::now();
        assert_eq!(
            next_event(&mut client).await.as_deref(),
            Some("pusher:connection_established")
        );
        assert_eq!(next_event(&mut client).await, None, "the close frame");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_closed_with(server, codes::INACTIVE).await;
    }
}
