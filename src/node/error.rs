//! The node's errors: what a use-case refuses, typed. Each edge maps them to its wire in one
//! place: `ws::error` to reply codes, `grpc::error` to `tonic::Status`.

use crate::broker::BrokerError;
use crate::hub::HubError;
use crate::wire::channel::ChannelError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid channel {}: {error}", crate::wire::clip(.channel))]
    Channel {
        channel: String,
        error: ChannelError,
    },
    #[error("data is {size} bytes, more than max_publication_size ({max})")]
    TooLarge { size: usize, max: usize },
    /// Not one JSON value in UTF-8.
    #[error("{0}")]
    Json(String),
    #[error("idempotency_key is longer than {0} bytes")]
    KeyTooLong(usize),
    #[error("channels is empty")]
    NoChannels,
    /// The subscription was refused by the hub (already subscribed, a limit, or the
    /// connection is gone).
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The client's token does not allow it.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("presence is not enabled for channel {0:?}")]
    PresenceDisabled(String),
    #[error("history is not enabled for channel {0:?}")]
    HistoryDisabled(String),
    #[error("receipts are not enabled for channel {0:?}")]
    ReceiptsDisabled(String),
    #[error("receipt_timeout_ms must be at most {0} s")]
    ReceiptDeadline(u64),
    #[error("the stream of channel {0:?} has a new epoch: that position is gone")]
    EpochChanged(String),
    #[error("limit must be at most max_recovery ({0})")]
    Limit(usize),
    #[error("history page is larger than {0} bytes: ask for fewer")]
    PageTooLarge(usize),
    #[error("code {0} is not a backend close code (4006, 4503, 4100-4499 or 4600-4999)")]
    Code(u32),
    #[error(transparent)]
    Engine(#[from] BrokerError),
}
