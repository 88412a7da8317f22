//! The control API's errors and their one mapping to `tonic::Status`.

use tonic::{Code, Status};

use crate::broker::BrokerError;
use crate::channel::ChannelError;
use crate::events::EventsError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid channel {channel:?}: {error}")]
    Channel {
        channel: String,
        error: ChannelError,
    },
    #[error("invalid pattern {pattern:?}: {error}")]
    Pattern {
        pattern: String,
        error: ChannelError,
    },
    #[error("{0}")]
    Json(String),
    #[error("data is {size} bytes, more than max_publication_size ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("target is empty: set user or client")]
    EmptyTarget,
    #[error("channels is empty")]
    NoChannels,
    #[error("code {0} is not a backend close code (4006, 4503, 4100-4499 or 4600-4999)")]
    Code(u32),
    #[error("presence is not enabled for channel {0:?}")]
    PresenceDisabled(String),
    #[error("history is not enabled for channel {0:?}")]
    HistoryDisabled(String),
    #[error("the stream of channel {0:?} has a new epoch: that position is gone")]
    EpochChanged(String),
    #[error("limit must be at most max_recovery ({0})")]
    Limit(usize),
    #[error("idempotency_key is longer than {0} bytes")]
    KeyTooLong(usize),
    #[error("history page is larger than {0} bytes: ask for fewer")]
    PageTooLarge(usize),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("{0}")]
    Stream(String),
    #[error("no rpc {0:?} is waiting for a reply (unknown, answered, or past rpc_timeout)")]
    UnknownRpc(String),
    #[error("set data or error")]
    NoResult,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::Channel { .. }
            | ApiError::Pattern { .. }
            | ApiError::Json(_)
            | ApiError::TooLarge { .. }
            | ApiError::EmptyTarget
            | ApiError::NoChannels
            | ApiError::Code(_)
            | ApiError::Limit(_)
            | ApiError::KeyTooLong(_)
            | ApiError::NoResult
            | ApiError::Events(
                EventsError::JoinFirst | EventsError::JoinTwice | EventsError::BadJoin(_),
            ) => Code::InvalidArgument,
            ApiError::Events(EventsError::AckTimeout(_)) => Code::Aborted,
            ApiError::Events(EventsError::ShuttingDown) => Code::Unavailable,
            ApiError::Events(EventsError::TooManyGroups(_)) => Code::ResourceExhausted,
            ApiError::Stream(_) => Code::Cancelled,
            ApiError::UnknownRpc(_) => Code::NotFound,
            ApiError::PageTooLarge(_) => Code::ResourceExhausted,
            ApiError::PresenceDisabled(_)
            | ApiError::HistoryDisabled(_)
            | ApiError::EpochChanged(_) => Code::FailedPrecondition,
            ApiError::Broker(BrokerError::Unavailable(_)) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}
