//! What the node answers without changing anything: history pages, presence, the channels
//! with subscribers, and the node's counts.
//!
//! A client may read only a channel it is subscribed to; a backend may read any. The
//! largest history page is one rule ([`Node::max_page`]), whoever asks.

use crate::wire::channel::Pattern;
use crate::wire::message::ClientInfo;
use crate::wire::{Position, Publication};

use super::{ClientId, Node, NodeError};

/// Who asks a query.
#[derive(Clone, Copy)]
pub enum Asker<'a> {
    /// A backend, over the control API.
    Backend,
    /// A client, through its connection.
    Client(&'a ClientId),
}

/// Node-wide counts for Control.Info and /metrics.
#[derive(Debug, Clone)]
pub struct Info {
    pub node_id: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
    pub subscriptions: usize,
}

/// A backend's page limit: under the 4 MiB that gRPC clients accept by default.
const MAX_BACKEND_PAGE: usize = 3 << 20;

impl Node {
    /// A page of kept publications after `since` (oldest first) or before it (newest first
    /// with `reverse`), at most `limit` (up to max_recovery), and the channel's position. A
    /// `since` with an epoch that is not the channel's is refused: its offsets mean nothing.
    pub async fn history(
        &self,
        asker: Asker<'_>,
        channel: &str,
        since: Option<&Position>,
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<Publication>, Position), NodeError> {
        self.check_read(asker, channel)?;
        let max = self.config.max_recovery;
        if limit > max {
            return Err(NodeError::Limit(max));
        }
        let (page, position) = self
            .broker
            .history(channel, since.map(|p| p.offset), limit, reverse)
            .await?
            .ok_or_else(|| NodeError::HistoryDisabled(channel.to_string()))?;
        if since.is_some_and(|since| !since.epoch.is_empty() && since.epoch != position.epoch) {
            return Err(NodeError::EpochChanged(channel.to_string()));
        }
        // Measured before anything is encoded: a page too large is refused, not built.
        let max_bytes = self.max_page(asker);
        if page.iter().map(Publication::reply_size).sum::<usize>() > max_bytes {
            return Err(NodeError::PageTooLarge(max_bytes));
        }
        Ok((page, position))
    }

    /// The largest history page, in reply bytes: what the asker takes in one message. A
    /// client's reply goes through its queue, bounded by max_queue_bytes: a quarter of it,
    /// so that a page never trips the slow-consumer close.
    fn max_page(&self, asker: Asker<'_>) -> usize {
        match asker {
            Asker::Backend => MAX_BACKEND_PAGE,
            Asker::Client(_) => self.config.max_queue_bytes / 4,
        }
    }

    /// Control.HistoryRemove: drops what a channel keeps; its position stays.
    pub async fn remove_history(&self, channel: &str) -> Result<(), NodeError> {
        Node::check_channel(channel)?;
        if !self.broker.remove_history(channel).await? {
            return Err(NodeError::HistoryDisabled(channel.to_string()));
        }
        Ok(())
    }

    /// Who is subscribed to a channel whose namespace keeps presence.
    pub async fn presence(
        &self,
        asker: Asker<'_>,
        channel: &str,
    ) -> Result<Vec<ClientInfo>, NodeError> {
        self.check_read(asker, channel)?;
        if !self.config.channel_options(channel).presence {
            return Err(NodeError::PresenceDisabled(channel.to_string()));
        }
        Ok(self.broker.presence(channel).await?)
    }

    /// (clients, distinct users) subscribed to a channel whose namespace keeps presence.
    pub async fn presence_stats(
        &self,
        asker: Asker<'_>,
        channel: &str,
    ) -> Result<(usize, usize), NodeError> {
        let clients = self.presence(asker, channel).await?;
        let mut users: Vec<&str> = clients.iter().map(|c| c.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        Ok((clients.len(), users.len()))
    }

    /// Channels with subscribers on this node, matching `pattern` when given.
    pub(super) fn local_channels(&self, pattern: Option<&Pattern>) -> Vec<(String, usize)> {
        self.hub.channels(pattern)
    }

    /// This node's counts (Control.Info lists every node's: [`Node::cluster_info`]).
    pub fn info(&self) -> Info {
        let counts = self.hub.counts();
        Info {
            node_id: self.id.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            connections: counts.connections,
            users: counts.users,
            channels: counts.channels,
            subscriptions: counts.subscriptions,
        }
    }

    /// A valid channel name, and for a client a subscription to it.
    fn check_read(&self, asker: Asker<'_>, channel: &str) -> Result<(), NodeError> {
        Node::check_channel(channel)?;
        if let Asker::Client(id) = asker {
            if !self.hub.is_subscribed(id, channel) {
                return Err(NodeError::Forbidden("subscribe to the channel first"));
            }
        }
        Ok(())
    }
}
