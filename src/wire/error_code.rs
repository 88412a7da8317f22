//! The closed set of error codes a reply carries (docs/protocol.md, errors).

/// The closed set of error codes in replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    NotAvailable,
    AlreadySubscribed,
    UnrecoverablePosition,
    LimitExceeded,
    Unavailable,
    Internal,
    RpcError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotAvailable => "not_available",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::UnrecoverablePosition => "unrecoverable_position",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::RpcError => "rpc_error",
        }
    }

    /// Every code, in declaration order (`code as usize` indexes this).
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NotAvailable,
        ErrorCode::AlreadySubscribed,
        ErrorCode::UnrecoverablePosition,
        ErrorCode::LimitExceeded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::RpcError,
    ];
}
