//! The send timeout of the data plane's (and the admin plane's) connections: a connection
//! whose writes make no progress for `server.send_timeout_ms` fails, so hyper closes it
//! (nginx's `send_timeout`).
//!
//! Without it, a client that sends a request and stops reading holds its connection, and
//! through backpressure the upstream answer behind it, for as long as it likes: a few
//! thousand such clients hold every inference slot of a pool. Once the connection ends, the
//! upstream request is dropped with it, which cancels it on the inference server.
//!
//! Only a write that would block arms the timer; a write that goes through disarms it, so a
//! client that keeps reading costs no timer at all.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// A connection's stream with a send timeout (see the module docs).
pub struct SendTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write is blocked: when it fires, the write fails.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// What a write does once `attempt` is known: progress disarms the timer; a blocked
    /// write arms it (if it is not already) and fails once it fires.
    fn after<T>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if attempt.is_ready() {
            self.stalled = None;
            return attempt;
        }
        let timeout = self.timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client stopped reading (server.send_timeout_ms)",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let attempt = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after(cx, attempt)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let attempt = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after(cx, attempt)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let attempt = Pin::new(&mut self.inner).poll_flush(cx);
        self.after(cx, attempt)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let attempt = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.after(cx, attempt)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A peer that reads keeps the connection however long it takes; one that stops reading
    /// fails the next blocked write after the timeout, not before.
    #[tokio::test]
    async fn a_blocked_write_fails_after_the_timeout_and_only_then() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = SendTimeout::new(near, Duration::from_millis(200));
        // Slow but reading: 10 × 64 bytes over ~0.5 s, each wait shorter than the timeout.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 640 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                got += far.read(&mut buf).await.unwrap();
            }
            far
        });
        let start = std::time::Instant::now();
        near.write_all(&[1u8; 640]).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(400));
        let _far = reader.await.unwrap();
        // Now nobody reads: the buffer fills, the write blocks, then fails.
        let start = std::time::Instant::now();
        let e = near.write_all(&[2u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
