//! An `AsyncRead` wrapper that says when its stream ended, so the caller can
//! act when the client goes away (end the server after a grace period).
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    sync::oneshot,
};

pub struct EofNotify<R> {
    inner: R,
    tx: Option<oneshot::Sender<()>>,
}

impl<R> EofNotify<R> {
    pub fn new(inner: R) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                inner,
                tx: Some(tx),
            },
            rx,
        )
    }

    /// Tell `tx` (when given) once the stream has ended.
    pub fn with_sender(inner: R, tx: Option<oneshot::Sender<()>>) -> Self {
        Self { inner, tx }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for EofNotify<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let eof = match &r {
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if eof {
            if let Some(tx) = self.tx.take() {
                let _ = tx.send(());
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn says_when_the_stream_ends() {
        let (mut r, mut rx) = EofNotify::new(&b"abc"[..]);
        let mut buf = Vec::new();
        assert!(rx.try_recv().is_err());
        r.read_to_end(&mut buf).await.expect("read");
        assert_eq!(buf, b"abc");
        assert!(rx.try_recv().is_ok());
    }
}
