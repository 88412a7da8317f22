//! One client connection, from the upgrade to its last frame.
//!
//! Spawned by `server` after the HTTP upgrade: one task per connection. It reads frames,
//! bounds and reassembles fragmented messages, decodes commands (`protocol::decode`) and acts
//! on them through the hub and the broker; its replies go through the same outbox as
//! fan-out, so a reply and the publications around it keep their order. The same task
//! drains what the socket did not take at once (`Outbox::poll_drain`) and keeps the
//! connection's clocks (`clock`), the write timeout and the close handshake. The
//! connection's state (its token's grants) lives here as plain fields; the hub keeps only
//! what fan-out needs.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Claims;
use crate::broker::Position;
use crate::channel::{self, granted};
use crate::events::RpcAnswer;
use crate::hub::{HubError, Origin};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::outbox::{Outbox, Push};
use crate::pb;
use crate::ws::admission::Ticket;
use crate::ws::clock::{unix_now, Clock, Liveness, CLOSE_HANDSHAKE_TIMEOUT};
use crate::ws::close::{self, Close};
use crate::ws::inbound::{Fill, Frame, OpCode, ReadError, Reader};
use crate::ws::protocol::{self, Command, ErrorCode, ProtocolError, Request};
use crate::ws::{frame, inbound, socket};

type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// Waits for the upgrade, then spawns the connection's own task on `tracker`: that task holds
/// only the connection's state, not this function's arguments. `shutdown` asks the
/// connection to close with 1001; `kill` ends it at once.
pub async fn run(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    node: Node,
    ticket: Ticket,
    query_token: Option<String>,
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
        query_token,
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
            let mut connection = Connection::start(read, write, outbox, start);
            // An async block uses its captured state in place; an async fn taking `mut self`
            // would hold the connection twice.
            tracker.spawn(async move { connection.run().await }.in_current_span());
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(Upgraded::new(upgraded));
            let outbox = Outbox::new(limit).with_metrics(start.node.metrics.clone());
            let mut connection = Connection::start(inbound::Stream(read), write, outbox, start);
            tracker.spawn(async move { connection.run().await }.in_current_span());
        }
    }
}

/// What a connection starts from.
struct Start {
    node: Node,
    ticket: Ticket,
    query_token: Option<String>,
    shutdown: CancellationToken,
    kill: CancellationToken,
}

/// One connection's state for its life: what its task's future holds while it waits.
pub(crate) struct Connection<F, W> {
    session: Session,
    reader: Reader<F>,
    /// The writing side, for what the socket did not take at once (and everything on TLS).
    io: W,
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
    fn start(read: F, io: W, outbox: Outbox, start: Start) -> Connection<F, W> {
        let Start {
            node,
            ticket,
            query_token,
            shutdown,
            kill,
        } = start;
        let reader = Reader::new(read, node.config.max_message_size);
        let outbox = Arc::new(outbox);
        let live = Arc::new(Liveness::default());
        let conn = kill.child_token();
        let node_rate = node.config.max_commands_per_second;
        let mut session = Session {
            id: new_client_id(),
            node,
            outbox,
            live,
            claims: None,
            closing: false,
            fragments: None,
            conn: conn.clone(),
            rpcs: Arc::new(AtomicUsize::new(0)),
            commands: CommandRate::new(node_rate),
        };
        tracing::debug!(client = %session.id, "websocket open");
        if let Some(token) = query_token {
            session.connect(&token, &[]);
        }
        Connection {
            session,
            reader,
            io,
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
        let Connection {
            session,
            reader,
            io,
            conn,
            shutdown,
            ..
        } = self;
        let outbox = session.outbox.clone();
        let config = session.node.config.clone();
        let mut clock = Clock::new(Instant::now(), &config);
        let mut clock_due = Instant::now();
        // Registered once: re-creating these futures on every wake-up costs a lock each.
        let killed = conn.clone().cancelled_owned();
        let shutdown = shutdown.clone().cancelled_owned();
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
                if now >= clock_due || session.live.take_changed() {
                    clock_due = clock.tick(&session.live, &config, &outbox, now, unix_now());
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
                    Metrics::inc(&session.node.metrics.write_timeouts);
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
                    break;
                }
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    outbox.close(Close::new(close::GOING_AWAY, "server shutting down"));
                }
                drained = std::future::poll_fn(|cx| outbox.poll_drain(cx, io)), if work => {
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
                frame = reader.frame(), if reading => {
                    reading = session.on_frame(frame).await;
                    if !reading {
                        session.unregister();
                    }
                }
                () = std::future::poll_fn(|cx| outbox.poll_wait(cx)) => {}
                // A deadline passed: checked at the top of the loop.
                () = &mut sleep => {}
            }
        }
        outbox.detach();
        session.unregister();
        conn.cancel();
        session.node.metrics.record_disconnect(outbox.ended().code);
        // Killed: dropped at once. Otherwise the peer gets a FIN (and TLS its close_notify).
        if !was_killed {
            let _ = timeout(config.write_timeout, io.shutdown()).await;
        }
    }
}

fn new_client_id() -> Arc<str> {
    Arc::from(format!("{:032x}", rand::random::<u128>()))
}

struct Session {
    id: Arc<str>,
    node: Node,
    outbox: Arc<Outbox>,
    live: Arc<Liveness>,
    claims: Option<Claims>,
    /// A close was scheduled: frames are read only to see the client's answer.
    closing: bool,
    /// A fragmented message being reassembled.
    fragments: Option<Vec<u8>>,
    /// Cancelled when the connection ends: rpcs still waiting stop waiting.
    conn: CancellationToken,
    /// Rpcs waiting for a backend's answer.
    rpcs: Arc<AtomicUsize>,
    commands: CommandRate,
}

/// max_commands_per_second as a token bucket holding two seconds' worth.
struct CommandRate {
    rate: f64,
    tokens: f64,
    refilled: std::time::Instant,
}

impl CommandRate {
    fn new(rate: usize) -> CommandRate {
        CommandRate {
            rate: rate as f64,
            tokens: 2.0 * rate as f64,
            refilled: std::time::Instant::now(),
        }
    }

    /// Takes one command's token; false when the connection is over its rate.
    fn take(&mut self, now: std::time::Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

// === impl Session ===

impl Session {
    /// Acts on one frame (or on why reading stopped); false once reading is over: the
    /// client's Close came, the socket was lost, or a frame broke the protocol.
    async fn on_frame(&mut self, frame: Result<Frame, ReadError>) -> bool {
        let max = self.node.config.max_message_size;
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                self.on_read_error(e);
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
                self.outbox.close(Close::new(code, reason));
                return false;
            }
            OpCode::Ping => {
                self.outbox.push(frame::pong(&frame.payload));
            }
            OpCode::Pong => {}
            _ if self.closing || self.outbox.is_closing() => self.closing = true,
            OpCode::Binary => self.close(close::BAD_REQUEST, "binary frames are not supported"),
            OpCode::Text if frame.fin => {
                if self.fragments.is_some() {
                    self.close(close::PROTOCOL_ERROR, "expected a continuation frame");
                } else if std::str::from_utf8(&frame.payload).is_err() {
                    self.close(close::INVALID_PAYLOAD, "invalid UTF-8");
                } else {
                    Box::pin(self.on_message(&frame.payload)).await;
                }
            }
            OpCode::Text if self.fragments.is_some() => {
                self.close(close::PROTOCOL_ERROR, "expected a continuation frame");
            }
            OpCode::Text => self.fragments = Some(frame.payload.to_vec()),
            OpCode::Continuation => {
                let Some(buffer) = self.fragments.as_mut() else {
                    self.close(close::PROTOCOL_ERROR, "unexpected continuation frame");
                    return true;
                };
                if buffer.len() + frame.payload.len() > max {
                    self.fragments = None;
                    self.close(close::TOO_BIG, "message too big");
                    return true;
                }
                buffer.extend_from_slice(&frame.payload);
                if frame.fin {
                    let message = self.fragments.take().expect("checked above");
                    if std::str::from_utf8(&message).is_err() {
                        self.close(close::INVALID_PAYLOAD, "invalid UTF-8");
                    } else {
                        Box::pin(self.on_message(&message)).await;
                    }
                }
            }
        }
        true
    }

    /// Takes the client out of the hub once reading is over (or the connection ended).
    fn unregister(&mut self) {
        if self.claims.take().is_some() {
            self.node.hub.unregister(&self.id, &self.outbox.ended());
        }
    }

    fn on_read_error(&mut self, e: ReadError) {
        match e {
            ReadError::Frame(error) => self.close(error.close_code(), &error.to_string()),
            // The peer is gone: nothing more is written, what ended it is 1006 (unless a
            // close was scheduled before).
            ReadError::Eof | ReadError::Io(_) => self.outbox.lost("connection lost"),
        }
    }

    fn close(&mut self, code: u16, reason: &str) {
        self.closing = true;
        self.outbox.close(Close::new(code, reason));
    }

    fn send(&self, json: &[u8]) {
        if self.outbox.push(frame::text(json)) == Push::Overflow {
            Metrics::inc(&self.node.metrics.slow_consumer_closes);
        }
    }

    fn reply(&self, id: Option<u64>, result: &str) {
        if let Some(id) = id {
            self.send(&protocol::encode_result(id, result));
        }
    }

    fn error(&self, id: u64, code: ErrorCode, message: &str) {
        self.node.metrics.record_error(code);
        self.send(&protocol::encode_error(id, code, message));
    }

    /// Boxed by its callers: handling a command takes more state than waiting for one, and
    /// an idle connection's future should only be as large as the waiting.
    async fn on_message(&mut self, text: &[u8]) {
        Metrics::inc(&self.node.metrics.messages_received);
        if !self.commands.take(std::time::Instant::now()) {
            return self.close(
                close::RATE_LIMITED,
                "too many commands (max_commands_per_second)",
            );
        }
        match protocol::decode(text) {
            Ok(request) => self.handle(request).await,
            Err(ProtocolError::Unanswerable(reason)) => self.close(close::BAD_REQUEST, reason),
            Err(ProtocolError::BadCommand { id, message }) => {
                self.error(id, ErrorCode::BadRequest, &message)
            }
        }
    }

    async fn handle(&mut self, Request { id, command }: Request) {
        if self.claims.is_none() {
            match command {
                Command::Connect { token, subs } => self.connect(&token, &subs),
                _ => self.close(close::UNAUTHORIZED, "connect first"),
            }
            return;
        }
        match (id, command) {
            (_, Command::Pong) => self.live.pong(),
            (id, Command::Refresh { token }) => self.refresh(id, &token),
            (Some(id), command) => self.handle_connected(id, command).await,
            (None, _) => self.close(close::BAD_REQUEST, "missing id"),
        }
    }

    async fn handle_connected(&mut self, id: u64, command: Command) {
        let result = match command {
            Command::Connect { .. } => {
                Err((ErrorCode::BadRequest, "already connected".to_string()))
            }
            Command::Subscribe { channel, since } => self.subscribe(id, &channel, since.as_ref()),
            Command::History {
                channel,
                since,
                limit,
                reverse,
            } => self.history(&channel, since.as_ref(), limit, reverse),
            Command::Unsubscribe { channel } => self.unsubscribe(&channel),
            Command::Publish { channel, data } => self.publish(&channel, &data).await,
            Command::Presence { channel } => self.presence(&channel),
            Command::PresenceStats { channel } => self.presence_stats(&channel),
            Command::Rpc { method, data } => self.rpc(id, &method, &data),
            Command::Ping => Ok(Some("{}".to_string())),
            Command::Pong | Command::Refresh { .. } => unreachable!("handled before"),
        };
        match result {
            Ok(Some(result)) => self.reply(Some(id), &result),
            Ok(None) => {}
            Err((code, message)) => self.error(id, code, &message),
        }
    }

    fn connect(&mut self, token: &str, positions: &[(String, Position)]) {
        let claims = match self.node.verifier.verify(token, unix_now()) {
            Ok(claims) => claims,
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                let close = Close::from(&e);
                self.close(close.code, &close.reason);
                return;
            }
        };
        let config = &self.node.config;
        self.send(&protocol::encode_connected(&protocol::Connected {
            kind: "connected",
            version: protocol::PROTOCOL_VERSION,
            server: env!("CARGO_PKG_VERSION"),
            client: &self.id,
            user: &claims.user,
            expires_in: claims.expires_at.saturating_sub(unix_now()),
            ping_interval: config.ping_interval.as_millis().div_ceil(1000) as u64,
            pong_timeout: config.pong_timeout.as_millis().div_ceil(1000) as u64,
        }));
        let info: Option<Arc<RawValue>> = claims.info.clone().map(Arc::from);
        self.node.hub.register(
            self.id.clone(),
            &claims.user,
            info,
            claims.meta.as_deref(),
            self.outbox.clone(),
        );
        self.live.authenticate(claims.expires_at);
        Metrics::inc(&self.node.metrics.connects);
        let (hub, me) = (&self.node.hub, &self.id);
        for channel in &claims.subs {
            let since = positions.iter().find(|(c, _)| c == channel).map(|(_, p)| p);
            // The `sub` push carries the channel's position, and what was missed since the
            // position the client gave for it.
            let budget = self.recovery_budget();
            let subscribed = self
                .node
                .broker
                .subscribe(channel, since, budget, |attach| {
                    let first = frame::text(&protocol::encode_sub(channel, &attach));
                    hub.subscribe(me, channel, Origin::Server, first)
                });
            match subscribed {
                Ok(flush) => flush.run(),
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "subscription from the subs claim not made")
                }
            }
        }
        self.claims = Some(claims);
    }

    fn refresh(&mut self, id: Option<u64>, token: &str) {
        let refused =
            |session: &mut Session, code: ErrorCode, message: String, close: Close| match id {
                Some(id) => session.error(id, code, &message),
                None => session.close(close.code, &close.reason),
            };
        let claims = match self.node.verifier.verify(token, unix_now()) {
            Ok(claims) => claims,
            Err(e) => {
                return refused(
                    self,
                    ErrorCode::Unauthorized,
                    e.to_string(),
                    Close::from(&e),
                )
            }
        };
        let current = self.claims.as_ref().expect("refresh needs a connection");
        if claims.user != current.user {
            let message = "token is for another user".to_string();
            return refused(
                self,
                ErrorCode::Forbidden,
                message.clone(),
                Close::new(close::UNAUTHORIZED, message),
            );
        }
        self.live.set_expiry(claims.expires_at);
        self.node
            .hub
            .update_info(&self.id, claims.info.clone().map(Arc::from));
        for (channel, origin) in self.node.hub.subscriptions(&self.id) {
            if origin == Origin::Client && !self.may_subscribe(&claims, &channel) {
                self.node
                    .hub
                    .unsubscribe(&self.id, &channel, Some(protocol::UnsubReason::Revoked));
            }
        }
        let expires_in = claims.expires_at.saturating_sub(unix_now());
        self.claims = Some(claims);
        self.reply(id, &format!(r#"{{"expires_in":{expires_in}}}"#));
    }

    fn may_subscribe(&self, claims: &Claims, channel: &str) -> bool {
        granted(&claims.channels, channel)
            || self.node.hub.options(channel).public
            || claims.subs.iter().any(|s| s == channel)
    }

    fn subscribe(&mut self, id: u64, name: &str, since: Option<&Position>) -> CommandResult {
        channel::validate(name).map_err(bad_request)?;
        if self.node.hub.is_subscribed(&self.id, name) {
            return Err((ErrorCode::AlreadySubscribed, "already subscribed".into()));
        }
        let claims = self.claims.as_ref().expect("connected");
        if !self.may_subscribe(claims, name) {
            return Err((
                ErrorCode::Forbidden,
                "no permission to subscribe to this channel".into(),
            ));
        }
        // The reply (with the position and any recovered publications) is queued by the hub
        // under the channel's lock while the engine holds back the channel's publications: it
        // precedes every publication the subscription receives, and none falls in between.
        let (hub, me) = (&self.node.hub, &self.id);
        let budget = self.recovery_budget();
        self.node
            .broker
            .subscribe(name, since, budget, |attach| {
                let reply = frame::text(&protocol::encode_subscribe_result(id, &attach));
                hub.subscribe(me, name, Origin::Client, reply)
            })
            .map_err(|e| (hub_error_code(&e), e.to_string()))?
            .run();
        Ok(None)
    }

    /// What a recovery may add to this connection's queue: half the bound, less what is
    /// queued already, so that a recovery (or several at connect) never trips the
    /// slow-consumer close.
    fn recovery_budget(&self) -> usize {
        (self.node.config.max_queue_bytes / 2).saturating_sub(self.outbox.held())
    }

    fn history(
        &mut self,
        name: &str,
        since: Option<&Position>,
        limit: usize,
        reverse: bool,
    ) -> CommandResult {
        channel::validate(name).map_err(bad_request)?;
        if !self.node.hub.is_subscribed(&self.id, name) {
            return Err((
                ErrorCode::Forbidden,
                "subscribe to the channel first".into(),
            ));
        }
        let max = self.node.config.max_recovery;
        if limit > max {
            return Err((
                ErrorCode::BadRequest,
                format!("limit must be at most max_recovery ({max})"),
            ));
        }
        let Some((entries, position)) =
            self.node
                .broker
                .history(name, since.map(|p| p.offset), limit, reverse)
        else {
            return Err((
                ErrorCode::NotAvailable,
                "history is not enabled for this channel".into(),
            ));
        };
        if since.is_some_and(|since| !since.epoch.is_empty() && since.epoch != position.epoch) {
            return Err((
                ErrorCode::UnrecoverablePosition,
                "the channel's stream has a new epoch: that position is gone".into(),
            ));
        }
        // Measured before anything is encoded: a page too large is refused, not built.
        let max_bytes = self.node.config.max_queue_bytes / 4;
        let size: usize = entries
            .iter()
            .map(|e| e.data.len() + crate::broker::ENTRY_OVERHEAD)
            .sum();
        if size > max_bytes {
            return Err((
                ErrorCode::LimitExceeded,
                format!("history page is larger than {max_bytes} bytes: ask for fewer"),
            ));
        }
        Ok(Some(protocol::encode_history(&entries, &position)))
    }

    fn unsubscribe(&mut self, name: &str) -> CommandResult {
        channel::validate(name).map_err(bad_request)?;
        self.node.hub.unsubscribe(&self.id, name, None);
        Ok(Some("{}".into()))
    }

    async fn publish(&mut self, name: &str, data: &RawValue) -> CommandResult {
        channel::validate(name).map_err(bad_request)?;
        let claims = self.claims.as_ref().expect("connected");
        let max = self.node.config.max_publication_size;
        if data.get().len() > max {
            return Err((
                ErrorCode::LimitExceeded,
                format!("data is larger than max_publication_size ({max} bytes)"),
            ));
        }
        let allowed = granted(&claims.publish, name)
            || (self.node.hub.options(name).allow_client_publish
                && self.node.hub.is_subscribed(&self.id, name));
        if !allowed {
            return Err((
                ErrorCode::Forbidden,
                "no permission to publish to this channel".into(),
            ));
        }
        let published = self
            .node
            .broker
            .publish(name, data.get().as_bytes(), None)
            .await
            .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?;
        let events = &self.node.events;
        if events.wants(pb::EventKind::Publish) {
            let publish = pb::PublishEvent {
                channel: name.to_string(),
                data: data.get().as_bytes().to_vec(),
                offset: published.offset,
                epoch: published.epoch,
            };
            let user = &self.claims.as_ref().expect("connected").user;
            events.emit(&self.id, user, pb::event::Kind::Publish(publish));
        }
        Ok(Some("{}".into()))
    }

    /// Sends an rpc to a backend; the reply is queued when the backend answers (or at
    /// rpc_timeout) by a task of its own, so the connection goes on reading meanwhile.
    fn rpc(&mut self, id: u64, method: &str, data: &RawValue) -> CommandResult {
        if method.is_empty() || method.len() > MAX_METHOD {
            return Err((
                ErrorCode::BadRequest,
                format!("method must be 1 to {MAX_METHOD} bytes"),
            ));
        }
        let max = self.node.config.max_publication_size;
        if data.get().len() > max {
            return Err((
                ErrorCode::LimitExceeded,
                format!("data is larger than max_publication_size ({max} bytes)"),
            ));
        }
        let max = self.node.config.max_rpc_in_flight;
        if self.rpcs.load(Relaxed) >= max {
            return Err((
                ErrorCode::LimitExceeded,
                format!("more than max_rpc_in_flight ({max}) rpcs waiting"),
            ));
        }
        let user = &self.claims.as_ref().expect("connected").user;
        let events = self.node.events.clone();
        let metrics = self.node.metrics.clone();
        let (rpc_id, answer) = events
            .rpc(&self.id, user, method, data.get().as_bytes())
            .map_err(|e| {
                metrics.record_rpc("no_backend");
                (ErrorCode::Unavailable, e.to_string())
            })?;
        self.rpcs.fetch_add(1, Relaxed);
        let (outbox, rpcs, conn) = (self.outbox.clone(), self.rpcs.clone(), self.conn.clone());
        let timeout = self.node.config.rpc_timeout;
        tokio::spawn(async move {
            let answer = tokio::select! {
                answer = tokio::time::timeout(timeout, answer) => answer,
                _ = conn.cancelled() => {
                    events.forget_rpc(&rpc_id);
                    return;
                }
            };
            events.forget_rpc(&rpc_id);
            rpcs.fetch_sub(1, Relaxed);
            let unavailable = |message: &str| {
                metrics.record_error(ErrorCode::Unavailable);
                protocol::encode_error(id, ErrorCode::Unavailable, message)
            };
            let reply = match answer {
                Ok(Ok(RpcAnswer::Data(data))) => {
                    metrics.record_rpc("ok");
                    let result = format!(r#"{{"data":{}}}"#, String::from_utf8_lossy(&data));
                    protocol::encode_result(id, &result)
                }
                Ok(Ok(RpcAnswer::Error { code, message })) => {
                    metrics.record_rpc("error");
                    metrics.record_error(ErrorCode::RpcError);
                    protocol::encode_rpc_error(id, code, &message)
                }
                Ok(Ok(RpcAnswer::Gone) | Err(_)) => {
                    metrics.record_rpc("backend_gone");
                    unavailable("the backend went away before answering")
                }
                Err(_) => {
                    metrics.record_rpc("timeout");
                    unavailable("no answer within rpc_timeout")
                }
            };
            outbox.push(frame::text(&reply));
        });
        Ok(None)
    }

    fn presence(&mut self, name: &str) -> CommandResult {
        self.check_presence_access(name)?;
        let members = self
            .node
            .hub
            .presence(name)
            .ok_or_else(presence_not_enabled)?;
        // `info` was validated as a JSON object at connect: it is passed through verbatim.
        let mut reply = String::from(r#"{"clients":{"#);
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                reply.push(',');
            }
            let entry = format!(
                r#"{}:{{"user":{},"info":{}}}"#,
                serde_json::Value::from(m.client.as_str()),
                serde_json::Value::from(m.user.as_str()),
                m.info.as_deref().map_or("null", RawValue::get)
            );
            reply.push_str(&entry);
        }
        reply.push_str("}}");
        // A reply the queue could not hold would close the asker as a slow consumer.
        let max = self.node.config.max_queue_bytes / 4;
        if reply.len() > max {
            return Err((
                ErrorCode::LimitExceeded,
                format!(
                    "presence is larger than {max} bytes: use presence_stats or the control API"
                ),
            ));
        }
        Ok(Some(reply))
    }

    fn presence_stats(&mut self, name: &str) -> CommandResult {
        self.check_presence_access(name)?;
        let (clients, users) = self
            .node
            .hub
            .presence_stats(name)
            .ok_or_else(presence_not_enabled)?;
        Ok(Some(format!(
            r#"{{"num_clients":{clients},"num_users":{users}}}"#
        )))
    }

    fn check_presence_access(&self, name: &str) -> Result<(), (ErrorCode, String)> {
        channel::validate(name).map_err(bad_request)?;
        if !self.node.hub.is_subscribed(&self.id, name) {
            return Err((
                ErrorCode::Forbidden,
                "subscribe to the channel first".into(),
            ));
        }
        Ok(())
    }
}

/// Longest rpc method name.
const MAX_METHOD: usize = 256;

/// `Ok(Some(result))` is replied; `Ok(None)` was replied already (queued by the hub).
type CommandResult = Result<Option<String>, (ErrorCode, String)>;

fn bad_request(e: channel::ChannelError) -> (ErrorCode, String) {
    (ErrorCode::BadRequest, e.to_string())
}

fn presence_not_enabled() -> (ErrorCode, String) {
    (
        ErrorCode::NotAvailable,
        "presence is not enabled for this channel".into(),
    )
}

/// The one mapping from hub errors to reply codes.
fn hub_error_code(e: &HubError) -> ErrorCode {
    match e {
        HubError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
        HubError::TooManySubscriptions(_) | HubError::ChannelFull(_) => ErrorCode::LimitExceeded,
        HubError::UnknownClient => ErrorCode::Internal,
    }
}
