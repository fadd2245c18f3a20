//! Channel and event names: what is allowed and what kind of channel a name is.

pub const MAX_CHANNEL_NAME: usize = 164;
pub const MAX_EVENT_NAME: usize = 200;
pub const MAX_USER_ID: usize = crate::config::MAX_USER_ID;
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    PrivateEncrypted,
    Presence,
    /// `#server-to-user-{id}`: only for a socket signed in as that user.
    User,
}

/// A cache channel (`cache-`, `private-cache-`, `private-encrypted-cache-`,
/// `presence-cache-`): its owner keeps the last server-triggered event.
pub fn is_cache(channel: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|p| channel.starts_with(p))
}

impl ChannelKind {
    pub fn of(name: &str) -> ChannelKind {
        if name.starts_with("presence-") {
            ChannelKind::Presence
        } else if name.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with(USER_CHANNEL_PREFIX) {
            ChannelKind::User
        } else {
            ChannelKind::Public
        }
    }

    pub fn needs_auth(self) -> bool {
        matches!(
            self,
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
        )
    }

    /// Client events are allowed on private and presence channels, but not on
    /// encrypted ones (the server could not check what it forwards).
    pub fn allows_client_events(self) -> bool {
        matches!(self, ChannelKind::Private | ChannelKind::Presence)
    }
}

fn allowed_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-=@,.;".contains(c)
}

/// Why a name was refused; the text goes to the client.
pub fn check_channel(name: &str) -> Result<ChannelKind, String> {
    if name.is_empty() {
        return Err("channel name is empty".into());
    }
    if name.len() > MAX_CHANNEL_NAME {
        return Err(format!(
            "channel name longer than {MAX_CHANNEL_NAME} characters"
        ));
    }
    if let Some(user) = name.strip_prefix(USER_CHANNEL_PREFIX) {
        check_user_id(user)?;
        return Ok(ChannelKind::User);
    }
    if !name.chars().all(allowed_char) {
        return Err("channel name may contain only A-Z a-z 0-9 _ - = @ , . ;".into());
    }
    Ok(ChannelKind::of(name))
}

pub fn check_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_USER_ID {
        return Err(format!("user id must be 1 to {MAX_USER_ID} characters"));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("user id may not contain whitespace or control characters".into());
    }
    Ok(())
}

pub fn check_event_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_EVENT_NAME {
        return Err(format!(
            "event name must be 1 to {MAX_EVENT_NAME} characters"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("event name may not contain control characters".into());
    }
    // herdgate's own events (herdgate:resumed, herdgate:grant, …) come only
    // from herdgate: an app or a client cannot forge one.
    if name.starts_with("herdgate:") {
        return Err("event names beginning with \"herdgate:\" are reserved".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(check_channel("lobby"), Ok(ChannelKind::Public));
        assert_eq!(check_channel("private-x"), Ok(ChannelKind::Private));
        assert_eq!(
            check_channel("private-encrypted-x"),
            Ok(ChannelKind::PrivateEncrypted)
        );
        assert_eq!(check_channel("presence-x"), Ok(ChannelKind::Presence));
        assert_eq!(check_channel("#server-to-user-42"), Ok(ChannelKind::User));
        assert_eq!(check_channel("a_-=@,.;Z9"), Ok(ChannelKind::Public));
    }

    #[test]
    fn refusals() {
        assert!(check_channel("").is_err());
        assert!(check_channel(&"a".repeat(165)).is_err());
        assert!(check_channel(&"a".repeat(164)).is_ok());
        assert!(check_channel("has space").is_err());
        assert!(check_channel("sl/ash").is_err());
        assert!(check_channel("#server-to-user-").is_err());
        assert!(check_channel("#other").is_err());
        assert!(check_event_name(&"e".repeat(201)).is_err());
        assert!(check_event_name(&"e".repeat(200)).is_ok());
        assert!(check_event_name("client-\u{0}x").is_err());
    }
}
