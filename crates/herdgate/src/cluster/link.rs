//! The edge ↔ worker link: length-delimited frames (a 4-byte big-endian
//! length, then a postcard-encoded [`Msg`]) over one TCP connection per
//! edge–worker pair, every room multiplexed on it. docs/LINK.md lists the
//! frame types.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const VERSION: u16 = 1;
/// Largest frame accepted from a peer: an event (payloads are ≤ the
/// message limit) plus room names, with room to spare.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// edge → worker, first frame: who is connecting.
    Hello {
        version: u16,
        edge: u64,
    },
    /// worker → edge, answer to Hello.
    HelloAck {
        version: u16,
    },
    Heartbeat,
    // edge → worker
    Subscribe {
        app: String,
        channel: String,
        conn: u64,
        member: Option<(String, Option<String>)>,
        max_members: u32,
        events_max: Option<u32>,
        silent: bool,
    },
    Unsubscribe {
        app: String,
        channel: String,
        conn: u64,
        events_max: Option<u32>,
        silent: bool,
    },
    /// An event for a room. `id` ≠ 0 asks for an `Ack` once the worker has
    /// handed it to every subscribed edge's link (HTTP API publishes).
    Publish {
        id: u64,
        app: String,
        channel: String,
        frame: String,
        exclude: Option<u64>,
        coalesce_ms: Option<u64>,
    },
    SignIn {
        app: String,
        user: String,
        conn: u64,
    },
    SignOut {
        app: String,
        user: String,
        conn: u64,
    },
    Terminate {
        app: String,
        user: String,
    },
    Query {
        id: u64,
        app: String,
        channel: String,
    },
    Users {
        id: u64,
        app: String,
        channel: String,
    },
    List {
        id: u64,
        app: String,
        prefix: String,
    },
    // worker → edge
    /// Fan out to the edge's sockets in the room, but `exclude` and `except_user`'s.
    Deliver {
        app: String,
        channel: String,
        frame: String,
        exclude: Option<u64>,
        except_user: Option<String>,
    },
    /// To one socket (subscription answers).
    DeliverTo {
        app: String,
        channel: String,
        conn: u64,
        frame: String,
    },
    /// Close one socket signed in as a user (`channel` is the user's channel).
    Close {
        app: String,
        channel: String,
        conn: u64,
        code: u16,
    },
    Ack {
        id: u64,
    },
    QueryReply {
        id: u64,
        subscriptions: u64,
        users: u64,
    },
    UsersReply {
        id: u64,
        users: Vec<String>,
    },
    ListReply {
        id: u64,
        rooms: Vec<(String, u64, u64)>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<(), LinkError> {
    let body = postcard::to_stdvec(msg)?;
    w.write_u32(body.len() as u32).await?;
    w.write_all(&body).await?;
    Ok(())
}

pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, LinkError> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(LinkError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(postcard::from_bytes(&body)?)
}

/// Write what the queue hands over, and a heartbeat whenever `heartbeat`
/// passes; ends when the queue closes or a write fails.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: tokio::sync::mpsc::Receiver<Msg>,
    heartbeat: std::time::Duration,
) {
    let mut beat = tokio::time::interval(heartbeat);
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = beat.tick() => Msg::Heartbeat,
        };
        if write_msg(&mut w, &msg).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_refuses_oversized_frames() {
        let msgs = [
            Msg::Hello {
                version: VERSION,
                edge: 7,
            },
            Msg::Subscribe {
                app: "1".into(),
                channel: "presence-x".into(),
                conn: 42,
                member: Some(("u".into(), Some("{\"n\":1}".into()))),
                max_members: 100,
                events_max: None,
                silent: false,
            },
            Msg::Deliver {
                app: "1".into(),
                channel: "c".into(),
                frame: "{}".into(),
                exclude: Some(3),
                except_user: None,
            },
            Msg::Publish {
                id: 5,
                app: "1".into(),
                channel: "c".into(),
                frame: "{}".into(),
                exclude: None,
                coalesce_ms: Some(100),
            },
            Msg::ListReply {
                id: 9,
                rooms: vec![("a".into(), 1, 0)],
            },
        ];
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        for m in &msgs {
            write_msg(&mut a, m).await.unwrap();
        }
        for m in &msgs {
            assert_eq!(&read_msg(&mut b).await.unwrap(), m);
        }
        a.write_u32((MAX_FRAME + 1) as u32).await.unwrap();
        assert!(matches!(
            read_msg(&mut b).await,
            Err(LinkError::TooLarge(_))
        ));
    }
}
