//! Subscribing and unsubscribing connections: by the client itself, by a backend
//! (Control.Subscribe, Control.Unsubscribe), or from the token's `subs` at connect.
//!
//! A subscription is made inside the engine's subscribe, so that reading the channel's
//! position (and recovering what the client missed) and joining its subscribers happen with
//! no publication in between: the reply (or `sub` push) is queued first, then every
//! publication the subscription receives.

use crate::auth::Claims;
use crate::hub::{HubError, SubscribedBy};
use crate::wire::channel::granted;
use crate::wire::message::UnsubReason;
use crate::wire::{Position, Recovery, ServerMessage};

use super::{ClientId, Conn, Node, NodeError, Target};

/// What Control.Subscribe did to a target's connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    pub subscribed: u32,
    pub already_subscribed: u32,
    pub limit_exceeded: u32,
}

impl Node {
    /// A client's `subscribe` (command `id`): allowed by a `channels` grant, a public
    /// namespace or the token's `subs`. The reply carries the position and what was
    /// recovered since `since`.
    pub async fn client_subscribe(
        &self,
        conn: Conn<'_>,
        id: u64,
        channel: &str,
        since: Option<&Position>,
    ) -> Result<(), NodeError> {
        Node::check_channel(channel)?;
        if self.hub.is_subscribed(conn.id, channel) {
            return Err(HubError::AlreadySubscribed.into());
        }
        self.check_client_subscribe(conn.claims, channel)?;
        self.subscribe(conn.id, channel, since, Some(id)).await
    }

    /// A subscription the client asked for when it opened its stream (the SSE transport's
    /// `channel` parameters): the same checks as `client_subscribe`, announced with a
    /// `sub` push, and revoked by a refresh like the client's own.
    pub async fn client_subscribe_at_open(
        &self,
        conn: Conn<'_>,
        channel: &str,
        since: Option<&Position>,
    ) -> Result<(), NodeError> {
        if self.hub.is_subscribed(conn.id, channel) {
            return Err(HubError::AlreadySubscribed.into());
        }
        self.check_client_subscribe(conn.claims, channel)?;
        self.subscribe_as(conn.id, channel, since, SubscribedBy::Client, None)
            .await
    }

    /// Whether a client may subscribe to `channel` itself: a valid name, and a grant.
    pub fn check_client_subscribe(&self, claims: &Claims, channel: &str) -> Result<(), NodeError> {
        Node::check_channel(channel)?;
        if !self.may_subscribe(claims, channel) {
            return Err(NodeError::Forbidden(
                "no permission to subscribe to this channel",
            ));
        }
        Ok(())
    }

    /// Subscribes one connection. `reply_to`: the client's command id (a client's own
    /// subscription, answered with its reply), or None for a server-side subscription
    /// (announced with a `sub` push, never revoked by a token refresh).
    pub async fn subscribe(
        &self,
        conn: &ClientId,
        channel: &str,
        since: Option<&Position>,
        reply_to: Option<u64>,
    ) -> Result<(), NodeError> {
        let by = match reply_to {
            Some(_) => SubscribedBy::Client,
            None => SubscribedBy::Server,
        };
        self.subscribe_as(conn, channel, since, by, reply_to).await
    }

    /// Subscribes one connection, answered with the reply to `reply_to` or else a `sub`
    /// push.
    async fn subscribe_as(
        &self,
        conn: &ClientId,
        channel: &str,
        since: Option<&Position>,
        by: SubscribedBy,
        reply_to: Option<u64>,
    ) -> Result<(), NodeError> {
        Node::check_channel(channel)?;
        let budget = self.recovery_budget(conn);
        let hub = &self.hub;
        let receipts = self.config.channel_options(channel).receipts;
        let flush = self
            .broker
            .subscribe(channel, since, budget, |mut attach| {
                attach.receipts = receipts;
                let first = match reply_to {
                    Some(id) => ServerMessage::Subscribed {
                        id,
                        attach: &attach,
                    },
                    None => ServerMessage::Sub {
                        channel,
                        attach: &attach,
                    },
                };
                let flush = hub.subscribe(conn, channel, by, first.frame())?;
                if let (true, Some(position)) = (receipts, &attach.position) {
                    // Still under the engine's lock: no publication comes in between.
                    let (from, recovered) = match (&attach.recovery, since) {
                        (Some(Recovery::Complete(publications)), Some(since)) => (
                            since.offset + 1,
                            publications.iter().map(|p| p.offset).collect(),
                        ),
                        _ => (position.offset + 1, Vec::new()),
                    };
                    hub.reading(conn, channel, from, recovered.into_iter());
                }
                Ok::<_, crate::hub::HubError>(flush)
            })
            .await??;
        flush.run();
        Ok(())
    }

    /// Control.Subscribe on this node: every connection of the target here, with a `sub`
    /// push each.
    pub(super) async fn subscribe_target_local(
        &self,
        target: &Target,
        channel: &str,
    ) -> Result<Subscribed, NodeError> {
        Node::check_channel(channel)?;
        let mut out = Subscribed::default();
        for (id, _) in self.hub.connections(target) {
            match self.subscribe(&id, channel, None, None).await {
                Ok(()) => out.subscribed += 1,
                Err(NodeError::Hub(HubError::AlreadySubscribed)) => out.already_subscribed += 1,
                Err(NodeError::Hub(
                    HubError::TooManySubscriptions(_) | HubError::ChannelFull(_),
                )) => out.limit_exceeded += 1,
                // The connection ended meanwhile.
                Err(NodeError::Hub(HubError::UnknownClient)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Ends a connection's subscription; `notify` pushes `unsub` with that reason. False
    /// when it was not subscribed.
    pub fn unsubscribe(
        &self,
        conn: &ClientId,
        channel: &str,
        notify: Option<UnsubReason>,
    ) -> Result<bool, NodeError> {
        Node::check_channel(channel)?;
        Ok(self.hub.unsubscribe(conn, channel, notify))
    }

    /// Control.Unsubscribe on this node: every connection of the target here, told with an
    /// `unsub` push.
    pub(super) fn unsubscribe_target_local(
        &self,
        target: &Target,
        channel: &str,
    ) -> Result<u32, NodeError> {
        Node::check_channel(channel)?;
        let mut unsubscribed = 0;
        for (id, _) in self.hub.connections(target) {
            if self
                .hub
                .unsubscribe(&id, channel, Some(UnsubReason::Backend))
            {
                unsubscribed += 1;
            }
        }
        Ok(unsubscribed)
    }

    /// Whether a token lets its client subscribe to `channel` itself.
    pub(super) fn may_subscribe(&self, claims: &Claims, channel: &str) -> bool {
        granted(&claims.channels, channel)
            || self.config.channel_options(channel).public
            || claims.subs.iter().any(|s| s == channel)
    }

    /// What a recovery may add to a connection's queue: half the bound, less what is
    /// queued already, so that a recovery (or several at connect) never trips the
    /// slow-consumer close.
    fn recovery_budget(&self, conn: &ClientId) -> usize {
        let held = self.hub.held(conn);
        (self.config.max_queue_bytes / 2).saturating_sub(held)
    }
}
