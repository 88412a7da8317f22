//! The engine contract of `broker` (rules 1 to 7), driven through [`Broker`] only. Each
//! engine is listed in [`engines`] and runs every test here unchanged; a subscriber is a
//! connection registered in the engine's hub whose outbox the test reads.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::Broker;
use crate::config::Config;
use crate::events::Events;
use crate::hub::{ClientId, Hub, SubscribedBy};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::testkit::{RedisCluster, RedisServer};
use crate::wire::{Position, Recovery, ServerMessage};

/// `h:` keeps 10 publications and presence, `g:` keeps more than a test publishes; other
/// channels keep neither.
const CONFIG: &str = "[namespaces.h]\nhistory_size = 10\nhistory_ttl = \"1m\"\nhistory_meta_ttl = \"1h\"\npresence = true\n[namespaces.g]\nhistory_size = 1000\nhistory_ttl = \"1m\"\n";

/// An engine's name, the settings that select it, and what keeps its Redis running.
type Engine = (
    &'static str,
    Vec<(String, String)>,
    Option<Box<dyn Send + Sync>>,
);

/// Every engine, by name, with the settings that select it and the Redis processes it runs
/// on (started for each test): one redis-server, and a Redis Cluster of three primaries.
fn engines() -> Vec<Engine> {
    let server = RedisServer::start();
    let cluster = RedisCluster::start(3);
    let broker = |url: String| ("broker".to_string(), url);
    vec![
        ("memory", Vec::new(), None),
        ("redis", vec![broker(server.url())], Some(Box::new(server))),
        (
            "redis-cluster",
            vec![
                broker(cluster.urls()),
                ("redis_cluster".to_string(), "true".to_string()),
            ],
            Some(Box::new(cluster)),
        ),
    ]
}

struct Fixture {
    hub: Hub,
    broker: Broker,
    _redis: Option<Box<dyn Send + Sync>>,
}

async fn fixtures() -> Vec<(&'static str, Fixture)> {
    let mut out = Vec::new();
    for (name, overrides, redis) in engines() {
        let config =
            Arc::new(Config::from_layers(Some(("conformance", CONFIG)), &[], &overrides).unwrap());
        let events = Events::new(&config, Arc::from("conformance"));
        let hub = Hub::new(config.clone(), Arc::new(Metrics::default()), events);
        let broker = Broker::build(hub.clone(), config, Arc::from("conformance"));
        eventually(&format!("{name} ready"), || async { broker.ready() }).await;
        let fixture = Fixture {
            hub,
            broker,
            _redis: redis,
        };
        out.push((name, fixture));
    }
    out
}

/// Waits (at most 10 s) until `check` holds: engines that share state deliver
/// asynchronously.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

impl Fixture {
    /// A connection subscribed to `channel` from `since`: its outbox, and what the engine
    /// reported at the subscription.
    async fn subscriber(
        &self,
        id: &str,
        channel: &str,
        since: Option<&Position>,
        budget: usize,
    ) -> (Arc<Outbox>, Option<Position>, Option<Recovery>) {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let id: ClientId = Arc::from(id);
        self.hub
            .register(id.clone(), "user", None, None, outbox.clone());
        let (flush, position, recovery) = self
            .broker
            .subscribe(channel, since, budget, |attach| {
                let first = ServerMessage::Done { id: 0 }.frame();
                let flush = self
                    .hub
                    .subscribe(&id, channel, SubscribedBy::Server, first)
                    .unwrap();
                (flush, attach.position, attach.recovery)
            })
            .await
            .unwrap();
        flush.run();
        (outbox, position, recovery)
    }
}

/// The JSON of a server text frame (payloads under 64 KiB).
fn json(frame: &Bytes) -> Value {
    let start = if frame[1] & 0x7f == 126 { 4 } else { 2 };
    serde_json::from_slice(&frame[start..]).unwrap()
}

/// The offsets of the publications queued to `outbox` (other frames skipped).
fn offsets(outbox: &Outbox) -> Vec<u64> {
    outbox
        .queued()
        .iter()
        .map(json)
        .filter(|m| m["type"] == "pub")
        .map(|m| m["offset"].as_u64().unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_atomic_per_channel_and_keys_deduplicate() {
    for (engine, f) in fixtures().await {
        let f = Arc::new(f);
        let (outbox, ..) = f.subscriber("a", "h:1", None, 0).await;
        let publishers: Vec<_> = (0..4)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move {
                    let mut offsets = Vec::new();
                    for i in 0..25 {
                        let data = format!("{i}");
                        let published = f
                            .broker
                            .publish("h:1", data.as_bytes(), None, None, None)
                            .await;
                        offsets.push(published.unwrap().offset);
                    }
                    offsets
                })
            })
            .collect();
        let mut got = Vec::new();
        for publisher in publishers {
            got.extend(publisher.await.unwrap());
        }
        got.sort_unstable();
        assert_eq!(
            got,
            (1..=100).collect::<Vec<_>>(),
            "{engine}: one offset each"
        );
        eventually(engine, || async { offsets(&outbox).len() >= 100 }).await;
        let first = f
            .broker
            .publish("h:1", b"1", Some("k"), None, None)
            .await
            .unwrap();
        let again = f
            .broker
            .publish("h:1", b"2", Some("k"), None, None)
            .await
            .unwrap();
        assert_eq!(
            (&first.offset, &first.epoch),
            (&again.offset, &again.epoch),
            "{engine}: a key seen returns the first result"
        );
        assert_eq!(
            (first.replayed, again.replayed),
            (false, true),
            "{engine}: and says it is a replay"
        );
        assert_eq!(first.offset, 101);
        assert_eq!(
            first.delivered, 1,
            "{engine}: counts this node's subscribers, when it is the next publication here"
        );
        eventually(engine, || async { offsets(&outbox).len() >= 101 }).await;
        assert_eq!(
            offsets(&outbox),
            (1..=101).collect::<Vec<_>>(),
            "{engine}: delivered once each, in offset order"
        );
        let plain = f
            .broker
            .publish("plain", b"1", Some("k"), None, None)
            .await
            .unwrap();
        assert_eq!((plain.offset, plain.epoch.as_str()), (0, ""), "{engine}");
    }
}

#[tokio::test]
async fn positions_keep_their_epoch_and_recovery_is_all_or_nothing() {
    for (engine, f) in fixtures().await {
        for i in 0..5 {
            f.broker
                .publish("h:r", format!("{i}").as_bytes(), None, None, None)
                .await
                .unwrap();
        }
        let (page, position) = f
            .broker
            .history("h:r", None, 100, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(position.offset, 5, "{engine}");
        assert_eq!(page.len(), 5);
        let since = Position {
            offset: 2,
            epoch: position.epoch.clone(),
        };
        let (_, at, recovery) = f.subscriber("b", "h:r", Some(&since), 1 << 20).await;
        assert_eq!(
            at,
            Some(position.clone()),
            "{engine}: the position at the subscription"
        );
        match recovery {
            Some(Recovery::Complete(missed)) => {
                let got: Vec<u64> = missed.iter().map(|p| p.offset).collect();
                assert_eq!(got, vec![3, 4, 5], "{engine}");
            }
            other => panic!("{engine}: {other:?}"),
        }
        for (name, since, budget) in [
            (
                "another epoch",
                Position {
                    offset: 2,
                    epoch: Arc::from("other"),
                },
                1 << 20,
            ),
            (
                "ahead of the channel",
                Position {
                    offset: 9,
                    epoch: position.epoch.clone(),
                },
                1 << 20,
            ),
            (
                "over the budget",
                Position {
                    offset: 0,
                    epoch: position.epoch.clone(),
                },
                10,
            ),
        ] {
            let (_, _, recovery) = f.subscriber(name, "h:r", Some(&since), budget).await;
            assert_eq!(recovery, Some(Recovery::Impossible), "{engine}: {name}");
        }
        let (_, at, recovery) = f.subscriber("c", "plain", Some(&since), 1 << 20).await;
        assert_eq!(
            (at, recovery),
            (None, Some(Recovery::Impossible)),
            "{engine}: no history"
        );
        let (_, again) = f
            .broker
            .history("h:r", None, 0, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.epoch, position.epoch, "{engine}: the epoch stays");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sees_every_publication_once_across_its_start() {
    for (engine, f) in fixtures().await {
        let f = Arc::new(f);
        let publisher = {
            let f = f.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    f.broker
                        .publish("g:g", format!("{i}").as_bytes(), None, None, None)
                        .await
                        .unwrap();
                }
            })
        };
        let since = loop {
            let (_, p) = f
                .broker
                .history("g:g", None, 0, false)
                .await
                .unwrap()
                .unwrap();
            if p.offset >= 5 {
                break p;
            }
            tokio::task::yield_now().await;
        };
        let (outbox, _, recovery) = f.subscriber("late", "g:g", Some(&since), 1 << 20).await;
        publisher.await.unwrap();
        let Some(Recovery::Complete(missed)) = recovery else {
            panic!("{engine}: the history holds every publication: {recovery:?}");
        };
        let recovered = missed.last().map_or(since.offset, |p| p.offset);
        let last = || async { offsets(&outbox).last().copied().unwrap_or(recovered) };
        eventually(engine, || async { last().await == 200 }).await;
        let mut seen: Vec<u64> = missed.iter().map(|p| p.offset).collect();
        seen.extend(offsets(&outbox));
        let expected: Vec<u64> = (since.offset + 1..=200).collect();
        assert_eq!(
            seen, expected,
            "{engine}: recovered then live, no gap, no duplicate"
        );
    }
}

#[tokio::test]
async fn history_pages_and_removal() {
    for (engine, f) in fixtures().await {
        for i in 1..=12 {
            f.broker
                .publish("h:p", format!("{i}").as_bytes(), None, None, None)
                .await
                .unwrap();
        }
        let page = |since, limit, reverse| {
            let f = &f;
            async move {
                let (page, _) = f
                    .broker
                    .history("h:p", since, limit, reverse)
                    .await
                    .unwrap()
                    .unwrap();
                page.iter().map(|p| p.offset).collect::<Vec<_>>()
            }
        };
        assert_eq!(
            page(None, 3, false).await,
            vec![3, 4, 5],
            "{engine}: ten kept"
        );
        assert_eq!(page(Some(10), 5, false).await, vec![11, 12], "{engine}");
        assert_eq!(page(None, 2, true).await, vec![12, 11], "{engine}");
        assert_eq!(page(Some(5), 2, true).await, vec![4, 3], "{engine}");
        assert!(f
            .broker
            .history("plain", None, 5, false)
            .await
            .unwrap()
            .is_none());
        assert!(f.broker.remove_history("h:p").await.unwrap(), "{engine}");
        let (kept, position) = f
            .broker
            .history("h:p", None, 10, false)
            .await
            .unwrap()
            .unwrap();
        assert!(kept.is_empty(), "{engine}");
        assert_eq!(position.offset, 12, "{engine}: the position stays");
        assert!(!f.broker.remove_history("plain").await.unwrap(), "{engine}");
    }
}

#[tokio::test]
async fn presence_follows_the_subscriptions() {
    for (engine, f) in fixtures().await {
        f.subscriber("p1", "h:pr", None, 0).await;
        f.subscriber("p2", "h:pr", None, 0).await;
        let count = || async { f.broker.presence("h:pr").await.unwrap().len() };
        eventually(engine, || async { count().await == 2 }).await;
        let mut clients: Vec<String> = f
            .broker
            .presence("h:pr")
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.client)
            .collect();
        clients.sort();
        assert_eq!(clients, vec!["p1", "p2"], "{engine}");
        f.hub.unsubscribe("p1", "h:pr", None);
        eventually(&format!("{engine}: p1 left"), || async {
            count().await == 1
        })
        .await;
    }
}
