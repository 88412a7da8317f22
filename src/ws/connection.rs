//! One client connection's task, from the upgrade to its last frame: the I/O loop.
//!
//! Spawned by `server` after the HTTP upgrade: one task per connection. It reads frames
//! (`reader`), answers the WebSocket's own control frames, bounds and reassembles
//! fragmented messages, and hands each complete text message to the connection's
//! [`Handler`] (its commands). The same task drains what the socket did not take at once
//! (`Outbox::poll_drain`) and keeps the connection's clocks (`clock`), the write timeout
//! and the close handshake.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::node::Node;
use crate::outbox::Outbox;
use crate::wire::close::{self, Close};
use crate::wire::frame;
use crate::wire::inbound::{Frame, OpCode};
use crate::wire::Position;
use crate::ws::admission::Ticket;
use crate::ws::clock::{unix_now, Clock, CLOSE_HANDSHAKE_TIMEOUT};
use crate::ws::handler::Handler;
use crate::ws::reader::{AnyRead, Fill, ReadError, Reader};
use crate::ws::socket;
use crate::ws::sse;

type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// What the upgrade request carried to authenticate with.
pub struct Credentials {
    /// `?token=`: the connection authenticates with it at once.
    pub query_token: Option<String>,
    /// The `auth_cookie`'s value: a `connect` without a token authenticates with it.
    pub cookie: Option<Box<str>>,
    /// Positions to recover the token's `subs` and `channels` from.
    pub positions: Vec<(String, Position)>,
    /// Subscriptions asked for when the stream opened (SSE), made after the connect.
    pub channels: Vec<String>,
}

/// Waits for the upgrade, then spawns the connection's own task on `tracker`: that task holds
/// only the connection's state, not this function's arguments. `shutdown` asks the
/// connection to close with 1001; `kill` ends it at once.
pub async fn run(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    node: Node,
    ticket: Ticket,
    credentials: Credentials,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
) {
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let limit = node.config.max_queue_bytes;
    let start = Start {
        node,
        ticket,
        credentials,
        shutdown,
        kill,
    };
    // Plain TCP: the socket is shared with the outbox, which writes to it directly.
    match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => {
            let (read, write, tcp) = socket::split(parts.io.into_inner(), parts.read_buf);
            let outbox = Outbox::direct(limit, tcp, start.node.metrics.clone());
            let mut connection = Connection::start(read, write, outbox, start).await;
            // An async block uses its captured state in place; an async fn taking `mut self`
            // would hold the connection twice.
            tracker.spawn(async move { connection.run().await }.in_current_span());
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(Upgraded::new(upgraded));
            let outbox = Outbox::new(limit).with_metrics(start.node.metrics.clone());
            let mut connection = Connection::start(AnyRead(read), write, outbox, start).await;
            tracker.spawn(async move { connection.run().await }.in_current_span());
        }
    }
}

/// An SSE stream's connection (`sse::open` made its parts): it reads the commands POSTed
/// to the stream and writes its frames into the pipe that the stream's body reads.
pub async fn run_sse(
    parts: sse::Parts,
    node: Node,
    ticket: Ticket,
    shutdown: CancellationToken,
    kill: CancellationToken,
) {
    let sse::Parts {
        commands,
        pipe,
        credentials,
        gone,
        hangup,
    } = parts;
    let outbox = Outbox::new(node.config.max_queue_bytes).with_metrics(node.metrics.clone());
    let grace = node.config.write_timeout;
    let (stopping, killed) = (shutdown.clone(), kill.clone());
    let start = Start {
        node,
        ticket,
        credentials,
        shutdown,
        kill,
    };
    let mut connection = Connection::start(commands, pipe, outbox, start).await;
    connection.run().await;
    // Its place and its session go now.
    drop(connection);
    // The socket belongs to the HTTP connection, which waits for the client to take the
    // rest of the stream: a client whose window stays shut would keep it for good. It gets
    // write_timeout to take the rest, and as long again to take the last bytes; then the
    // HTTP connection ends and the socket with it.
    // A stopping server ends its HTTP connections itself.
    let linger = async {
        let _ = timeout(grace, gone.cancelled()).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = linger => {}
        () = stopping.cancelled() => {}
        () = killed.cancelled() => {}
    }
    hangup.cancel();
}

/// What a connection starts from.
struct Start {
    node: Node,
    ticket: Ticket,
    credentials: Credentials,
    shutdown: CancellationToken,
    kill: CancellationToken,
}

/// One connection's state for its life: what its task's future holds while it waits.
pub(crate) struct Connection<F, W> {
    handler: Handler,
    reader: Reader<F>,
    /// The writing side, for what the socket did not take at once (and everything on TLS).
    io: W,
    /// A fragmented message being reassembled.
    fragments: Option<Vec<u8>>,
    /// Ends this connection now: cancelled by `kill`, and when the connection ends (rpcs
    /// still waiting for an answer stop waiting).
    conn: CancellationToken,
    /// The server is shutting down: close with 1001.
    shutdown: CancellationToken,
    // Held for the connection's life: its place under max_connections.
    _ticket: Ticket,
}

impl<F: Fill, W: AsyncWrite + Unpin> Connection<F, W> {
    /// With a token in the URL, authenticates at once.
    async fn start(read: F, io: W, outbox: Outbox, start: Start) -> Connection<F, W> {
        let Start {
            node,
            ticket,
            credentials,
            shutdown,
            kill,
        } = start;
        let reader = Reader::new(read, node.config.max_message_size);
        let conn = kill.child_token();
        let mut handler = Handler::new(node, Arc::new(outbox), conn.clone(), credentials.cookie);
        tracing::debug!(client = %handler.id(), "connection open");
        if let Some(token) = credentials.query_token {
            handler.connect(&token, &credentials.positions).await;
            for channel in &credentials.channels {
                let since = credentials
                    .positions
                    .iter()
                    .find(|(c, _)| c == channel)
                    .map(|(_, p)| p);
                handler.subscribe_at_open(channel, since).await;
            }
        }
        Connection {
            handler,
            reader,
            io,
            fragments: None,
            conn,
            shutdown,
            _ticket: ticket,
        }
    }

    /// Reads and handles frames, drains what the socket did not take at once and keeps the
    /// clocks, until the connection ends: the client's Close answered (or ours answered, or
    /// not within CLOSE_HANDSHAKE_TIMEOUT), the socket lost, a write stuck for
    /// write_timeout, or `kill`. Takes `&mut self`: spawned as `async move {
    /// connection.run().await }`, which holds the connection once.
    pub(crate) async fn run(&mut self) {
        let outbox = self.handler.outbox().clone();
        let config = self.handler.node().config.clone();
        let mut clock = Clock::new(Instant::now(), &config);
        let mut clock_due = Instant::now();
        // Registered once: re-creating these futures on every wake-up costs a lock each.
        let killed = self.conn.clone().cancelled_owned();
        let shutdown = self.shutdown.clone().cancelled_owned();
        let sleep = sleep_until(clock_due);
        tokio::pin!(killed, shutdown, sleep);
        let mut reading = true;
        let mut was_killed = false;
        let mut shutting_down = false;
        let mut close_sent = false;
        // No byte written for write_timeout while some wait: the socket is dropped.
        let mut write_deadline: Option<Instant> = None;
        // Our Close is sent: the client has this long to answer it.
        let mut handshake_deadline: Option<Instant> = None;
        loop {
            // `now` and `wake` live in blocks of their own: what is not needed across the
            // wait is not kept in this (every connection's) future.
            {
                let now = Instant::now();
                let live = self.handler.live();
                if now >= clock_due || live.take_changed() {
                    clock_due = clock.tick(live, &config, &outbox, now, unix_now());
                }
            }
            let work = outbox.has_work() && !close_sent;
            if !reading && (close_sent || !work) {
                break;
            }
            {
                // Deadlines are checked here, not only when the sleep wins the select: a
                // client that never stops sending would keep it from being polled.
                let now = Instant::now();
                if !work {
                    write_deadline = None;
                } else if *write_deadline.get_or_insert(now + config.write_timeout) <= now {
                    self.handler.node().metrics.write_timeouts.inc();
                    tracing::debug!("write timed out; dropping the connection");
                    outbox.lost("write timed out");
                    break;
                }
                if handshake_deadline.is_some_and(|deadline| now >= deadline) {
                    break;
                }
                let wake = [Some(clock_due), write_deadline, handshake_deadline]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(clock_due);
                if sleep.deadline() != wake {
                    sleep.as_mut().reset(wake);
                }
            }
            tokio::select! {
                biased;
                _ = &mut killed => {
                    was_killed = true;
                    outbox.lost("dropped at shutdown_timeout");
                    break;
                }
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    outbox.schedule_close(Close::new(close::GOING_AWAY, "server shutting down"));
                }
                drained = std::future::poll_fn(|cx| outbox.poll_drain(cx, &mut self.io)), if work => {
                    match drained {
                        Ok(drained) => {
                            // Progress: the write timeout starts again.
                            write_deadline = None;
                            if drained.close_sent {
                                close_sent = true;
                                handshake_deadline = Some(Instant::now() + CLOSE_HANDSHAKE_TIMEOUT);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "write failed");
                            outbox.lost("write failed");
                            break;
                        }
                    }
                }
                frame = self.reader.frame(), if reading => {
                    reading = self.on_frame(frame).await;
                    if !reading {
                        self.handler.unregister();
                    }
                }
                () = std::future::poll_fn(|cx| outbox.poll_wait(cx)) => {}
                // A deadline passed: checked at the top of the loop.
                () = &mut sleep => {}
            }
        }
        outbox.detach();
        self.handler.unregister();
        self.conn.cancel();
        self.handler
            .node()
            .metrics
            .record_disconnect(outbox.ended().code);
        // Killed: dropped at once. Otherwise the peer gets a FIN (and TLS its close_notify).
        if !was_killed {
            let _ = timeout(config.write_timeout, self.io.shutdown()).await;
        }
    }

    /// Acts on one frame (or on why reading stopped); false once reading is over: the
    /// client's Close came, the socket was lost, or a frame broke the protocol.
    async fn on_frame(&mut self, frame: Result<Frame, ReadError>) -> bool {
        let max = self.handler.node().config.max_message_size;
        let outbox = self.handler.outbox();
        let frame = match frame {
            Ok(frame) => frame,
            Err(ReadError::Frame(error)) => {
                self.handler.end(error.close_code(), &error.to_string());
                return false;
            }
            // The peer is gone: nothing more is written, what ended it is 1006 (unless a
            // close was scheduled before).
            Err(ReadError::Eof | ReadError::Io(_)) => {
                outbox.lost("connection lost");
                return false;
            }
        };
        match frame.opcode {
            OpCode::Close => {
                let code = match frame.payload.len() {
                    0 => close::NORMAL,
                    1 => close::PROTOCOL_ERROR,
                    _ => match u16::from_be_bytes([frame.payload[0], frame.payload[1]]) {
                        code if close::may_be_sent(code) => code,
                        _ => close::PROTOCOL_ERROR,
                    },
                };
                // Echo the client's code (§5.5.1); ignored when ours was sent first.
                let reason = frame.payload.get(2..).unwrap_or_default();
                let reason = String::from_utf8_lossy(reason);
                outbox.schedule_answer(Close::new(code, reason));
                return false;
            }
            OpCode::Ping => {
                outbox.push(frame::pong(&frame.payload));
            }
            OpCode::Pong => {}
            // A close is scheduled: frames are read only to see the client's answer.
            _ if outbox.is_closing() => {}
            OpCode::Binary => self
                .handler
                .end(close::BAD_REQUEST, "binary frames are not supported"),
            OpCode::Text if frame.fin => {
                if self.fragments.is_some() {
                    self.handler
                        .end(close::PROTOCOL_ERROR, "expected a continuation frame");
                } else if std::str::from_utf8(&frame.payload).is_err() {
                    self.handler.end(close::INVALID_PAYLOAD, "invalid UTF-8");
                } else {
                    Box::pin(self.handler.on_message(&frame.payload)).await;
                }
            }
            OpCode::Text if self.fragments.is_some() => {
                self.handler
                    .end(close::PROTOCOL_ERROR, "expected a continuation frame");
            }
            OpCode::Text => self.fragments = Some(frame.payload.to_vec()),
            OpCode::Continuation => {
                let Some(buffer) = self.fragments.as_mut() else {
                    self.handler
                        .end(close::PROTOCOL_ERROR, "unexpected continuation frame");
                    return true;
                };
                if buffer.len() + frame.payload.len() > max {
                    self.fragments = None;
                    self.handler.end(close::TOO_BIG, "message too big");
                    return true;
                }
                buffer.extend_from_slice(&frame.payload);
                if frame.fin {
                    let message = self.fragments.take().expect("checked above");
                    if std::str::from_utf8(&message).is_err() {
                        self.handler.end(close::INVALID_PAYLOAD, "invalid UTF-8");
                    } else {
                        Box::pin(self.handler.on_message(&message)).await;
                    }
                }
            }
        }
        true
    }
}
