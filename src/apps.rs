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
