//! A session's side of auth grants (docs/PROTOCOL.md "Auth grants"): taking
//! a channel by a grant, handing one out after a subscription, and
//! renewing one on a live socket (`herdgate:grant` from the client).
//!
//! The checks are [`crate::auth::grant`]'s (pure); here is what depends on
//! the socket: who it is signed in as, its channel-operation bucket, and
//! the node-wide budget of signature checks.

use super::{End, Session};
use crate::apps::{App, GrantSettings};
use crate::auth::grant::{self, Grant, Kind, Limits};
use crate::protocol;
use std::sync::Arc;

type Handled = Result<(), End>;

/// A `herdgate:grant` from the client: renew the grant of a channel it
/// holds (or, with `signin`, of its sign-in), presenting the current one
/// over this socket.
#[derive(Debug, serde::Deserialize)]
pub struct Renew {
    #[serde(default)]
    pub channel: String,
    pub auth: String,
    #[serde(default)]
    pub channel_data: Option<String>,
    #[serde(default)]
    pub signin: bool,
    #[serde(default)]
    pub user_data: Option<String>,
}

impl Session {
    /// The user a grant presented on this socket must name: the one it is
    /// signed in as now ("" when it is not signed in).
    pub(super) fn grant_user(&self) -> &str {
        self.user.as_ref().map_or("", |u| &u.id)
    }

    /// The grant to hand out after a subscription to `channel` succeeds:
    /// renewing `taken` (pinned to its key and its first authorization), or
    /// a first one for the key the client offered.
    pub(super) fn grant_for(
        &self,
        settings: GrantSettings,
        channel: &str,
        data: Option<&str>,
        taken: Option<Grant>,
        offered: Option<&protocol::GrantOffer>,
        now: u64,
    ) -> Option<Grant> {
        let ttl = settings.ttl.as_secs();
        if let Some(g) = taken {
            return renewed(settings, g, now);
        }
        let key = grant::parse_key(&offered?.key)?;
        Some(Grant {
            kind: Kind::Channel,
            authorized: now,
            issued: now,
            expires: now + ttl,
            key,
            name: channel.to_string(),
            data_hash: grant::data_hash(data.unwrap_or("")),
            user: self.grant_user().to_string(),
        })
    }

    /// Check a sign-in grant presented in a `pusher:signin`'s `auth` (with
    /// the `user_data` it was made for): the grant, or why not (a
    /// `herdgate:grant` refusal reason).
    pub(super) fn take_signin_grant(
        &mut self,
        app: &App,
        d: &protocol::SigninData,
        now: u64,
    ) -> Result<Grant, &'static str> {
        let Some(settings) = app.features.auth_grants else {
            return Err("off");
        };
        self.check_presented(
            app,
            settings,
            (Kind::SignIn, ""),
            &d.user_data,
            &d.auth,
            now,
        )
        .map_err(grant::Refused::label)
    }

    /// Check a presentation (`auth`) of a grant of `kind` and name, for
    /// `data`, on this socket: the grant (its proof kept: the socket's next
    /// presentations skip the signature), or why not (counted).
    fn check_presented(
        &mut self,
        app: &App,
        settings: GrantSettings,
        (kind, name): (Kind, &str),
        data: &str,
        auth: &str,
        now: u64,
    ) -> Result<Grant, grant::Refused> {
        let presented = grant::Presented {
            auth,
            kind,
            name,
            socket_id: &self.socket_id(),
            data,
        };
        let limits = Limits {
            ttl: settings.ttl.as_secs(),
            max_age: settings.max_age.as_secs(),
        };
        let proven = self.proven.as_deref();
        let budget = || self.ctx.grant_checks();
        let creds = (&*app.id, &*app.key, &*app.secret);
        match grant::check(creds, &presented, limits, now, proven, budget) {
            Ok((g, proof)) => {
                self.proven = Some(Box::new(proof));
                Ok(g)
            }
            Err(why) => {
                metrics::counter!("herdgate_auth_grants_total", "result" => why.label())
                    .increment(1);
                Err(why)
            }
        }
    }

    /// The sign-in grant to hand out once signed in as `user`: renewing
    /// `taken`, or a first one for the key the sign-in offered.
    pub(super) fn signin_grant_for(
        &self,
        app: &App,
        d: &protocol::SigninData,
        user: &str,
        taken: Option<Grant>,
        now: u64,
    ) -> Option<Grant> {
        let settings = app.features.auth_grants?;
        let ttl = settings.ttl.as_secs();
        if let Some(g) = taken {
            return renewed(settings, g, now);
        }
        let key = grant::parse_key(&d.grant.as_ref()?.key)?;
        Some(Grant {
            kind: Kind::SignIn,
            authorized: now,
            issued: now,
            expires: now + ttl,
            key,
            name: String::new(),
            data_hash: grant::data_hash(&d.user_data),
            user: user.to_string(),
        })
    }

    /// Send `g` to the socket as `herdgate:grant` (a channel's, or with
    /// `signin` a sign-in's).
    pub(super) fn hand_grant(&self, app: &App, g: &Grant) {
        let Some(text) = grant::mint(&app.id, &app.secret, g) else {
            return;
        };
        metrics::counter!("herdgate_auth_grants_total", "result" => "issued").increment(1);
        let ttl = g.expires.saturating_sub(g.issued);
        self.out.push(&match g.kind {
            Kind::Channel => protocol::grant(&g.name, &text, g.expires, ttl),
            Kind::SignIn => protocol::signin_grant(&text, g.expires, ttl),
        });
    }

    /// `herdgate:grant` from the client: renew the grant of a channel it
    /// holds, or (`signin`) of its sign-in, presented over this socket. The
    /// grant must name the user the socket is signed in as now.
    pub(super) async fn renew_grant(&mut self, r: Renew) -> Handled {
        let app: Arc<App> = self.current_app()?;
        // The reasons are machine-readable: the plugin keeps its grant on
        // `busy` (and retries), and drops it on any other.
        let refuse = |why: &str| match r.signin {
            true => protocol::signin_grant_refused(why),
            false => protocol::grant_refused(&r.channel, why),
        };
        if !self.channel_op("grant") {
            self.out.push(&refuse("busy"));
            return Ok(());
        }
        let Some(settings) = app.features.auth_grants else {
            self.out.push(&refuse("off"));
            return Ok(());
        };
        let (kind, data) = if r.signin {
            if self.user.is_none() {
                self.out.push(&refuse("not_signed_in"));
                return Ok(());
            }
            ((Kind::SignIn, ""), r.user_data.as_deref().unwrap_or(""))
        } else {
            if self.subscribed(&r.channel).is_none() {
                self.out.push(&refuse("not_subscribed"));
                return Ok(());
            }
            let data = r.channel_data.as_deref().unwrap_or("");
            ((Kind::Channel, r.channel.as_str()), data)
        };
        let now = crate::clock::unix_now().as_secs();
        match self.check_presented(&app, settings, kind, data, &r.auth, now) {
            Ok(g) if g.user == self.grant_user() => {
                if let Some(g) = renewed(settings, g, now) {
                    self.hand_grant(&app, &g);
                }
            }
            Ok(_) => {
                metrics::counter!("herdgate_auth_grants_total", "result" => "other_user")
                    .increment(1);
                self.out.push(&refuse("other_user"));
            }
            Err(why) => {
                self.out.push(&refuse(why.label()));
            }
        }
        Ok(())
    }
}

/// A renewal of `g`: the same key and first authorization, issued now, and
/// living no longer than its line may (none past `auth_grant_max_age`).
fn renewed(settings: GrantSettings, g: Grant, now: u64) -> Option<Grant> {
    let line_ends = g.authorized.saturating_add(settings.max_age.as_secs());
    let expires = (now + settings.ttl.as_secs()).min(line_ends);
    (expires > now).then_some(Grant {
        issued: now,
        expires,
        ..g
    })
}
