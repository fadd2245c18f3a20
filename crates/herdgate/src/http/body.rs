//! The body of every response: a whole buffer, or chunks from a channel
//! (the `xhr_streaming` fallback transport, which holds its response open
//! and writes one chunk per batch of frames).

use bytes::Bytes;
use hyper::body::Frame;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
pub struct Body(Inner);

#[derive(Debug, Default)]
enum Inner {
    #[default]
    Empty,
    Full(Option<Bytes>),
    /// Chunks until the sender is dropped (bounded: the sender waits).
    Chunks(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body(Inner::Full(Some(bytes.into())))
    }

    pub fn chunks(rx: mpsc::Receiver<Bytes>) -> Body {
        Body(Inner::Chunks(rx))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            Inner::Empty => Poll::Ready(None),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Chunks(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Empty => true,
            Inner::Full(b) => b.is_none(),
            Inner::Chunks(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.0 {
            Inner::Empty => hyper::body::SizeHint::with_exact(0),
            Inner::Full(Some(b)) => hyper::body::SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => hyper::body::SizeHint::with_exact(0),
            Inner::Chunks(_) => hyper::body::SizeHint::default(),
        }
    }
}
