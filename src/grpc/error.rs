//! The control API's errors and their one mapping to `tonic::Status`.

use tonic::{Code, Status};

use crate::broker::BrokerError;
use crate::events::EventsError;
use crate::hub::HubError;
use crate::node::NodeError;
use crate::wire::channel::ChannelError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid pattern {}: {error}", crate::wire::clip(.pattern))]
    Pattern {
        pattern: String,
        error: ChannelError,
    },
    #[error("target is empty: set user or client")]
    EmptyTarget,
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("{0}")]
    Stream(String),
    #[error("no rpc {} is waiting for a reply (unknown, answered, or past rpc_timeout)", crate::wire::clip(.0))]
    UnknownRpc(String),
    #[error("set data or error")]
    NoResult,
    #[error("error.message is {size} bytes, more than max_publication_size ({max})")]
    MessageTooLong { size: usize, max: usize },
    #[error("missing publication")]
    NoPublication,
    #[error(transparent)]
    TraceParent(#[from] crate::wire::traceparent::BadTraceParent),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("no receipt of offset {offset} on channel {}: never published with receipts, expired or forgotten", crate::wire::clip(.channel))]
    NoReceipt { channel: String, offset: u64 },
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::Pattern { .. }
            | ApiError::EmptyTarget
            | ApiError::NoResult
            | ApiError::NoPublication
            | ApiError::TraceParent(_)
            | ApiError::MessageTooLong { .. }
            | ApiError::Events(
                EventsError::JoinFirst | EventsError::JoinTwice | EventsError::BadJoin(_),
            ) => Code::InvalidArgument,
            ApiError::Events(EventsError::AckTimeout(_)) => Code::Aborted,
            ApiError::Events(EventsError::ShuttingDown) | ApiError::ShuttingDown => {
                Code::Unavailable
            }
            ApiError::Events(EventsError::TooManyGroups(_)) => Code::ResourceExhausted,
            ApiError::Stream(_) => Code::Cancelled,
            ApiError::UnknownRpc(_) | ApiError::NoReceipt { .. } => Code::NotFound,
            ApiError::Node(node) => node_code(node),
        };
        Status::new(code, e.to_string())
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        ApiError::Node(e).into()
    }
}

fn node_code(e: &NodeError) -> Code {
    match e {
        NodeError::Channel { .. }
        | NodeError::Json(_)
        | NodeError::TooLarge { .. }
        | NodeError::NoChannels
        | NodeError::Code(_)
        | NodeError::Limit(_)
        | NodeError::KeyTooLong(_)
        | NodeError::ReceiptDeadline(_) => Code::InvalidArgument,
        NodeError::PageTooLarge(_) => Code::ResourceExhausted,
        NodeError::PresenceDisabled(_)
        | NodeError::HistoryDisabled(_)
        | NodeError::ReceiptsDisabled(_)
        | NodeError::EpochChanged(_) => Code::FailedPrecondition,
        NodeError::Engine(BrokerError::Unavailable(_)) => Code::Unavailable,
        // Reached only through a client's connection, never by the control API.
        NodeError::Hub(
            HubError::AlreadySubscribed
            | HubError::TooManySubscriptions(_)
            | HubError::ChannelFull(_),
        ) => Code::ResourceExhausted,
        NodeError::Hub(HubError::UnknownClient) => Code::NotFound,
        NodeError::Forbidden(_) => Code::PermissionDenied,
    }
}
