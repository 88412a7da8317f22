//! Why a client's command failed, and the one mapping from that to the reply's error code
//! and message (docs/protocol.md, error codes).

use crate::hub::HubError;
use crate::node::NodeError;
use crate::wire::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command is malformed in itself (decoding, or a field out of its range).
    #[error("{0}")]
    BadRequest(String),
    /// A refresh's token was refused.
    #[error("{0}")]
    Token(String),
    /// The presence reply would not fit in the connection's queue.
    #[error("presence is larger than {0} bytes: use presence_stats or the control API")]
    PresenceTooLarge(usize),
    #[error("more than max_rpc_in_flight ({0}) rpcs waiting")]
    RpcInFlight(usize),
    /// No backend answers the method, or none could take it now.
    #[error("{0}")]
    NoBackend(String),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl CommandError {
    /// The error reply's code and message.
    pub fn reply(&self) -> (ErrorCode, String) {
        let code = match self {
            CommandError::BadRequest(_) => ErrorCode::BadRequest,
            CommandError::Token(_) => ErrorCode::Unauthorized,
            CommandError::PresenceTooLarge(_) | CommandError::RpcInFlight(_) => {
                ErrorCode::LimitExceeded
            }
            CommandError::NoBackend(_) => ErrorCode::Unavailable,
            CommandError::Node(e) => return node_reply(e),
        };
        (code, self.to_string())
    }
}

fn node_reply(e: &NodeError) -> (ErrorCode, String) {
    let code = match e {
        // The client named the channel itself: the reason is enough.
        NodeError::Channel { error, .. } => return (ErrorCode::BadRequest, error.to_string()),
        NodeError::PresenceDisabled(_) => {
            let message = "presence is not enabled for this channel";
            return (ErrorCode::NotAvailable, message.into());
        }
        NodeError::HistoryDisabled(_) => {
            let message = "history is not enabled for this channel";
            return (ErrorCode::NotAvailable, message.into());
        }
        NodeError::ReceiptsDisabled(_) => {
            let message = "receipts are not enabled for this channel";
            return (ErrorCode::NotAvailable, message.into());
        }
        NodeError::EpochChanged(_) => {
            let message = "the channel's stream has a new epoch: that position is gone";
            return (ErrorCode::UnrecoverablePosition, message.into());
        }
        NodeError::Json(_)
        | NodeError::KeyTooLong(_)
        | NodeError::ReceiptDeadline(_)
        | NodeError::NoChannels
        | NodeError::Limit(_)
        | NodeError::Code(_) => ErrorCode::BadRequest,
        NodeError::TooLarge { .. }
        | NodeError::Hub(HubError::TooManySubscriptions(_) | HubError::ChannelFull(_))
        | NodeError::PageTooLarge(_) => ErrorCode::LimitExceeded,
        NodeError::Hub(HubError::AlreadySubscribed) => ErrorCode::AlreadySubscribed,
        NodeError::Forbidden(_) => ErrorCode::Forbidden,
        NodeError::Hub(HubError::UnknownClient) => ErrorCode::Internal,
        NodeError::Engine(_) => ErrorCode::Unavailable,
    };
    (code, e.to_string())
}
