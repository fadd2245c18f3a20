//! One Pusher client socket: one task, small state.
//!
//! Life of a socket: TCP (+TLS) connect, WebSocket upgrade (an HTTP refusal such as 503 is
//! recorded by status), `pusher:connection_established`, one `pusher:subscribe` per channel,
//! `pusher_internal:subscription_succeeded` for each; then it answers pings and checks every
//! `load` event: latency = now − the publisher's timestamp, duplicate detection per channel with
//! a 64-wide sliding window over the channel's sequence numbers, and credit to the shared
//! publish ledger (see `shm`). A close before the socket is ready counts as a refusal by close
//! code; after, as a drop. Everything is bounded by the per-socket connect deadline.

use crate::cli::{ChannelKind, Plan};
use crate::ctx::{Fail, Outcome, WorkerCtx};
use crate::hist::bucket_of;
use crate::net::{self, Conn};
use futures_util::{SinkExt, StreamExt};
use pusher_sign as sign;
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

type Ws = WebSocketStream<Conn>;

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Duplicate detector for one channel: highest seq seen and a bitmap of the 64 below it.
#[derive(Default, Clone, Copy)]
pub struct SeqWindow {
    max: u64,
    mask: u64,
}

impl SeqWindow {
    /// Records `seq`; true if it was already seen. Seqs more than 64 behind count as new.
    pub fn seen(&mut self, seq: u64) -> bool {
        if seq > self.max {
            let shift = seq - self.max;
            self.mask = if shift >= 64 { 0 } else { self.mask << shift };
            self.mask |= 1;
            self.max = seq;
            return false;
        }
        let d = self.max - seq;
        if d >= 64 {
            return false;
        }
        let dup = self.mask & (1 << d) != 0;
        self.mask |= 1 << d;
        dup
    }
}

const SUB_PENDING: u8 = 0;
const SUB_OK: u8 = 1;
const SUB_FAILED: u8 = 2;

struct Chan {
    idx: u32,
    state: u8,
    window: SeqWindow,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Established {
    socket_id: String,
    activity_timeout: Option<u64>,
}

#[derive(Deserialize)]
struct Payload {
    seq: u64,
    id: u64,
    t: u64,
}

#[derive(Deserialize)]
struct PusherError {
    code: Option<u16>,
}

/// Why the read loop stopped.
enum End {
    Shutdown,
    Recycle,
    SetupTimeout,
    Closed(Option<u16>),
    Error(String),
}

/// Connects socket `g` and runs it until shutdown, recycle, failure or drop.
/// `first` is true until this slot's first attempt has been resolved (ready or failed).
pub async fn run_socket(
    ctx: &WorkerCtx,
    g: usize,
    src: Option<Ipv4Addr>,
    recycle: Option<&Notify>,
    shutdown: &mut watch::Receiver<bool>,
    first: &mut bool,
) -> Outcome {
    ctx.stats.attempted.fetch_add(1, Relaxed);
    ctx.shm.header().attempted.fetch_add(1, Relaxed);
    let t0 = Instant::now();
    let deadline =
        tokio::time::Instant::from_std(t0 + Duration::from_secs_f64(ctx.plan.connect_timeout));
    let ws = tokio::select! {
        r = timeout_at(deadline, open(ctx, src)) => match r {
            Ok(Ok(ws)) => ws,
            Ok(Err(f)) => return ctx.fail(first, f),
            Err(_) => return ctx.fail(first, Fail::Other("timeout_handshake".into())),
        },
        _ = wait_shutdown(shutdown) => return Outcome::Shutdown,
    };
    ctx.h_handshake.record(t0.elapsed().as_micros() as u64);
    let chans = ctx.plan.channels_of(g).map(|c| Chan {
        idx: c as u32,
        state: SUB_PENDING,
        window: SeqWindow::default(),
    });
    let mut s = Session {
        ctx,
        g,
        t0,
        chans: chans.collect(),
        pending: 0,
        established: false,
        ready: false,
        err_code: None,
    };
    let end = s.read_loop(ws, deadline, recycle, shutdown, first).await;
    s.finish(end, first)
}

async fn open(ctx: &WorkerCtx, src: Option<Ipv4Addr>) -> Result<Ws, Fail> {
    let conn = net::connect(&ctx.plan.ws, src, ctx.tls.as_ref())
        .await
        .map_err(|e| Fail::Connect(e.label()))?;
    ctx.stats.tcp_connected.fetch_add(1, Relaxed);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let mut request = ctx
        .plan
        .socket_url
        .as_str()
        .into_client_request()
        .map_err(|e| Fail::Other(ws_error_label(&e)))?;
    let conn = match ctx.plan.deflate {
        None => conn,
        Some(d) => {
            if d == crate::cli::OnOff::On {
                request.headers_mut().insert(
                    "sec-websocket-extensions",
                    http::HeaderValue::from_static(crate::wire::OFFER),
                );
            }
            Conn::Wire(Box::new(crate::wire::Wire::new(conn, ctx.wire.clone())))
        }
    };
    match client_async_with_config(request, conn, Some(config)).await {
        Ok((ws, _response)) => {
            ctx.stats.upgraded.fetch_add(1, Relaxed);
            Ok(ws)
        }
        Err(WsError::Http(resp)) => Err(Fail::Http(resp.status().as_u16())),
        Err(e) => Err(Fail::Other(ws_error_label(&e))),
    }
}

fn ws_error_label(e: &WsError) -> String {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => "ws_closed".into(),
        WsError::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionReset => "ws_reset".into(),
            std::io::ErrorKind::UnexpectedEof => "ws_eof".into(),
            k => format!("ws_io_{k:?}").to_lowercase(),
        },
        WsError::Protocol(_) => "ws_protocol".into(),
        WsError::Tls(_) => "tls".into(),
        WsError::Capacity(_) => "ws_capacity".into(),
        _ => "ws_other".into(),
    }
}

struct Session<'a> {
    ctx: &'a WorkerCtx,
    g: usize,
    t0: Instant,
    chans: Vec<Chan>,
    pending: usize,
    established: bool,
    ready: bool,
    /// Code of a `pusher:error` seen before the close (a close without code uses it).
    err_code: Option<u16>,
}

impl Session<'_> {
    async fn read_loop(
        &mut self,
        mut ws: Ws,
        deadline: tokio::time::Instant,
        recycle: Option<&Notify>,
        shutdown: &mut watch::Receiver<bool>,
        first: &mut bool,
    ) -> End {
        let mut activity = Duration::from_secs(120);
        let mut last_rx = Instant::now();
        let ping = sleep(Duration::from_secs(86_400));
        tokio::pin!(ping);
        // The clap wave: one client event every 1/rate s, first at a random
        // phase (sockets spread over the second), while the run measures.
        let clap_every = (self.ctx.plan.client_event_rate > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.ctx.plan.client_event_rate));
        let clap = sleep(clap_every.map_or(Duration::from_secs(86_400), |e| {
            e.mul_f64(rand::random::<f64>())
        }));
        tokio::pin!(clap);
        let end = loop {
            let ready = self.ready;
            let setup = async move {
                if ready {
                    std::future::pending::<()>().await
                } else {
                    sleep_until(deadline).await
                }
            };
            let recycle_now = async {
                match recycle {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wait_shutdown(shutdown) => break End::Shutdown,
                _ = recycle_now, if ready => break End::Recycle,
                _ = setup => break End::SetupTimeout,
                _ = &mut clap, if clap_every.is_some() => {
                    let every = clap_every.expect("clapping");
                    clap.as_mut().reset(tokio::time::Instant::now() + every);
                    if ready && self.measuring() {
                        if let Some(c) = self.chans.iter().find(|c| c.state == SUB_OK) {
                            let channel = self.ctx.plan.channel_name(c.idx as usize);
                            let msg = format!(r#"{{"event":"client-reaction","channel":"{channel}","data":{{"emoji":"👏"}}}}"#);
                            if ws.send(Message::text(msg)).await.is_err() {
                                break End::Error("send".into());
                            }
                            self.ctx.stats.client_events_sent.fetch_add(1, Relaxed);
                        }
                    }
                }
                _ = &mut ping => {
                    // pusher-js behaviour: ping after `activity_timeout` of silence.
                    let idle = last_rx.elapsed();
                    if idle >= activity {
                        if ws.send(Message::text(r#"{"event":"pusher:ping","data":{}}"#)).await.is_err() {
                            break End::Error("send".into());
                        }
                        self.ctx.stats.pings_sent.fetch_add(1, Relaxed);
                        ping.as_mut().reset(tokio::time::Instant::now() + activity);
                    } else {
                        ping.as_mut().reset(tokio::time::Instant::now() + (activity - idle));
                    }
                }
                msg = ws.next() => {
                    last_rx = Instant::now();
                    match msg {
                        None => break End::Closed(None),
                        Some(Err(e)) => break End::Error(ws_error_label(&e)),
                        Some(Ok(Message::Close(f))) => break End::Closed(f.map(|f| u16::from(f.code))),
                        Some(Ok(Message::Text(t))) => {
                            let was_established = self.established;
                            if let Err(e) = self.on_text(&mut ws, t.as_str(), &mut activity, first).await {
                                break e;
                            }
                            if !was_established && self.established {
                                ping.as_mut().reset(tokio::time::Instant::now() + activity);
                            }
                        }
                        Some(Ok(_)) => {} // WebSocket pings are answered by tungstenite
                    }
                }
            }
        };
        if matches!(end, End::Shutdown | End::Recycle) {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
        }
        end
    }

    async fn on_text(
        &mut self,
        ws: &mut Ws,
        text: &str,
        activity: &mut Duration,
        first: &mut bool,
    ) -> Result<(), End> {
        let ctx = self.ctx;
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            ctx.stats.other_events.fetch_add(1, Relaxed);
            return Ok(());
        };
        let data = match &frame.data {
            Some(serde_json::Value::String(s)) => std::borrow::Cow::Borrowed(s.as_str()),
            Some(v) => std::borrow::Cow::Owned(v.to_string()),
            None => std::borrow::Cow::Borrowed(""),
        };
        let channel = frame.channel.as_deref().unwrap_or("");
        match frame.event.as_ref() {
            "load" => self.on_delivery(channel, &data),
            "pusher:connection_established" if !self.established => {
                let Ok(est) = serde_json::from_str::<Established>(&data) else {
                    return Err(End::Error("bad_connection_established".into()));
                };
                if let Some(t) = est.activity_timeout.filter(|&t| t > 0) {
                    *activity = Duration::from_secs(t);
                }
                self.established = true;
                ctx.stats.established.fetch_add(1, Relaxed);
                ctx.shm.header().established.fetch_add(1, Relaxed);
                ctx.shm.header().open.fetch_add(1, Relaxed);
                for i in 0..self.chans.len() {
                    let msg = self.subscribe_frame(self.chans[i].idx as usize, &est.socket_id);
                    ws.send(Message::text(msg))
                        .await
                        .map_err(|e| End::Error(ws_error_label(&e)))?;
                }
                self.pending = self.chans.len();
                self.check_ready(first);
            }
            "pusher_internal:subscription_succeeded" | "pusher:subscription_error" => {
                let ok = frame.event.as_ref() == "pusher_internal:subscription_succeeded";
                let idx = Plan::channel_index(channel);
                if let Some(ch) = self
                    .chans
                    .iter_mut()
                    .find(|c| Some(c.idx as usize) == idx && c.state == SUB_PENDING)
                {
                    if ok {
                        ch.state = SUB_OK;
                        ctx.shm.chan_subs()[ch.idx as usize].fetch_add(1, Relaxed);
                        ctx.stats.subscriptions_ok.fetch_add(1, Relaxed);
                    } else {
                        ch.state = SUB_FAILED;
                        ctx.stats.subscription_errors.fetch_add(1, Relaxed);
                    }
                    self.pending -= 1;
                    self.check_ready(first);
                } else if !ok {
                    ctx.stats.subscription_errors.fetch_add(1, Relaxed);
                }
            }
            "pusher:ping" => {
                ws.send(Message::text(r#"{"event":"pusher:pong","data":{}}"#))
                    .await
                    .map_err(|e| End::Error(ws_error_label(&e)))?;
                ctx.stats.pongs_sent.fetch_add(1, Relaxed);
            }
            "pusher:pong" => {}
            "pusher_internal:member_added" | "pusher_internal:member_removed" => {
                if self.measuring() {
                    ctx.stats.member_events_received.fetch_add(1, Relaxed);
                }
            }
            "herdgate:presence_count" => {
                if self.measuring() {
                    ctx.stats.presence_counts_received.fetch_add(1, Relaxed);
                }
            }
            "herdgate:tally" => {
                if self.measuring() {
                    ctx.stats.tallies_received.fetch_add(1, Relaxed);
                }
            }
            e if e.starts_with("client-") => {
                if self.measuring() {
                    ctx.stats.client_events_received.fetch_add(1, Relaxed);
                }
            }
            "pusher:error" => match serde_json::from_str::<PusherError>(&data)
                .ok()
                .and_then(|e| e.code)
            {
                Some(code) => self.err_code = Some(code),
                None => ctx.error("pusher_error_no_code"),
            },
            _ => {
                ctx.stats.other_events.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    fn measuring(&self) -> bool {
        self.ctx.shm.header().phase.load(Relaxed) == crate::shm::PHASE_MEASURING
    }

    fn subscribe_frame(&self, idx: usize, socket_id: &str) -> String {
        let p = &self.ctx.plan;
        let channel = p.channel_name(idx);
        let mut data = serde_json::json!({ "channel": channel });
        match p.kind {
            ChannelKind::Public => {}
            ChannelKind::Private => {
                data["auth"] =
                    sign::channel_auth(&p.key, &p.secret, socket_id, &channel, None).into();
            }
            ChannelKind::Presence => {
                let cd = format!(r#"{{"user_id":"u{}","user_info":{{}}}}"#, self.g);
                data["auth"] =
                    sign::channel_auth(&p.key, &p.secret, socket_id, &channel, Some(&cd)).into();
                data["channel_data"] = cd.into();
            }
        }
        if p.resume {
            data["resume"] = serde_json::json!({});
        }
        serde_json::json!({ "event": "pusher:subscribe", "data": data }).to_string()
    }

    fn check_ready(&mut self, first: &mut bool) {
        if self.established && self.pending == 0 && !self.ready {
            self.ready = true;
            self.ctx
                .h_ready
                .record(self.t0.elapsed().as_micros() as u64);
            if self.chans.iter().any(|c| c.state == SUB_OK) || self.chans.is_empty() {
                self.ctx.stats.ready.fetch_add(1, Relaxed);
            }
            self.ctx.resolve_first(first, true);
        }
    }

    fn on_delivery(&mut self, channel: &str, data: &str) {
        let ctx = self.ctx;
        let idx = Plan::channel_index(channel);
        let Some(ch) = self.chans.iter_mut().find(|c| Some(c.idx as usize) == idx) else {
            ctx.error("event_on_unsubscribed_channel");
            return;
        };
        let Ok(p) = serde_json::from_str::<Payload>(data) else {
            ctx.error("bad_event_payload");
            return;
        };
        if ch.window.seen(p.seq) {
            ctx.stats.duplicates.fetch_add(1, Relaxed);
            return;
        }
        let latency = now_micros().saturating_sub(p.t);
        ctx.h_delivery.record(latency);
        ctx.shm.live_hist()[bucket_of(latency)].fetch_add(1, Relaxed);
        ctx.shm.header().delivered.fetch_add(1, Relaxed);
        ctx.stats.delivered.fetch_add(1, Relaxed);
        if !ctx.shm.ledger_deliver(p.id) {
            ctx.stats.late.fetch_add(1, Relaxed);
        }
    }

    /// Books the end of the socket and releases its share of the shared counters.
    fn finish(&mut self, end: End, first: &mut bool) -> Outcome {
        let ctx = self.ctx;
        for ch in self.chans.iter().filter(|c| c.state == SUB_OK) {
            ctx.shm.chan_subs()[ch.idx as usize].fetch_sub(1, Relaxed);
        }
        if self.established {
            ctx.shm.header().open.fetch_sub(1, Relaxed);
        }
        let code = |c: Option<u16>| c.filter(|&c| c != 1005).or(self.err_code);
        match end {
            End::Shutdown => Outcome::Shutdown,
            End::Recycle => {
                ctx.stats.recycled.fetch_add(1, Relaxed);
                Outcome::Recycled
            }
            End::SetupTimeout => {
                let what = if self.established {
                    "timeout_subscribe"
                } else {
                    "timeout_established"
                };
                ctx.fail(first, Fail::Other(what.into()))
            }
            End::Closed(c) if !self.ready => match code(c) {
                Some(c) => ctx.fail(first, Fail::Close(c)),
                None => ctx.fail(first, Fail::Other("closed_before_ready".into())),
            },
            End::Error(label) if !self.ready => ctx.fail(first, Fail::Other(label)),
            End::Closed(c) => {
                ctx.dropped(code(c).map(Ok).unwrap_or(Err("dropped_eof")));
                Outcome::Dropped
            }
            End::Error(label) => {
                ctx.dropped(Err(&format!("dropped_{label}")));
                Outcome::Dropped
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SeqWindow;

    #[test]
    fn seq_window_detects_duplicates_and_tolerates_reordering() {
        let mut w = SeqWindow::default();
        assert!(!w.seen(1));
        assert!(!w.seen(3));
        assert!(!w.seen(2), "late but new");
        assert!(w.seen(2));
        assert!(w.seen(3));
        assert!(!w.seen(100));
        assert!(w.seen(100));
        assert!(!w.seen(37), "63 behind, new");
        assert!(w.seen(37));
        assert!(!w.seen(36), "64 behind: outside the window, counted as new");
    }
}
