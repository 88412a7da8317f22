//! A plain-TCP connection shared by its task (reading, and writing what waits) and fan-out.
//!
//! After the upgrade, hyper's `Upgraded` is taken apart again into the `TcpStream` it
//! wraps (plus any bytes hyper read past the request), and the stream is shared through an
//! `Arc`: tokio's `TcpStream` reads and writes through `&self`, so neither half needs a
//! lock. Sharing it is what lets [`Outbox::push`](crate::outbox::Outbox::push) write a
//! frame straight to an idle socket from the publisher's task, without waking the
//! connection's task. TLS connections keep hyper's stream, written only by their task.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::ws::reader::{self, Fill};

/// The reading side: the bytes hyper had already read, then the socket.
pub struct TcpRead {
    tcp: Arc<TcpStream>,
    early: Bytes,
}

/// The writing side used by the connection's task for what the socket did not take at once.
pub struct TcpWrite {
    tcp: Arc<TcpStream>,
}

/// Splits a plain TCP connection; `early` is what hyper read past the upgrade request.
pub fn split(tcp: TcpStream, early: Bytes) -> (TcpRead, TcpWrite, Arc<TcpStream>) {
    // `early` is a view of hyper's whole read buffer (kilobytes, even when `early` is
    // empty): keep a copy of its bytes, not the buffer.
    let early = match early.is_empty() {
        true => Bytes::new(),
        false => Bytes::copy_from_slice(&early),
    };
    let tcp = Arc::new(tcp);
    (
        TcpRead {
            tcp: tcp.clone(),
            early,
        },
        TcpWrite { tcp: tcp.clone() },
        tcp,
    )
}

impl Fill for TcpRead {
    /// Waits until the socket is readable before making room in `buf`, so that an idle
    /// connection holds no read buffer.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        needed: usize,
    ) -> Poll<io::Result<usize>> {
        if self.early.has_remaining() {
            buf.extend_from_slice(&self.early);
            let n = self.early.len();
            self.early.clear();
            return Poll::Ready(Ok(n));
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let result = if buf.is_empty() {
                // The start of a burst: read onto the stack and keep exactly what came (a
                // command is usually a few hundred bytes), so that no chunk-sized buffer is
                // allocated and freed per message, fragmenting the heap.
                let mut stack = [0u8; reader::READ_CHUNK];
                self.tcp.try_read(&mut stack).inspect(|&n| {
                    buf.reserve(n);
                    buf.extend_from_slice(&stack[..n]);
                })
            } else {
                reader::reserve(buf, needed);
                self.tcp.try_read_buf(buf)
            };
            match result {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl TcpWrite {
    fn poll_with(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match write(&self.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncWrite for TcpWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_with(cx, |tcp| tcp.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_with(cx, |tcp| tcp.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN; the descriptor closes when the last holder of the stream lets go.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.tcp).shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn early_bytes_come_first_and_shutdown_ends_the_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut read, mut write, _) = split(server, Bytes::from_static(b"early "));
        client.write_all(b"late").await.unwrap();
        let mut got = BytesMut::new();
        while got.len() < 10 {
            let filled = std::future::poll_fn(|cx| read.poll_fill(cx, &mut got, 10)).await;
            assert!(filled.unwrap() > 0);
        }
        assert_eq!(&got[..], b"early late");

        write.write_all(b"bye").await.unwrap();
        write.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
    }
}
