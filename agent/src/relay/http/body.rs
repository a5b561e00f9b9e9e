//! Bodies the relay hands to hyper: its own short answers, and forwarded
//! responses fed through a bounded channel by the task that reads the
//! upstream (the bound is the backpressure: a slow client stops that read).
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of a request sent upstream.
pub type UpBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn up_full(b: Bytes) -> UpBody {
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed()
}

pub fn up_stream(b: hyper::body::Incoming) -> UpBody {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

pub type FrameTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// Body of a response to the client.
pub struct RelayBody(Inner);

enum Inner {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>),
}

impl RelayBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RelayBody(Inner::Full(Some(b.into())))
    }

    pub fn empty() -> Self {
        RelayBody(Inner::Full(None))
    }

    /// A body fed by the returned sender, at most `frames` queued.
    pub fn channel(frames: usize) -> (FrameTx, Self) {
        let (tx, rx) = mpsc::channel(frames.max(1));
        (tx, RelayBody(Inner::Channel(rx)))
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Channel(_) => SizeHint::default(),
        }
    }
}
