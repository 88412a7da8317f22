//! The embedded engine: a publication goes straight to this node's hub.
//!
//! It keeps no history yet, so publications carry no offset and an empty epoch.

use crate::hub::Hub;
use crate::ws::{frame, protocol};

use super::Published;

pub struct MemoryBroker {
    hub: Hub,
}

impl MemoryBroker {
    pub fn new(hub: Hub) -> MemoryBroker {
        MemoryBroker { hub }
    }

    pub fn publish(&self, channel: &str, data: &[u8]) -> Published {
        // Encoded once, frame header included; every subscriber shares these bytes.
        let frame = frame::text(&protocol::encode_pub(channel, data, None));
        let counts = self.hub.fan_out(channel, &frame);
        Published {
            offset: 0,
            epoch: String::new(),
            delivered: counts.queued,
        }
    }
}
