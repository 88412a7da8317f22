//! The close codes of protocol v1: one table.
//!
//! Clients act on the range for a code they do not know: 4000–4499 they may reconnect,
//! 4500–4999 they must not reconnect unchanged. Backends pick codes in 4100–4499 or
//! 4600–4999 through Control.Disconnect. docs/protocol.md carries the same table.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    pub fn new(code: u16, reason: impl Into<String>) -> Close {
        Close {
            code,
            reason: reason.into(),
        }
    }
}

pub const NORMAL: u16 = 1000;
pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
/// Reported locally (in disconnect events) for a connection that ended without a close.
pub const ABNORMAL: u16 = 1006;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const TOO_BIG: u16 = 1009;
pub const INTERNAL: u16 = 1011;
pub const UNAUTHORIZED: u16 = 4001;
pub const TOKEN_EXPIRED: u16 = 4002;
pub const SLOW_CONSUMER: u16 = 4004;
pub const RATE_LIMITED: u16 = 4005;
pub const BACKEND_RECONNECT: u16 = 4006;
pub const TIMEOUT: u16 = 4007;
pub const BAD_REQUEST: u16 = 4500;
pub const BACKEND_NO_RECONNECT: u16 = 4503;

/// True for the codes a Close frame may carry (RFC 6455 §7.4): 1005, 1006 and 1015 are
/// only ever reported locally, and the rest below 3000 are reserved.
pub fn may_be_sent(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// True for the codes a backend may choose in Control.Disconnect.
pub fn is_backend_code(code: u32) -> bool {
    matches!(code, 4006 | 4503 | 4100..=4499 | 4600..=4999)
}
