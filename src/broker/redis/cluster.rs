//! The nodes of a cluster: who is alive, and orders one node gives the others.
//!
//! Each node adds itself to a sorted set (`<prefix>:nodes`, scored with when it expires)
//! every CANARY_INTERVAL; it is alive while that score is in the future, so a node that
//! dies drops out within redis_presence_ttl. An order (what Control.Send, Disconnect,
//! Subscribe, Unsubscribe, Channels and Info ask of every node) is published on the
//! cluster's control topic; every other node hands it to its node through
//! [`Orders`](super::Orders) and publishes the answer on the asker's reply topic. The asker
//! waits for every live node's answer, at most redis_timeout. All of it lives on the first
//! address.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{BrokerError, Inner};
use crate::events::What;

/// An order from another node, to carry out here and answer.
pub struct Order {
    pub body: Box<RawValue>,
    id: u64,
    from: String,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    id: u64,
    /// The asking node (an order) or the answering one (an answer).
    node: String,
    body: Box<RawValue>,
}

/// Orders this node asked and the answers that came.
#[derive(Default)]
pub struct Asked {
    waiting: Mutex<HashMap<u64, Waiting>>,
}

struct Waiting {
    expected: HashSet<String>,
    answers: Vec<Box<RawValue>>,
    done: Option<oneshot::Sender<Vec<Box<RawValue>>>>,
}

/// The disconnect code of a connection whose node died: it ended without a close frame.
pub const NODE_LOST: u16 = 1006;
const NODE_LOST_REASON: &str = "its node stopped";

/// How many orders from other nodes may wait for this node to carry them out.
pub const ORDER_QUEUE: usize = 1024;

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Inner {
    /// Redis's clock (this node's, corrected by the offset measured at each heartbeat): every
    /// expiry the nodes compare is on it, so their own clocks need not agree.
    pub(super) fn now_ms(&self) -> u64 {
        (local_ms() + self.clock_offset.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Measures how far Redis's clock is from this node's (half a round trip is noise).
    async fn measure_clock(&self) -> Result<(), BrokerError> {
        let before = local_ms();
        // Through a script on the nodes' key, so that every node reads one Redis clock
        // (a cluster would send a plain TIME to any of its nodes).
        let invocation = self.scripts.time.key(self.keys.nodes());
        let (secs, micros): (i64, i64) = self.links[0]
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let after = local_ms();
        let redis = secs * 1000 + micros / 1000;
        self.clock_offset
            .store(redis - (before + after) / 2, Ordering::Relaxed);
        Ok(())
    }

    /// Marks this node alive for another redis_presence_ttl, and keeps its connections'
    /// record as long.
    pub(super) async fn heartbeat(&self) -> Result<(), BrokerError> {
        self.measure_clock().await?;
        let (nodes, connections) = (self.keys.nodes(), self.keys.connections(&self.node));
        let expires = self.now_ms() + self.config.redis_presence_ttl.as_millis() as u64;
        let node = self.node.to_string();
        let ttl = self.connections_ttl();
        self.links[0]
            .call(|mut c| async move {
                redis::pipe()
                    .zadd(&nodes, &node, expires)
                    .ignore()
                    .pexpire(&connections, ttl)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        *self.beat.lock().expect("beat lock") = Some(std::time::Instant::now());
        Ok(())
    }

    /// How long a node's connections are kept after its last heartbeat: long enough for a
    /// survivor to claim them once the node counts as dead.
    pub(super) fn connections_ttl(&self) -> i64 {
        3 * self.config.redis_presence_ttl.as_millis() as i64
    }

    /// Claims the nodes whose heartbeat expired (each by exactly one survivor, in
    /// `reap.lua`) and reports their connections ended: a `disconnect` event each, code
    /// 1006, to this node's backends.
    pub(super) async fn reap(&self) -> Result<(), BrokerError> {
        let key = self.keys.nodes();
        let now = self.now_ms();
        let dead: Vec<String> = self.links[0]
            .call(|mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        for node in dead {
            let mut invocation = self.scripts.reap.prepare_invoke();
            invocation
                .key(self.keys.nodes())
                .key(self.keys.connections(&node))
                .arg(&node)
                .arg(now);
            let connections: Vec<(String, String)> = self.links[0]
                .call(|mut c| async move { invocation.invoke_async(&mut c).await })
                .await?;
            if connections.is_empty() {
                continue;
            }
            tracing::warn!(%node, connections = connections.len(), "a node stopped without saying goodbye: its connections are reported ended");
            let events = self.hub.events();
            for (client, user) in connections {
                let ended = What::Disconnect {
                    code: NODE_LOST,
                    reason: NODE_LOST_REASON.to_string(),
                };
                events.emit(&client, &user, ended);
            }
        }
        Ok(())
    }

    /// The live nodes, this one included.
    pub(super) async fn nodes(&self) -> Result<Vec<String>, BrokerError> {
        let key = self.keys.nodes();
        self.links[0]
            .call(|mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(self.now_ms())
                    .arg("+inf")
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
            .await
    }

    /// Publishes an order to every other live node and gathers their answers (those that
    /// came within redis_timeout).
    pub(super) async fn ask(&self, body: Box<RawValue>) -> Result<Vec<Box<RawValue>>, BrokerError> {
        let expected: HashSet<String> = self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| *n != *self.node)
            .collect();
        if expected.is_empty() {
            return Ok(Vec::new());
        }
        let id = rand::random::<u64>();
        let (done, mut answered) = oneshot::channel();
        self.asked.waiting.lock().expect("asked lock").insert(
            id,
            Waiting {
                expected,
                answers: Vec::new(),
                done: Some(done),
            },
        );
        let wire = Wire {
            id,
            node: self.node.to_string(),
            body,
        };
        let message = serde_json::to_vec(&wire).expect("an order encodes");
        let topic = self.keys.control();
        let sent = self.links[0].publish(topic, message).await;
        if let Err(e) = sent {
            self.asked.waiting.lock().expect("asked lock").remove(&id);
            return Err(e);
        }
        let answers = match tokio::time::timeout(self.config.redis_timeout, &mut answered).await {
            Ok(Ok(answers)) => answers,
            _ => {
                let waiting = self.asked.waiting.lock().expect("asked lock").remove(&id);
                match waiting {
                    Some(waiting) => {
                        tracing::warn!(missing = ?waiting.expected, "nodes did not answer an order in time");
                        waiting.answers
                    }
                    // The last answer came as the deadline passed: it is in the oneshot.
                    None => answered.try_recv().unwrap_or_default(),
                }
            }
        };
        Ok(answers)
    }

    /// A message of the control topic: an order for this node.
    pub(super) fn on_order(&self, payload: &[u8]) {
        let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
            tracing::warn!("undecodable order on the control topic");
            return;
        };
        if *wire.node == *self.node {
            return;
        }
        let order = Order {
            body: wire.body,
            id: wire.id,
            from: wire.node,
        };
        if let Err(mpsc::error::TrySendError::Full(order)) = self.orders.try_send(order) {
            tracing::warn!(from = %order.from, "orders queue full: an order from another node is not carried out");
        }
    }

    /// A message of this node's reply topic: an answer to an order it gave.
    pub(super) fn on_answer(&self, payload: &[u8]) {
        let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
            return;
        };
        let mut waiting = self.asked.waiting.lock().expect("asked lock");
        let Some(w) = waiting.get_mut(&wire.id) else {
            return;
        };
        if w.expected.remove(&wire.node) {
            w.answers.push(wire.body);
        }
        if w.expected.is_empty() {
            let w = waiting.remove(&wire.id).expect("present");
            if let Some(done) = w.done {
                let _ = done.send(w.answers);
            }
        }
    }

    /// Answers an order from another node.
    pub(super) async fn answer(
        &self,
        order: Order,
        body: Box<RawValue>,
    ) -> Result<(), BrokerError> {
        let wire = Wire {
            id: order.id,
            node: self.node.to_string(),
            body,
        };
        let message = serde_json::to_vec(&wire).expect("an answer encodes");
        let topic = self.keys.reply(&order.from);
        self.links[0].publish(topic, message).await.map(|_| ())
    }
}
