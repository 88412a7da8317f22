//! Publishing: a backend's Publish and Broadcast, and a client's `publish`.
//!
//! Each checks the channel and the data once, then hands the publication to the engine,
//! which appends it where the channel keeps history and delivers it to the hub (see
//! `broker`'s contract); a client's publication is also reported to the backends.

use std::time::Duration;

use serde_json::value::RawValue;

use crate::broker::Published;
use crate::events::{EventKind, What};
use crate::wire::channel::granted;
use crate::wire::TraceParent;

use super::{Conn, Node, NodeError};

/// Longest Publish idempotency_key: keys are remembered for idempotency_window.
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub use crate::config::MAX_RECEIPT_DEADLINE;

/// Whether a Publish asks for its delivery receipt, and with which deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithReceipt {
    No,
    /// The namespace's `receipt_timeout`.
    Default,
    Within(Duration),
}

impl Node {
    /// Publishes `data` (checked here: size and JSON) to `channel`. With an `idempotency_key`
    /// seen for this channel within idempotency_window, returns the first result and
    /// publishes nothing. With `receipt`, its delivery receipt is tallied with that deadline
    /// (None: the namespace's receipt_timeout) on every node that delivers it. With `trace`,
    /// the publication is part of that trace on every node (`crate::trace`).
    pub async fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
        receipt: WithReceipt,
        trace: Option<&TraceParent>,
    ) -> Result<Published, NodeError> {
        Node::check_channel(channel)?;
        self.check_data(data)?;
        let receipt = self.receipt_deadline(channel, receipt)?;
        if idempotency_key.is_some_and(|key| key.len() > MAX_IDEMPOTENCY_KEY) {
            return Err(NodeError::KeyTooLong(MAX_IDEMPOTENCY_KEY));
        }
        Ok(self
            .broker
            .publish(channel, data, idempotency_key, receipt, trace)
            .await?)
    }

    /// Publishes the same data to every channel, in order; stops at the first failure.
    pub async fn broadcast(
        &self,
        channels: &[String],
        data: &[u8],
    ) -> Result<Vec<Published>, NodeError> {
        if channels.is_empty() {
            return Err(NodeError::NoChannels);
        }
        for channel in channels {
            Node::check_channel(channel)?;
        }
        self.check_data(data)?;
        let mut results = Vec::with_capacity(channels.len());
        for channel in channels {
            results.push(self.broker.publish(channel, data, None, None, None).await?);
        }
        Ok(results)
    }

    /// A client's publication: allowed by a `publish` grant, or to a channel it is
    /// subscribed to where the namespace has allow_client_publish. `data` was decoded as
    /// JSON with the command.
    pub async fn client_publish(
        &self,
        conn: Conn<'_>,
        channel: &str,
        data: &RawValue,
    ) -> Result<Published, NodeError> {
        Node::check_channel(channel)?;
        let data = data.get().as_bytes();
        self.data_size(data.len())?;
        crate::wire::json::check_depth(data).map_err(NodeError::Json)?;
        let allowed = granted(&conn.claims.publish, channel)
            || (self.config.channel_options(channel).allow_client_publish
                && self.hub.is_subscribed(conn.id, channel));
        if !allowed {
            return Err(NodeError::Forbidden(
                "no permission to publish to this channel",
            ));
        }
        let published = self.broker.publish(channel, data, None, None, None).await?;
        if self.events.wants(EventKind::Publish) {
            let publish = What::Publish {
                channel: channel.to_string(),
                data: data.to_vec(),
                offset: published.offset,
                epoch: published.epoch.clone(),
            };
            self.events.emit(conn.id, &conn.claims.user, publish);
        }
        Ok(published)
    }

    /// The deadline of a publication's receipt, checked: the namespace must have receipts.
    fn receipt_deadline(
        &self,
        channel: &str,
        receipt: WithReceipt,
    ) -> Result<Option<Duration>, NodeError> {
        let options = self.config.channel_options(channel);
        let deadline = match receipt {
            WithReceipt::No => return Ok(None),
            WithReceipt::Default => options.receipt_timeout,
            WithReceipt::Within(deadline) => deadline,
        };
        if !options.receipts {
            return Err(NodeError::ReceiptsDisabled(channel.to_string()));
        }
        if deadline.is_zero() || deadline > MAX_RECEIPT_DEADLINE {
            return Err(NodeError::ReceiptDeadline(MAX_RECEIPT_DEADLINE.as_secs()));
        }
        Ok(Some(deadline))
    }
}
