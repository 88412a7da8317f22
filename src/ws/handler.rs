//! One connection's commands: decode a complete text message (`wire::command`), call the
//! node, and reply.
//!
//! Called by the connection's task (`connection`) for each message. The connection's state
//! (its token's claims, its clocks' inputs, its command rate) lives here as plain fields;
//! the hub keeps only what fan-out needs. Replies go through the same outbox as fan-out, so
//! a reply and the publications around it keep their order. Every error reply is made by
//! `error::reply_error` from a typed [`CommandError`].

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::auth::Claims;
use crate::node::{Asker, ClientId, Conn, Node};
use crate::outbox::{Outbox, Push};
use crate::wire::close::{self, Close};
use crate::wire::command::{self, Command, ProtocolError, Request};
use crate::wire::message::Connected;
use crate::wire::{Position, ServerMessage, PROTOCOL_VERSION};
use crate::ws::clock::{unix_now, Liveness};
use crate::ws::error::CommandError;
use crate::ws::rate::CommandRate;
use crate::ws::rpc;

pub(crate) struct Handler {
    id: ClientId,
    node: Node,
    outbox: Arc<Outbox>,
    live: Liveness,
    claims: Option<Claims>,
    /// Cancelled when the connection ends: rpcs still waiting stop waiting.
    conn: CancellationToken,
    /// Rpcs waiting for a backend's answer.
    rpcs: Arc<AtomicUsize>,
    commands: CommandRate,
    /// The `auth_cookie`'s value from the upgrade, until a `connect` has used it.
    cookie: Option<Box<str>>,
}

/// What a command answers when it succeeds: a reply to encode, or nothing (it was queued
/// already, by the node or by a task of its own).
enum Answer {
    Done,
    Queued,
}

type CommandResult = Result<Answer, CommandError>;

// === impl Handler ===

impl Handler {
    pub(crate) fn new(
        node: Node,
        outbox: Arc<Outbox>,
        conn: CancellationToken,
        cookie: Option<Box<str>>,
    ) -> Handler {
        let rate = node.config.max_commands_per_second;
        Handler {
            id: Arc::from(format!("{:032x}", rand::random::<u128>())),
            node,
            outbox,
            live: Liveness::default(),
            claims: None,
            conn,
            rpcs: Arc::new(AtomicUsize::new(0)),
            commands: CommandRate::new(rate),
            cookie,
        }
    }

    pub(crate) fn id(&self) -> &ClientId {
        &self.id
    }

    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub(crate) fn live(&mut self) -> &mut Liveness {
        &mut self.live
    }

    /// Takes the client out of the node once reading is over (or the connection ended).
    pub(crate) fn unregister(&mut self) {
        if self.claims.take().is_some() {
            self.node.disconnected(&self.id, &self.outbox.ended());
        }
    }

    /// Schedules a close after what is queued; frames are then read only for the client's
    /// answer.
    pub(crate) fn end(&self, code: u16, reason: &str) {
        self.outbox.schedule_close(Close::new(code, reason));
    }

    fn send(&self, message: ServerMessage<'_>) {
        if self.outbox.push(message.frame()) == Push::Overflow {
            self.node.metrics.slow_consumer_closes.inc();
        }
    }

    fn error(&self, id: u64, error: &CommandError) {
        let (code, message) = error.reply();
        self.node.metrics.record_error(code);
        self.send(ServerMessage::Error {
            id,
            code,
            message: &message,
        });
    }

    /// Boxed by its callers: handling a command takes more state than waiting for one, and
    /// an idle connection's future should only be as large as the waiting.
    pub(crate) async fn on_message(&mut self, text: &[u8]) {
        self.node.metrics.messages_received.inc();
        if !self.commands.take(std::time::Instant::now()) {
            return self.end(
                close::RATE_LIMITED,
                "too many commands (max_commands_per_second)",
            );
        }
        match command::decode(text) {
            Ok(request) => self.handle(request).await,
            Err(ProtocolError::Unanswerable(reason)) => self.end(close::BAD_REQUEST, reason),
            Err(ProtocolError::BadCommand { id, message }) => {
                self.error(id, &CommandError::BadRequest(message))
            }
        }
    }

    async fn handle(&mut self, Request { id, command }: Request) {
        if self.claims.is_none() {
            match command {
                Command::Connect { token, subs } => {
                    // A token given in the command wins over the session cookie, which is
                    // not kept past the first connect either way.
                    let cookie = self.cookie.take();
                    match token.or_else(|| cookie.map(String::from)) {
                        Some(token) => self.connect(&token, &subs).await,
                        // `decode` gives every connect an id.
                        None => self.error(
                            id.unwrap_or_default(),
                            &CommandError::BadRequest("missing token".into()),
                        ),
                    }
                }
                _ => self.end(close::UNAUTHORIZED, "connect first"),
            }
            return;
        }
        match (id, command) {
            (_, Command::Pong) => self.live.pong(),
            (id, Command::Refresh { token }) => self.refresh(id, &token),
            // Without an id, nothing answers: a wrong acknowledgement is dropped.
            (None, Command::Ack { channel, offset }) => {
                let _ = self.node.ack(&self.id, &channel, offset);
            }
            (Some(id), command) => self.handle_connected(id, command).await,
            (None, _) => self.end(close::BAD_REQUEST, "missing id"),
        }
    }

    async fn handle_connected(&mut self, id: u64, command: Command) {
        let result = match command {
            Command::Connect { .. } => Err(CommandError::BadRequest("already connected".into())),
            Command::Subscribe { channel, since } => {
                self.subscribe(id, &channel, since.as_ref()).await
            }
            Command::History {
                channel,
                since,
                limit,
                reverse,
            } => {
                self.history(id, &channel, since.as_ref(), limit, reverse)
                    .await
            }
            Command::Unsubscribe { channel } => self.unsubscribe(&channel),
            Command::Publish { channel, data } => self.publish(&channel, &data).await,
            Command::Presence { channel } => self.presence(id, &channel).await,
            Command::PresenceStats { channel } => self.presence_stats(id, &channel).await,
            Command::Rpc { method, data } => self.rpc(id, &method, &data),
            Command::Ack { channel, offset } => self
                .node
                .ack(&self.id, &channel, offset)
                .map(|()| Answer::Done)
                .map_err(CommandError::from),
            Command::Ping => Ok(Answer::Done),
            Command::Pong | Command::Refresh { .. } => unreachable!("handled before"),
        };
        match result {
            Ok(Answer::Done) => self.send(ServerMessage::Done { id }),
            Ok(Answer::Queued) => {}
            Err(e) => self.error(id, &e),
        }
    }

    /// Verifies the token, answers `connected`, and joins the node (with the token's
    /// server-side subscriptions, recovered from `positions`).
    pub(crate) async fn connect(&mut self, token: &str, positions: &[(String, Position)]) {
        let claims = match self.node.verifier.verify(token, unix_now()) {
            Ok(claims) => claims,
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                let close = e.close();
                self.end(close.code, &close.reason);
                return;
            }
        };
        let config = &self.node.config;
        self.send(ServerMessage::Connected(Connected {
            kind: "connected",
            version: PROTOCOL_VERSION,
            server: env!("CARGO_PKG_VERSION"),
            client: &self.id,
            user: &claims.user,
            expires_in: claims.expires_at.saturating_sub(unix_now()),
            ping_interval: config.ping_interval.as_millis().div_ceil(1000) as u64,
            pong_timeout: config.pong_timeout.as_millis().div_ceil(1000) as u64,
        }));
        self.live.authenticate(claims.expires_at);
        self.node
            .connect(&self.id, &claims, self.outbox.clone(), positions)
            .await;
        self.claims = Some(claims);
    }

    /// A subscription asked for when the stream opened, once connected; like a `subs`
    /// claim entry, one that cannot be made now (the channel full, already subscribed) is
    /// skipped.
    pub(crate) async fn subscribe_at_open(&mut self, channel: &str, since: Option<&Position>) {
        if self.claims.is_none() {
            return;
        }
        let made = self
            .node
            .client_subscribe_at_open(self.conn(), channel, since)
            .await;
        if let Err(e) = made {
            tracing::debug!(%channel, error = %e, "subscription asked at open not made");
        }
    }

    fn refresh(&mut self, id: Option<u64>, token: &str) {
        let claims = match self.node.verifier.verify(token, unix_now()) {
            Ok(claims) => claims,
            Err(e) => {
                return match id {
                    Some(id) => self.error(id, &CommandError::Token(e.to_string())),
                    None => {
                        let close = e.close();
                        self.end(close.code, &close.reason)
                    }
                }
            }
        };
        let current = self.claims.as_ref().expect("refresh needs a connection");
        if let Err(e) = self.node.refresh(&self.id, current, &claims) {
            let e = CommandError::from(e);
            return match id {
                Some(id) => self.error(id, &e),
                None => self.end(close::UNAUTHORIZED, &e.reply().1),
            };
        }
        self.live.set_expiry(claims.expires_at);
        let expires_in = claims.expires_at.saturating_sub(unix_now());
        self.claims = Some(claims);
        if let Some(id) = id {
            self.send(ServerMessage::Refreshed { id, expires_in });
        }
    }

    fn conn(&self) -> Conn<'_> {
        Conn {
            id: &self.id,
            claims: self.claims.as_ref().expect("connected"),
        }
    }

    async fn subscribe(&mut self, id: u64, name: &str, since: Option<&Position>) -> CommandResult {
        // The reply (with the position and any recovered publications) is queued by the node
        // before any publication of the subscription.
        self.node
            .client_subscribe(self.conn(), id, name, since)
            .await?;
        Ok(Answer::Queued)
    }

    async fn history(
        &mut self,
        id: u64,
        name: &str,
        since: Option<&Position>,
        limit: usize,
        reverse: bool,
    ) -> CommandResult {
        let (publications, position) = self
            .node
            .history(Asker::Client(&self.id), name, since, limit, reverse)
            .await?;
        self.send(ServerMessage::History {
            id,
            publications: &publications,
            position: &position,
        });
        Ok(Answer::Queued)
    }

    fn unsubscribe(&mut self, name: &str) -> CommandResult {
        self.node.unsubscribe(&self.id, name, None)?;
        Ok(Answer::Done)
    }

    async fn publish(&mut self, name: &str, data: &RawValue) -> CommandResult {
        self.node.client_publish(self.conn(), name, data).await?;
        Ok(Answer::Done)
    }

    /// Sends an rpc to a backend; the reply is queued when the backend answers (or at
    /// rpc_timeout) by a task of its own, so the connection goes on reading meanwhile.
    fn rpc(&mut self, id: u64, method: &str, data: &RawValue) -> CommandResult {
        let user = &self.claims.as_ref().expect("connected").user;
        let call = rpc::Call {
            id,
            client: &self.id,
            user,
            method,
            data: data.get().as_bytes(),
        };
        rpc::start(
            &self.node,
            call,
            self.outbox.clone(),
            self.rpcs.clone(),
            self.conn.clone(),
        )?;
        Ok(Answer::Queued)
    }

    async fn presence(&mut self, id: u64, name: &str) -> CommandResult {
        let clients = self.node.presence(Asker::Client(&self.id), name).await?;
        let reply = ServerMessage::Presence {
            id,
            clients: &clients,
        }
        .encode();
        // A result the queue could not hold would close the asker as a slow consumer. The
        // result is the reply less its envelope, `{"id":N,"result":}`.
        let envelope = ServerMessage::Done { id }.encode().len() - "{}".len();
        let max = self.node.config.max_queue_bytes / 4;
        if reply.len() - envelope > max {
            return Err(CommandError::PresenceTooLarge(max));
        }
        self.send_encoded(&reply);
        Ok(Answer::Queued)
    }

    fn send_encoded(&self, json: &[u8]) {
        if self.outbox.push(crate::wire::frame::text(json)) == Push::Overflow {
            self.node.metrics.slow_consumer_closes.inc();
        }
    }

    async fn presence_stats(&mut self, id: u64, name: &str) -> CommandResult {
        let (clients, users) = self
            .node
            .presence_stats(Asker::Client(&self.id), name)
            .await?;
        self.send(ServerMessage::PresenceStats { id, clients, users });
        Ok(Answer::Queued)
    }
}
