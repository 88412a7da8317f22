//! A connection's life as the node sees it (connect, token refresh, end) and what a backend
//! does to connections (Control.Send, Control.Disconnect).
//!
//! The WebSocket edge verifies the token and sends `connected`; from then on the connection
//! is known here by its id, and everything queued to it goes through its outbox.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::auth::Claims;
use crate::hub::SubscribedBy;
use crate::outbox::Outbox;
use crate::wire::close::{self, Close};
use crate::wire::message::UnsubReason;
use crate::wire::{Position, ServerMessage};

use super::{ClientId, Node, NodeError, Target};

impl Node {
    /// Adds an authenticated connection (a `connect` event for the backends), then makes
    /// the token's server-side subscriptions, each recovering from the position the client
    /// gave for it in `positions`.
    pub async fn connect(
        &self,
        id: &ClientId,
        claims: &Claims,
        outbox: Arc<Outbox>,
        positions: &[(String, Position)],
    ) {
        let info: Option<Arc<RawValue>> = claims.info.clone().map(Arc::from);
        self.hub.register(
            id.clone(),
            &claims.user,
            info,
            claims.meta.as_deref(),
            outbox,
        );
        self.metrics.connects.inc();
        for channel in &claims.subs {
            let since = positions.iter().find(|(c, _)| c == channel).map(|(_, p)| p);
            if let Err(e) = self.subscribe(id, channel, since, None).await {
                tracing::warn!(%channel, error = %e, "subscription from the subs claim not made");
            }
        }
    }

    /// A token refresh: the new token must be for the same user. Its `info` replaces the
    /// old one, and the client's own subscriptions it no longer grants end with an `unsub`
    /// push (2001); server-side subscriptions stay.
    pub fn refresh(&self, id: &ClientId, current: &Claims, new: &Claims) -> Result<(), NodeError> {
        if new.user != current.user {
            return Err(NodeError::Forbidden("token is for another user"));
        }
        self.hub.update_info(id, new.info.clone().map(Arc::from));
        for (channel, by) in self.hub.subscriptions(id) {
            if by == SubscribedBy::Client && !self.may_subscribe(new, &channel) {
                self.hub
                    .unsubscribe(id, &channel, Some(UnsubReason::Revoked));
            }
        }
        Ok(())
    }

    /// The connection ended with `close`: it leaves every channel (with `leave` pushes where
    /// enabled) and its one `disconnect` event is reported.
    pub fn disconnected(&self, id: &ClientId, close: &Close) {
        self.hub.unregister(id, close);
    }

    /// Control.Send on this node: a `message` push to every connection of the target here;
    /// how many took it.
    pub(super) fn send_local(&self, target: &Target, data: &[u8]) -> Result<u32, NodeError> {
        self.check_data(data)?;
        let message = ServerMessage::Message { data }.frame();
        let mut delivered = 0;
        for (_, outbox) in self.hub.connections(target) {
            if outbox.push(message.clone()).accepted() {
                delivered += 1;
            }
        }
        Ok(delivered)
    }

    /// Control.Disconnect on this node: closes every connection of the target here with
    /// `code` (0: 4006) and `reason`; the code used, and how many were not closing already.
    pub(super) fn disconnect_local(
        &self,
        target: &Target,
        code: u32,
        reason: &str,
    ) -> Result<(u16, u32), NodeError> {
        let code = match code {
            0 => close::BACKEND_RECONNECT,
            code if close::is_backend_code(code) => code as u16,
            code => return Err(NodeError::Code(code)),
        };
        let reason = if reason.is_empty() {
            "disconnected by the backend"
        } else {
            reason
        };
        let mut disconnected = 0;
        for (_, outbox) in self.hub.connections(target) {
            if outbox.schedule_close(Close::new(code, reason)) {
                disconnected += 1;
            }
        }
        Ok((code, disconnected))
    }

    /// A client acknowledges every publication of a `receipts` channel up to `offset`.
    pub fn ack(&self, id: &ClientId, channel: &str, offset: u64) -> Result<(), NodeError> {
        Node::check_channel(channel)?;
        if !self.config.channel_options(channel).receipts {
            return Err(NodeError::ReceiptsDisabled(channel.to_string()));
        }
        if !self.hub.ack(id, channel, offset) {
            return Err(NodeError::Forbidden("subscribe to the channel first"));
        }
        Ok(())
    }

    /// Every connection's outbox, for the drain at shutdown.
    pub fn all_connections(&self) -> Vec<Arc<Outbox>> {
        self.hub.all_connections()
    }
}
