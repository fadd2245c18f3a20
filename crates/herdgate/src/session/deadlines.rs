//! Every deadline of one socket, in one place.
//!
//! A socket has up to six: the activity ping and its pong, the first
//! subscription (`limits.subscribe_deadline`), authorization (apps that
//! require it), its own moment to close while the node drains, and a
//! stalled write. The session loop keeps one timer, armed at the earliest
//! of them ([`Deadlines::next`]), and asks [`Deadlines::due`] what a wake-up
//! means. Kept apart from the loop so the rules read as rules, and so the
//! loop's future holds them in one struct.

use std::time::Duration;
use tokio::time::Instant;

pub(super) struct Deadlines {
    /// The server pings after this much silence.
    activity: Duration,
    /// How long a ping waits for any answer.
    pong_wait: Duration,
    /// How long a write may stall.
    write_timeout: Duration,
    /// When the peer last sent anything.
    last_seen: Instant,
    /// When the server pinged and has not heard back since.
    pinged_at: Option<Instant>,
    /// A new socket must subscribe (or sign in) by then.
    subscribe_by: Option<Instant>,
    /// An app that requires authorization: sign in (or hold a private or
    /// presence channel) by then.
    auth_by: Option<Instant>,
    /// The node drains: this socket's own moment to close.
    close_at: Option<Instant>,
    /// Set while a write is stalled: the write deadline runs from there.
    stalled: Option<Instant>,
}

/// A deadline that ended the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    WriteStalled,
    Drained,
    NoSubscription,
    NotAuthorized,
    NoPong,
}

/// What the session must do after a wake-up that ended nothing.
pub(super) struct Wake {
    /// Send a ping now.
    pub ping: bool,
    /// Re-arm the timer here.
    pub next: Instant,
}

impl Deadlines {
    pub fn new(
        now: Instant,
        activity: Duration,
        pong_wait: Duration,
        write_timeout: Duration,
        subscribe_within: Option<Duration>,
        auth_within: Option<Duration>,
    ) -> Deadlines {
        Deadlines {
            activity,
            pong_wait,
            write_timeout,
            last_seen: now,
            pinged_at: None,
            subscribe_by: subscribe_within.map(|d| now + d),
            auth_by: auth_within.map(|d| now + d),
            close_at: None,
            stalled: None,
        }
    }

    /// The earliest deadline: where the timer goes first.
    pub fn first(&self) -> Instant {
        [self.subscribe_by, self.auth_by]
            .into_iter()
            .flatten()
            .fold(self.last_seen + self.activity, Instant::min)
    }

    /// The peer sent something.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// A write stopped making progress at `at`: the earliest the timer must
    /// now fire.
    pub fn stalled(&mut self, at: Instant) -> Instant {
        self.stalled = Some(at);
        at + self.write_timeout
    }

    /// The stalled write completed.
    pub fn unstalled(&mut self) {
        self.stalled = None;
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// The node drains: close at `at` (once; later calls change nothing).
    /// The earliest the timer must now fire, if this set it.
    pub fn close_at(&mut self, at: Instant) -> Option<Instant> {
        if self.close_at.is_some() {
            return None;
        }
        self.close_at = Some(at);
        Some(at)
    }

    pub fn is_closing(&self) -> bool {
        self.close_at.is_some()
    }

    /// What the timer firing at `now` means. `subscribed` and `authorized`
    /// are asked only when their deadline has passed; a deadline met is
    /// cleared.
    pub fn due(
        &mut self,
        now: Instant,
        subscribed: impl FnOnce() -> bool,
        authorized: impl FnOnce() -> bool,
    ) -> Result<Wake, Expired> {
        if self
            .stalled
            .is_some_and(|at| now >= at + self.write_timeout)
        {
            return Err(Expired::WriteStalled);
        }
        if self.close_at.is_some_and(|at| now >= at) {
            return Err(Expired::Drained);
        }
        if self.subscribe_by.is_some_and(|by| now >= by) {
            if !subscribed() {
                return Err(Expired::NoSubscription);
            }
            self.subscribe_by = None;
        }
        if self.auth_by.is_some_and(|by| now >= by) {
            if !authorized() {
                return Err(Expired::NotAuthorized);
            }
            self.auth_by = None;
        }
        let mut ping = false;
        let next = match self.pinged_at {
            Some(at) if self.last_seen <= at && now >= at + self.pong_wait => {
                return Err(Expired::NoPong);
            }
            // Woken early (drain, subscribe or write deadline): keep waiting for the pong.
            Some(at) if self.last_seen <= at => at + self.pong_wait,
            _ if now >= self.last_seen + self.activity => {
                ping = true;
                self.pinged_at = Some(now);
                now + self.pong_wait
            }
            _ => {
                self.pinged_at = None;
                self.last_seen + self.activity
            }
        };
        let next = [
            self.close_at,
            self.subscribe_by,
            self.auth_by,
            self.stalled.map(|at| at + self.write_timeout),
        ]
        .into_iter()
        .flatten()
        .fold(next, Instant::min);
        Ok(Wake { ping, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn deadlines(now: Instant) -> Deadlines {
        // Ping after 10 s of silence, 3 s for the pong, 5 s write stall,
        // subscribe within 4 s; no authorization deadline.
        Deadlines::new(now, 10 * S, 3 * S, 5 * S, Some(4 * S), None)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_socket_is_pinged_then_closed_without_a_pong() {
        let t0 = Instant::now();
        let mut d = deadlines(t0);
        assert_eq!(d.first(), t0 + 4 * S);
        let w = d.due(t0 + 4 * S, || true, || true).unwrap();
        assert!(!w.ping);
        assert_eq!(w.next, t0 + 10 * S);
        let w = d.due(t0 + 10 * S, || true, || true).unwrap();
        assert!(w.ping);
        assert_eq!(w.next, t0 + 13 * S);
        assert_eq!(
            d.due(t0 + 13 * S, || true, || true).err(),
            Some(Expired::NoPong)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_to_the_ping_keeps_the_socket() {
        let t0 = Instant::now();
        let mut d = deadlines(t0);
        d.due(t0 + 4 * S, || true, || true).unwrap();
        assert!(d.due(t0 + 10 * S, || true, || true).unwrap().ping);
        d.seen(t0 + 11 * S);
        let w = d.due(t0 + 13 * S, || true, || true).unwrap();
        assert!(!w.ping);
        assert_eq!(w.next, t0 + 21 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_subscription_and_authorization_are_due_once() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 10 * S, 3 * S, 5 * S, Some(4 * S), Some(6 * S));
        assert_eq!(
            d.due(t0 + 4 * S, || false, || unreachable!()).err(),
            Some(Expired::NoSubscription)
        );
        let mut d = Deadlines::new(t0, 10 * S, 3 * S, 5 * S, Some(4 * S), Some(6 * S));
        // Met: asked once, then cleared.
        let w = d.due(t0 + 4 * S, || true, || unreachable!()).unwrap();
        assert_eq!(w.next, t0 + 6 * S);
        assert_eq!(
            d.due(t0 + 6 * S, || unreachable!(), || false).err(),
            Some(Expired::NotAuthorized)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_and_a_drain_end_the_socket_at_their_time() {
        let t0 = Instant::now();
        let mut d = deadlines(t0);
        assert_eq!(d.stalled(t0 + S), t0 + 6 * S);
        let w = d.due(t0 + 4 * S, || true, || true).unwrap();
        assert_eq!(w.next, t0 + 6 * S, "the stall is the earliest");
        assert_eq!(
            d.due(t0 + 6 * S, || true, || true).err(),
            Some(Expired::WriteStalled)
        );
        let mut d = deadlines(t0);
        assert_eq!(d.close_at(t0 + 2 * S), Some(t0 + 2 * S));
        assert_eq!(d.close_at(t0 + S), None, "set once");
        assert_eq!(
            d.due(t0 + 2 * S, || true, || true).err(),
            Some(Expired::Drained)
        );
    }
}
