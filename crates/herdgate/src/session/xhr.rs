//! A session over the HTTP fallback transports: its writer is a
//! [`Pipe`](crate::pipe::Pipe), its reader the pipe's client → session
//! channel. Everything else is the websocket session's loop.

use super::transport::Transport;
use crate::pipe::{Pipe, ToSession};
use crate::protocol::Frame;
use bytes::Bytes;
use futures_util::Stream;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub struct PipeWriter(pub Arc<Pipe>);

impl Transport for PipeWriter {
    fn is_busy(&self) -> bool {
        self.0.is_busy()
    }

    fn enqueue(&mut self, frames: VecDeque<Frame>) {
        self.0.push(frames);
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_taken(cx).map(Ok)
    }

    fn pong(&mut self, _payload: Bytes) {}

    async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        // The next receive request sends what is left, then `c[code,reason]`.
        self.0.close(code, reason);
        Ok(())
    }
}

/// What the client sent (`xhr_send`), as the session loop reads messages;
/// it ends when the client is gone.
pub struct PipeReader(pub mpsc::Receiver<ToSession>);

impl Stream for PipeReader {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|m| match m {
            Some(ToSession::Text(text)) => Some(Ok(Message::Text(text.into()))),
            Some(ToSession::Gone) | None => None,
        })
    }
}
