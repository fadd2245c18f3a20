//! Close and error codes, with the reaction pusher-js has to each range.
//!
//! 4000–4099: the client gives up. 4100–4199: it reconnects after backing off.
//! 4200–4299: it reconnects at once. 4300–4399: other errors.

/// The app is over its connection quota (`max_connections`), or the user
/// over `max_connections_per_user`. The client does not reconnect.
pub const OVER_QUOTA: u16 = 4004;
/// `pusher:error` code for an app key that no configured app has.
pub const UNKNOWN_APP: u16 = 4001;
/// The app is disabled in the config.
pub const APP_DISABLED: u16 = 4003;
/// Path is not `/app/{key}`.
pub const PATH_NOT_FOUND: u16 = 4005;
/// `version` query parameter is not a version string.
pub const INVALID_VERSION: u16 = 4006;
/// `protocol` is not a version this server speaks (5–7).
pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
/// No `protocol` query parameter.
pub const NO_PROTOCOL: u16 = 4008;
/// Bad sign-in signature, or the app terminated the user's connections.
pub const UNAUTHORIZED: u16 = 4009;
/// Over capacity: slow consumer, node full. The client backs off and retries.
pub const OVER_CAPACITY: u16 = 4100;
/// Generic reconnect-now: server shutting down.
pub const RECONNECT: u16 = 4200;
/// Closed for inactivity: the socket never subscribed to anything.
pub const INACTIVE: u16 = 4202;
/// A reload changed the app's credentials (its secret): what the socket
/// was authorized with no longer holds. The client reconnects at once and
/// authorizes again against the live secret.
pub const CREDENTIALS_CHANGED: u16 = 4203;
/// The socket did not answer our ping in time.
pub const PONG_TIMEOUT: u16 = 4201;
/// A client event over the per-socket rate limit (sent as `pusher:error`; the socket stays open).
pub const CLIENT_EVENT_RATE_LIMIT: u16 = 4301;

/// WebSocket close codes (RFC 6455) used for frame-level violations.
pub mod ws {
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const PROTOCOL_ERROR: u16 = 1002;
}
