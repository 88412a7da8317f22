//! Event groups across a cluster (`events_scope = "cluster"`, real redis-server processes):
//! a backend on one node receives every node's events, once, each client's in order; the
//! group moves to another node with what was unacknowledged, also when its node is killed;
//! an overflow while no member reads is one `lost` range.

use std::collections::BTreeMap;

use serde_json::json;
use sidecast::pb::{self, EventKind};
use sidecast::testkit::RedisServer;

use crate::events::{kind, Member};
use crate::support::{eventually, http_get, NodeProcess, TestServer};

const ROOMS: &str = "[namespaces.room]\nhistory_size = 10\nhistory_ttl = \"1m\"\n";
const KINDS: &[EventKind] = &[
    EventKind::Connect,
    EventKind::Subscribe,
    EventKind::Disconnect,
];

async fn node(settings: &[(&str, &str)]) -> TestServer {
    TestServer::start_ready(Some(ROOMS), settings).await
}

fn redis_get(redis: &RedisServer, command: &[&str]) -> redis::Value {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn).unwrap()
}

/// Two nodes with cluster-wide event groups of 4 events (`events_buffer`), and `extra`.
async fn small_buffer_nodes(
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> (TestServer, TestServer) {
    let url = redis.url();
    let mut settings = vec![
        ("broker", url.as_str()),
        ("events_scope", "cluster"),
        ("events_buffer", "4"),
        ("events_window", "4"),
    ];
    settings.extend_from_slice(extra);
    (node(&settings).await, node(&settings).await)
}

/// Waits until `node` delivers the group's stream (it holds the lease).
async fn delivered_by(redis: &RedisServer, group: &str, node: &str) {
    let lease = format!("sidecast:events:{group}:lease");
    eventually("the node holds the group's lease", || async {
        redis_get(redis, &["GET", &lease]) == redis::Value::BulkString(node.as_bytes().to_vec())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_receives_every_nodes_events_once_each_client_in_order() {
    let redis = RedisServer::start();
    let url = redis.url();
    let settings = [("broker", url.as_str()), ("events_scope", "cluster")];
    let nodes = [
        node(&settings).await,
        node(&settings).await,
        node(&settings).await,
    ];
    let mut audit = Member::join(&nodes[0], "audit", KINDS, 0).await;
    delivered_by(&redis, "audit", &audit.joined.node_id).await;
    // A standby member on another node: the group's events go to one node at a time.
    let standby = Member::join(&nodes[1], "audit", KINDS, 0).await;

    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut client = node
            .user(&format!("u{i}"), json!({"channels": ["room:*"]}))
            .await;
        client.subscribe(2, "room:x").await;
        clients.push(client);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.client_id.clone()).collect();
    drop(clients);

    let mut seen: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut seqs = Vec::new();
    while seqs.len() < 9 {
        let event = audit.next_acked().await;
        assert!(!event.redelivered, "{event:?}");
        seqs.push(event.seq);
        seen.entry(event.client.clone())
            .or_default()
            .push(kind(&event));
    }
    assert_eq!(seqs, (1..=9).collect::<Vec<u64>>(), "numbered by the group");
    for id in &ids {
        assert_eq!(
            seen.get(id).map(Vec::as_slice),
            Some(&["connect", "subscribe", "disconnect"][..]),
            "client {id} of {seen:?}"
        );
    }
    // Once: the next event is a later connect's, on whichever node.
    let marker = nodes[2].user("marker", json!({})).await;
    let next = audit.next_acked().await;
    assert_eq!(
        (kind(&next), next.client.as_str(), next.seq),
        ("connect", marker.client_id.as_str(), 10)
    );
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_moves_with_its_unacknowledged_events_when_its_node_is_killed() {
    let redis = RedisServer::start();
    let url = redis.url();
    let settings = [
        ("broker", url.as_str()),
        ("events_scope", "cluster"),
        ("redis_presence_ttl", "3s"),
    ];
    let mut doomed = NodeProcess::start(ROOMS, &settings).await;
    let survivor = node(&settings).await;
    let mut first = Member::join_at(&doomed.grpc_url, "audit", KINDS, 0, &[]).await;
    delivered_by(&redis, "audit", &first.joined.node_id).await;
    let mut second = Member::join(&survivor, "audit", KINDS, 0).await;

    let mut client = survivor.user("u", json!({"channels": ["room:*"]})).await;
    client.subscribe(2, "room:x").await;
    let held: Vec<(u64, &str)> = [first.next().await, first.next().await]
        .iter()
        .map(|e| (e.seq, kind(e)))
        .collect();
    assert_eq!(held, [(1, "connect"), (2, "subscribe")]);

    // Killed holding both unacknowledged: the survivor takes the group within
    // redis_presence_ttl and hands them out again, marked.
    doomed.kill();
    for (seq, expected) in held {
        let event = second.next_acked().await;
        assert_eq!(
            (event.seq, kind(&event), event.redelivered),
            (seq, expected, true)
        );
        assert_eq!(event.client, client.client_id);
    }
    let id = client.client_id.clone();
    drop(client);
    let last = second.next_acked().await;
    assert_eq!(
        (
            last.seq,
            kind(&last),
            last.redelivered,
            last.client.as_str()
        ),
        (3, "disconnect", false, id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflow_while_no_member_reads_is_one_lost_range() {
    let redis = RedisServer::start();
    let (a, b) = small_buffer_nodes(&redis, &[]).await;
    let member = Member::join(&a, "audit", &[EventKind::Connect], 0).await;
    delivered_by(&redis, "audit", &member.joined.node_id).await;
    // The member leaves: its node gives the lease up, the group stays (events_group_ttl).
    drop(member);
    eventually("the lease is given up", || async {
        redis_get(&redis, &["EXISTS", "sidecast:events:audit:lease"]) == redis::Value::Int(0)
    })
    .await;

    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(b.user(&format!("u{i}"), json!({})).await);
    }
    eventually("four kept, two dropped", || async {
        redis_get(&redis, &["HGET", "sidecast:events:audit:lost", "last"])
            == redis::Value::BulkString(b"6".to_vec())
    })
    .await;
    assert_eq!(
        redis_get(&redis, &["XLEN", "sidecast:events:audit:stream"]),
        redis::Value::Int(4)
    );

    let mut back = Member::join(&b, "audit", &[EventKind::Connect], 0).await;
    let mut kept = Vec::new();
    for _ in 0..4 {
        let event = back.next().await;
        assert_eq!(kind(&event), "connect");
        kept.push(event.seq);
    }
    assert_eq!(kept, [1, 2, 3, 4]);
    back.ack(&kept).await;
    let lost = back.next_acked().await;
    assert_eq!(lost.seq, 7);
    assert_eq!(
        lost.kind,
        Some(pb::event::Kind::Lost(pb::LostEvent {
            first_seq: 5,
            last_seq: 6
        }))
    );
    let late = b.user("late", json!({})).await;
    let next = back.next_acked().await;
    assert_eq!(
        (next.seq, kind(&next), next.client.as_str()),
        (8, "connect", late.client_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_the_group_starts_anew_and_delivery_resumes() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let settings = [("broker", url.as_str()), ("events_scope", "cluster")];
    let (a, b) = (node(&settings).await, node(&settings).await);
    let mut audit = Member::join(&a, "audit", &[EventKind::Connect], 0).await;
    delivered_by(&redis, "audit", &audit.joined.node_id).await;
    let before = b.user("before", json!({})).await;
    let event = audit.next_acked().await;
    assert_eq!(
        (event.seq, event.client.as_str()),
        (1, before.client_id.as_str())
    );

    redis.stop();
    let admin = a.admin;
    eventually("not ready without Redis", || async move {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    redis.restart();
    for server in [&a, &b] {
        let admin = server.admin;
        eventually("ready again", || async move {
            http_get(admin, "/readyz").await.0 == 200
        })
        .await;
    }
    // Redis came back empty: the member's node registers the group again within a second,
    // and it starts anew, numbered from 1.
    eventually("the group is registered again", || async {
        redis_get(&redis, &["HEXISTS", "sidecast:events", "audit"]) == redis::Value::Int(1)
    })
    .await;
    let after = b.user("after", json!({})).await;
    let event = audit.next_acked().await;
    assert_eq!(
        (event.seq, kind(&event), event.client.as_str()),
        (1, "connect", after.client_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_node_cannot_get_to_redis_in_time_are_counted_and_named_by_lost_events() {
    const CLIENTS: usize = 10;
    let redis = RedisServer::start();
    let (a, b) = small_buffer_nodes(&redis, &[("redis_timeout", "300ms")]).await;
    let mut audit = Member::join(&a, "audit", &[EventKind::Connect], 0).await;
    delivered_by(&redis, "audit", &audit.joined.node_id).await;

    // Redis holds every client's commands for 3 s: b's queue to Redis (events_buffer, 4)
    // fills and refuses the rest, which it counts.
    let _ = redis_get(&redis, &["CLIENT", "PAUSE", "3000", "ALL"]);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(b.user(&format!("u{i}"), json!({})).await);
    }
    let ids: std::collections::BTreeSet<String> =
        clients.iter().map(|c| c.client_id.clone()).collect();

    // Once Redis answers again: every connect is delivered or named by a `lost` event. The
    // ranges name what b's queue refused, and what the group's stream (events_buffer) then
    // had no room for: the refused range and its `lost` entry come in one batch with the
    // queued events.
    let mut delivered = std::collections::BTreeSet::new();
    let mut named = 0;
    while delivered.len() as u64 + named < CLIENTS as u64 {
        let event = audit.next_acked().await;
        match &event.kind {
            Some(pb::event::Kind::Lost(lost)) => named += lost.last_seq - lost.first_seq + 1,
            _ => {
                assert_eq!(kind(&event), "connect");
                assert!(ids.contains(&event.client), "{event:?}");
                assert!(delivered.insert(event.client.clone()), "twice: {event:?}");
            }
        }
    }
    assert_eq!(
        delivered.len() as u64 + named,
        CLIENTS as u64,
        "nothing silent"
    );
    let metrics = http_get(b.admin, "/metrics").await.1;
    let refused = crate::support::sample(&metrics, "sidecast_events_lost_total").unwrap();
    assert!(refused >= 1.0, "the queue refused some: {refused}");
    assert!(named as f64 >= refused, "{named} named, {refused} refused");
    // Nothing more: a later connect is the next event.
    let late = b.user("late", json!({})).await;
    let next = audit.next_acked().await;
    assert_eq!(next.client, late.client_id, "{next:?}");
}

/// The append script applies each node's batch number once: the retry of a call whose
/// answer timed out, but which ran, adds nothing.
#[test]
fn a_batch_sent_twice_is_appended_once() {
    let redis = RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let script = redis::Script::new(include_str!("../../src/broker/redis/events.lua"));
    let _: () = redis::cmd("HSET")
        .arg("sc:events")
        .arg("audit")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("sc:events:audit:alive")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    let append = |conn: &mut redis::Connection, batch: u64| -> i64 {
        let mut invocation = script.prepare_invoke();
        invocation
            .key("sc:events")
            .arg("append")
            .arg("sc")
            .arg(100)
            .arg(0)
            .arg("node-1")
            .arg(batch);
        for dropped in [2, 0, 0, 0, 0] {
            invocation.arg(dropped);
        }
        invocation
            .arg(1)
            .arg(4)
            .arg("k")
            .arg("connect")
            .arg("c")
            .arg("c1")
            .arg("u")
            .arg("u1")
            .arg("t")
            .arg(1);
        invocation.invoke(conn).unwrap()
    };
    let xlen = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("XLEN")
            .arg("sc:events:audit:stream")
            .query(conn)
            .unwrap()
    };
    assert_eq!(append(&mut conn, 1), 1, "one group");
    // The two dropped connects' lost entry, then the event.
    assert_eq!(xlen(&mut conn), 2);
    assert_eq!(append(&mut conn, 1), -1, "the same batch again: skipped");
    assert_eq!(xlen(&mut conn), 2);
    assert_eq!(append(&mut conn, 2), 1, "the next batch");
    assert_eq!(xlen(&mut conn), 4, "its lost entry for two, and its event");
}
