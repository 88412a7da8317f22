//! Client rpc routing: which member of which group answers a method, and the answers.
//!
//! A client's `rpc` goes to one member of the group whose `rpc_methods` has the longest
//! prefix of the method (ties to the group name that sorts first), on that member's own rpc
//! channel; the backend's Reply resolves the waiting client through a oneshot. A member that
//! leaves fails its rpcs at once (`take_member`).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{unix_ms, Body, Delivery, EventKind, Events, PendingRpc, RpcAnswer, RpcError, What};

impl Events {
    /// Sends an rpc to one member of the group that answers `method`. The receiver resolves
    /// with the answer; the caller bounds the wait and calls [`Events::forget_rpc`] after.
    pub fn rpc(
        &self,
        client: &str,
        user: &str,
        method: &str,
        data: &[u8],
    ) -> Result<(String, oneshot::Receiver<RpcAnswer>), RpcError> {
        let no_backend = || RpcError::NoBackend(method.to_string());
        if !self.wants(EventKind::Rpc) {
            return Err(no_backend());
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        // The longest matching prefix wins; ties go to the group name that sorts first.
        let Some(order) = state
            .groups
            .iter()
            .filter(|(_, g)| g.wants(EventKind::Rpc) && g.has_members())
            .filter_map(|(name, g)| {
                let prefix = if g.rpc_methods.is_empty() {
                    Some(0)
                } else {
                    g.rpc_methods
                        .iter()
                        .filter(|p| method.starts_with(p.as_str()))
                        .map(String::len)
                        .max()
                }?;
                Some((std::cmp::Reverse(prefix), name.as_str(), g))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, g)| g.rpc_order(client))
        else {
            return Err(no_backend());
        };
        let rpc_id = format!("{:032x}", rand::random::<u128>());
        let response = Delivery {
            seq: 0,
            redelivered: false,
            body: Arc::new(Body {
                client: Arc::from(client),
                user: Arc::from(user),
                time_ms: unix_ms(),
                what: What::Rpc {
                    rpc_id: rpc_id.clone(),
                    method: method.to_string(),
                    data: data.to_vec(),
                },
            }),
        };
        for member in order {
            let Some(handle) = state.members.get(&member) else {
                continue;
            };
            // A member whose rpc channel is full is not reading: try the next one.
            if handle.rpcs.try_send(response.clone()).is_ok() {
                let (answer, rx) = oneshot::channel();
                state
                    .rpcs
                    .insert(rpc_id.clone(), PendingRpc { member, answer });
                return Ok((rpc_id, rx));
            }
        }
        Err(no_backend())
    }

    /// The backend's answer to an rpc; false when nobody waits for that rpc_id.
    pub fn reply(&self, rpc_id: &str, answer: RpcAnswer) -> bool {
        let pending = self.lock().rpcs.remove(rpc_id);
        match pending {
            Some(p) => p.answer.send(answer).is_ok(),
            None => false,
        }
    }

    /// The client stopped waiting for an rpc (timeout or disconnect).
    pub fn forget_rpc(&self, rpc_id: &str) {
        self.lock().rpcs.remove(rpc_id);
    }
}
