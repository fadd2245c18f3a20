//! The configured apps, looked up by key (websockets) and by id (HTTP API).

use crate::config::AppConfig;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct App {
    pub id: Arc<str>,
    pub key: String,
    pub secret: String,
    pub enable_client_events: bool,
    pub enabled: bool,
    pub allowed_origins: Vec<String>,
}

impl App {
    /// Whether a websocket from `origin` may connect (any, when no list is configured).
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        let Some(origin) = origin else { return false };
        self.allowed_origins
            .iter()
            .any(|allowed| match allowed.split_once("://*.") {
                Some((scheme, domain)) => origin
                    .strip_prefix(scheme)
                    .and_then(|o| o.strip_prefix("://"))
                    .is_some_and(|host| host.ends_with(&format!(".{domain}"))),
                None => origin.eq_ignore_ascii_case(allowed),
            })
    }
}

#[derive(Debug, Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
}

impl Apps {
    pub fn new(configs: &[AppConfig]) -> Apps {
        let mut apps = Apps::default();
        for c in configs {
            let app = Arc::new(App {
                id: Arc::from(c.id.as_str()),
                key: c.key.clone(),
                secret: c.secret.clone(),
                enable_client_events: c.enable_client_events,
                enabled: c.enabled,
                allowed_origins: c.allowed_origins.clone(),
            });
            apps.by_key.insert(c.key.clone(), app.clone());
            apps.by_id.insert(c.id.clone(), app);
        }
        apps
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let app = |list: &[&str]| App {
            id: "1".into(),
            key: "k".into(),
            secret: "s".into(),
            enable_client_events: true,
            enabled: true,
            allowed_origins: list.iter().map(|s| s.to_string()).collect(),
        };
        assert!(app(&[]).origin_allowed(None));
        let a = app(&["https://events.example.com", "https://*.example.org"]);
        assert!(a.origin_allowed(Some("https://events.example.com")));
        assert!(a.origin_allowed(Some("https://a.b.example.org")));
        assert!(!a.origin_allowed(Some("https://example.org")));
        assert!(!a.origin_allowed(Some("http://events.example.com")));
        assert!(!a.origin_allowed(Some("https://events.example.com.evil.net")));
        assert!(!a.origin_allowed(Some("https://evilexample.org")));
        assert!(!a.origin_allowed(None));
    }
}
