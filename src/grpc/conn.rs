//! The control listener's connections: bounded in number, and closed when they make no call
//! within `header_read_timeout` of being accepted. Without this a peer that sends nothing,
//! or only the HTTP/2 preface, holds a descriptor (shared with the WebSocket listener's
//! limit) for as long as it likes. Dead peers of established connections are found by
//! HTTP/2 keepalive pings (`grpc::serve`).
//!
//! Each accepted socket is wrapped in a [`ControlConn`], whose connect info (in every
//! request's extensions) carries the connection's [`Seen`] flag: [`MarkLayer`] sets it on the
//! first request, and a watchdog that holds a duplicate of the socket shuts it down if the
//! flag is still clear at the deadline.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::codegen::http;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

/// Set once the connection has made a call.
#[derive(Clone, Default)]
pub struct Seen(Arc<AtomicBool>);

/// The number of control connections open now.
#[derive(Clone, Default)]
pub struct Open(Arc<AtomicUsize>);

impl Open {
    /// A place for one more connection, if fewer than `max` are open.
    fn take(&self, max: usize) -> Option<Place> {
        self.0
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Place(self.0.clone()))
    }
}

/// Gives its place back when the connection is dropped.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An accepted control connection.
pub struct ControlConn {
    stream: TcpStream,
    seen: Seen,
    _place: Place,
}

impl ControlConn {
    /// Takes a place (None past `max`: the caller drops the socket) and starts the watchdog
    /// that closes the connection unless it calls within `first_call`.
    pub fn accept(
        stream: TcpStream,
        open: &Open,
        max: usize,
        first_call: Duration,
    ) -> Option<ControlConn> {
        let place = open.take(max)?;
        let seen = Seen::default();
        // A duplicate of the socket (not its raw number, which may be reused once closed).
        if let Ok(watched) = stream_clone(&stream) {
            let seen = seen.clone();
            tokio::spawn(async move {
                tokio::time::sleep(first_call).await;
                if !seen.0.load(Relaxed) {
                    tracing::debug!(
                        "control connection closed: no call within header_read_timeout"
                    );
                    let _ = watched.shutdown(std::net::Shutdown::Both);
                }
            });
        }
        Some(ControlConn {
            stream,
            seen,
            _place: place,
        })
    }
}

fn stream_clone(stream: &TcpStream) -> io::Result<std::net::TcpStream> {
    let socket = socket2::SockRef::from(stream).try_clone()?;
    Ok(socket.into())
}

impl Connected for ControlConn {
    type ConnectInfo = Seen;

    fn connect_info(&self) -> Seen {
        self.seen.clone()
    }
}

impl AsyncRead for ControlConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks the connection of every request as having called.
#[derive(Clone, Copy)]
pub struct MarkLayer;

impl<S> Layer<S> for MarkLayer {
    type Service = Mark<S>;

    fn layer(&self, inner: S) -> Mark<S> {
        Mark { inner }
    }
}

#[derive(Clone)]
pub struct Mark<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Mark<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // tonic puts the connection's info in every request, over TLS too.
        if let Some(seen) = request.extensions().get::<Seen>() {
            seen.0.store(true, Relaxed);
        }
        self.inner.call(request)
    }
}
