//! The part of the configuration that a reload (SIGHUP) swaps while
//! serving: read by every role, through one atomic pointer.
//!
//! Its own module so that the admission checks and the node's parts
//! ([`crate::state`]) both read it without importing each other.

use crate::apps::Apps;
use crate::config::Config;
use arc_swap::ArcSwap;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The configuration in force, with what is derived from it once.
pub struct Live {
    pub config: Config,
    pub apps: Apps,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<crate::config::Cidr>,
}

impl Live {
    pub fn new(config: Config) -> Live {
        let trusted_proxies = config
            .server
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        Live {
            apps: Apps::new(&config.apps),
            trusted_proxies,
            config,
        }
    }

    /// How a new socket that offered permessage-deflate is answered:
    /// `None` when `compression.enabled` is off.
    pub fn deflate(&self) -> Option<crate::protocol::deflate::Deflate> {
        let c = &self.config.compression;
        c.enabled
            .then(|| crate::protocol::deflate::Deflate::new(c.min_bytes, c.level))
    }

    /// Websocket settings for a new socket.
    pub fn ws_config(&self) -> WebSocketConfig {
        let l = &self.config.limits;
        // herdgate reads and writes its own frames (session::websocket,
        // session::ws_reader): only the two limits are used.
        WebSocketConfig::default()
            .max_message_size(Some(l.max_message_bytes))
            .max_frame_size(Some(l.max_message_bytes))
    }

    /// Whether `ip` is one of `server.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

/// The swappable [`Live`].
pub struct LiveCell(ArcSwap<Live>);

impl LiveCell {
    pub fn new(config: Config) -> LiveCell {
        LiveCell(ArcSwap::from_pointee(Live::new(config)))
    }

    /// The configuration in force now. Cheap: an atomic load and a refcount.
    pub fn load(&self) -> Arc<Live> {
        self.0.load_full()
    }

    /// Put a new (validated) configuration in force for everything that
    /// reads it from now on.
    pub fn store(&self, config: Config) {
        self.0.store(Arc::new(Live::new(config)));
    }
}
