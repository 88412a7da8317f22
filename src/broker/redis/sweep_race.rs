//! The race between the sweep that drops a channel's unused topic and a new subscribe of
//! the same channel, reproduced step by step. Three points of the engine wait when a test
//! arms them for its node ([`at`]); nothing waits otherwise, and none of it is built outside
//! tests.
//!
//! The race: publications the old subscription carried before its UNSUBSCRIBE took effect
//! still sit in the pub/sub connection's buffer. Read after a new subscribe made the
//! channel's entry again, they would start its frontier at a stale offset, the subscriber
//! would attach there although the stream is further on, and the next publication would
//! look like a gap: a spurious `unsub` 2500. The sweep therefore handles them before it
//! lets the commands go, and throws away those of the dropped topics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Where the engine waits when armed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Point {
    /// In the sweep: the unused entries dropped, the feed's commands held, UNSUBSCRIBE not
    /// sent yet.
    BeforeUnsubscribe,
    /// In the feed's reader, right after a sweep (the commands released).
    AfterSweep,
    /// In a subscribe: the topic's SUBSCRIBE confirmed, the stream not read yet.
    BeforeRead,
}

/// An armed point: told when the engine reaches it, and when to go on.
struct Gate {
    reached: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

static ARMED: Mutex<Option<HashMap<(String, Point), Gate>>> = Mutex::new(None);

/// Waits at `point` if a test armed it for `node` (once per arming).
pub async fn at(node: &str, point: Point) {
    let gate = ARMED
        .lock()
        .expect("hooks lock")
        .as_mut()
        .and_then(|armed| armed.remove(&(node.to_string(), point)));
    if let Some(gate) = gate {
        let _ = gate.reached.send(());
        let _ = gate.release.await;
    }
}

/// Arms `point` for `node`: the engine's next pass there waits until `go` is called on
/// what this returns.
fn arm(node: &str, point: Point) -> Armed {
    let (reached, reached_rx) = oneshot::channel();
    let (release_tx, release) = oneshot::channel();
    ARMED
        .lock()
        .expect("hooks lock")
        .get_or_insert_with(HashMap::new)
        .insert((node.to_string(), point), Gate { reached, release });
    Armed {
        point,
        reached: reached_rx,
        release: release_tx,
    }
}

struct Armed {
    point: Point,
    reached: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl Armed {
    /// Waits (at most 10 s) until the engine is at the point.
    async fn reached(&mut self) {
        tokio::time::timeout(Duration::from_secs(10), &mut self.reached)
            .await
            .unwrap_or_else(|_| panic!("{:?} not reached within 10 s", self.point))
            .expect("armed");
    }

    fn go(self) {
        let _ = self.release.send(());
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::Value;

    use super::*;
    use crate::broker::Broker;
    use crate::config::Config;
    use crate::events::Events;
    use crate::hub::{ClientId, Hub, SubscribedBy};
    use crate::metrics::Metrics;
    use crate::outbox::Outbox;
    use crate::testkit::RedisServer;
    use crate::wire::{Position, ServerMessage};

    const NODE: &str = "sweep-race";

    struct Node {
        hub: Hub,
        broker: Broker,
    }

    impl Node {
        /// A subscriber of `channel` from the top: its outbox and the position it got.
        async fn subscriber(&self, id: &str, channel: &str) -> (Arc<Outbox>, Option<Position>) {
            let outbox = Arc::new(Outbox::new(1 << 20));
            let id: ClientId = Arc::from(id);
            self.hub
                .register(id.clone(), "user", None, None, outbox.clone());
            let (flush, position) = self
                .broker
                .subscribe(channel, None, 1 << 20, |attach| {
                    let first = ServerMessage::Done { id: 0 }.frame();
                    let flush = self
                        .hub
                        .subscribe(&id, channel, SubscribedBy::Server, first)
                        .unwrap();
                    (flush, attach.position)
                })
                .await
                .unwrap();
            flush.run();
            (outbox, position)
        }

        async fn publish(&self, channel: &str, data: &str) -> u64 {
            self.broker
                .publish(channel, data.as_bytes(), None, None, None)
                .await
                .unwrap()
                .offset
        }
    }

    /// The pushes queued to `outbox` (the subscribe's reply frame skipped).
    fn pushes(outbox: &Outbox) -> Vec<Value> {
        outbox
            .queued()
            .iter()
            .map(|frame: &Bytes| {
                let start = if frame[1] & 0x7f == 126 { 4 } else { 2 };
                serde_json::from_slice::<Value>(&frame[start..]).unwrap()
            })
            .filter(|m| m["type"] == "pub" || m["type"] == "unsub")
            .collect()
    }

    /// Waits (at most 10 s) until `outbox` holds `n` pushes.
    async fn pushed(outbox: &Outbox, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = pushes(outbox);
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} pushes not within 10 s: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topic_swept_while_it_carried_publications_starts_no_stale_frontier() {
        let redis = RedisServer::start();
        // One pub/sub connection, so that the marker channel's messages come after the
        // race channel's on the same reader.
        let overrides = [
            ("broker".to_string(), redis.url()),
            ("redis_pubsub_connections".to_string(), "1".to_string()),
        ];
        let file = "[namespaces.g]\nhistory_size = 100\nhistory_ttl = \"1m\"\n";
        let config =
            Arc::new(Config::from_layers(Some(("sweep-race", file)), &[], &overrides).unwrap());
        let events = Events::new(&config, Arc::from(NODE));
        let hub = Hub::new(config.clone(), Arc::new(Metrics::default()), events);
        let broker = Broker::build(hub.clone(), config, Arc::from(NODE));
        let node = Node { hub, broker };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !node.broker.ready() {
            assert!(tokio::time::Instant::now() < deadline, "not ready in 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // Without history: its publications reach the subscriber only through the reader.
        let (marker, _) = node.subscriber("marker", "marker").await;
        let (first, _) = node.subscriber("first", "g:race").await;
        assert_eq!(node.publish("g:race", "1").await, 1);
        pushed(&first, 1).await;
        // The sweep finds the channel unused and drops its entry; before its UNSUBSCRIBE,
        // two publications are on their way through the topic.
        let mut sweep = arm(NODE, Point::BeforeUnsubscribe);
        node.hub.unsubscribe("first", "g:race", None);
        sweep.reached().await;
        assert_eq!(node.publish("g:race", "2").await, 2);
        assert_eq!(node.publish("g:race", "3").await, 3);
        let mut after = arm(NODE, Point::AfterSweep);
        sweep.go();
        after.reached().await;
        // Unsubscribed now: this one reaches the stream only.
        assert_eq!(node.publish("g:race", "4").await, 4);

        // A new subscriber: its SUBSCRIBE is confirmed, then the reader goes on (what it
        // still held of the old subscription would reach the new entry now), and only then
        // the stream is read.
        let mut read = arm(NODE, Point::BeforeRead);
        let subscribing = {
            let node = Arc::new(node);
            let task = {
                let node = node.clone();
                tokio::spawn(async move { node.subscriber("second", "g:race").await })
            };
            read.reached().await;
            after.go();
            assert_eq!(node.publish("marker", "\"m\"").await, 0);
            pushed(&marker, 1).await;
            read.go();
            (node, task)
        };
        let (node, task) = subscribing;
        let (second, position) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the subscribe ends")
            .unwrap();
        assert_eq!(
            position.map(|p| p.offset),
            Some(4),
            "attached at the stream's top, not at a stale offset"
        );
        assert_eq!(node.publish("g:race", "5").await, 5);
        let got = pushed(&second, 1).await;
        assert_eq!(
            (got[0]["type"].as_str(), got[0]["offset"].as_u64()),
            (Some("pub"), Some(5)),
            "the next publication, not a spurious resubscribe: {got:?}"
        );
    }
}
