//! Nodes sharing a Redis Cluster (`redis_cluster = true`; three real redis-server primaries
//! made into a cluster by `redis-cli --cluster create`): channels spread over its slots,
//! fan-out in one order, recovery on another node, presence, control, cluster-wide event
//! groups, and a killed node reaped once.

use std::collections::HashSet;
use std::process::Stdio;

use serde_json::{json, Value};
use sidecast::pb::{self, event::Kind, EventKind};
use sidecast::testkit::{RedisCluster, RedisServer};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::events::{kind, Member};
use crate::support::{
    eventually, free_port, http_get, present_users, publish, Client, KillOnDrop, NodeProcess,
    TestServer, PATIENCE,
};

/// `room:` keeps history, presence and join/leave.
const ROOMS: &str = "[namespaces.room]\nhistory_size = 1000\nhistory_ttl = \"5m\"\npresence = true\njoin_leave = true\n";

fn settings<'a>(cluster: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut settings = vec![("broker", cluster), ("redis_cluster", "true")];
    settings.extend_from_slice(extra);
    settings
}

async fn node(cluster: &str, extra: &[(&str, &str)]) -> TestServer {
    TestServer::start_ready(Some(ROOMS), &settings(cluster, extra)).await
}

async fn member(server: &TestServer, user: &str) -> Client {
    server.user(user, json!({"channels": ["room:*"]})).await
}

/// The next message of type `kind`, others skipped.
async fn next_of(client: &mut Client, kind: &str) -> Value {
    loop {
        let message = client.recv().await;
        if message["type"] == kind {
            return message;
        }
    }
}

/// The channels' position keys one cluster node holds.
fn positions_on(url: &str) -> Vec<String> {
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("KEYS")
        .arg("sidecast:{room:*}:meta")
        .query(&mut conn)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_a_redis_cluster_spread_channels_keep_one_order_and_recover() {
    let redis = RedisCluster::start(3);
    let urls = redis.urls();
    let (a, b) = (node(&urls, &[]).await, node(&urls, &[]).await);

    // Channels land on every primary, and each is delivered across nodes.
    let mut client = member(&a, "s").await;
    let channels: Vec<String> = (0..16).map(|i| format!("room:s{i}")).collect();
    for (i, c) in channels.iter().enumerate() {
        client.subscribe(10 + i as u64, c).await;
    }
    let mut grpc = b.grpc().await;
    for c in &channels {
        grpc.publish(publish(c, "1")).await.unwrap();
    }
    let mut got = HashSet::new();
    while got.len() < channels.len() {
        let p = next_of(&mut client, "pub").await;
        assert_eq!(p["offset"], 1, "{p}");
        got.insert(p["channel"].as_str().unwrap().to_string());
    }
    for primary in &redis.nodes {
        let held = positions_on(&primary.url());
        assert!(
            !held.is_empty() && held.len() < channels.len(),
            "each primary holds a share of the channels: {held:?}"
        );
    }

    // Publishers on both nodes at once: every subscriber gets one order.
    let mut clients = [member(&a, "x").await, member(&b, "y").await];
    for c in &mut clients {
        assert!(c.subscribe(2, "room:order").await["result"].is_object());
    }
    crate::cluster::one_order_from_every_node(&[&a, &b], &mut clients, "room:order", 30).await;

    // A client gone from one node recovers on the other exactly what it missed.
    let mut first = member(&a, "r").await;
    let epoch = first.subscribe(2, "room:r").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    grpc.publish(publish("room:r", "1")).await.unwrap();
    assert_eq!(next_of(&mut first, "pub").await["offset"], 1);
    drop(first);
    for n in 2..=6 {
        grpc.publish(publish("room:r", &n.to_string()))
            .await
            .unwrap();
    }
    let mut again = member(&b, "r").await;
    let reply = again
        .request(json!({"id": 2, "op": "subscribe", "channel": "room:r", "since": {"offset": 1, "epoch": epoch}}))
        .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    let offsets: Vec<u64> = reply["result"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_control_and_event_groups_span_nodes_on_a_redis_cluster() {
    let redis = RedisCluster::start(3);
    let urls = redis.urls();
    // Presence refreshed every second.
    let extra = [("events_scope", "cluster"), ("redis_presence_ttl", "3s")];
    let nodes = [
        node(&urls, &extra).await,
        node(&urls, &extra).await,
        node(&urls, &extra).await,
    ];
    let mut audit = Member::join(&nodes[2], "audit", &[EventKind::Subscribe], 0).await;

    let mut alice = member(&nodes[0], "alice").await;
    alice.subscribe(2, "room:p").await;
    let mut tab = member(&nodes[1], "alice").await;
    tab.subscribe(2, "room:p").await;
    let join = next_of(&mut alice, "join").await;
    assert_eq!(join["client"], tab.client_id.as_str(), "{join}");

    let mut grpc = nodes[2].grpc().await;
    eventually("both in presence, asked on a third node", || async {
        present_users(&grpc, "room:p").await == ["alice", "alice"]
    })
    .await;
    let sent = grpc
        .send(pb::SendRequest {
            target: Some(pb::Target {
                target: Some(pb::target::Target::User("alice".into())),
            }),
            data: br#"{"hi":1}"#.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.delivered, 2, "alice's connections on two other nodes");
    for c in [&mut alice, &mut tab] {
        assert_eq!(next_of(c, "message").await["data"], json!({"hi": 1}));
    }
    let info = grpc.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.nodes.len(), 3, "{info:?}");

    // The group on the third node hears both subscriptions, numbered once by the cluster.
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let event = audit.next_acked().await;
        assert_eq!(kind(&event), "subscribe");
        heard.push((event.seq, event.client));
    }
    heard.sort();
    let mut expected = [alice.client_id.clone(), tab.client_id.clone()];
    expected.sort();
    assert_eq!(heard.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
    let mut clients: Vec<String> = heard.into_iter().map(|(_, c)| c).collect();
    clients.sort();
    assert_eq!(clients, expected);

    // A connection subscribed to several channels at once: their joins (in different
    // slots) and the connection's record are written together, and each join comes.
    let rooms: Vec<String> = (0..4).map(|i| format!("room:j{i}")).collect();
    let mut watcher = member(&nodes[1], "w").await;
    for (i, room) in rooms.iter().enumerate() {
        watcher.subscribe(10 + i as u64, room).await;
    }
    let many = nodes[0]
        .user("m", json!({"channels": ["room:*"], "subs": rooms}))
        .await;
    let mut joined = HashSet::new();
    while joined.len() < rooms.len() {
        let join = next_of(&mut watcher, "join").await;
        assert_eq!(join["user"], "m", "{join}");
        joined.insert(join["channel"].as_str().unwrap().to_string());
    }
    // And its node's refresh, one write for all its channels, reaches every slot: each
    // entry's expiry moves on.
    let mut cluster = redis::cluster::ClusterClient::new(urls.split(','))
        .unwrap()
        .get_connection()
        .unwrap();
    let mut expiry = |room: &str| -> u64 {
        redis::cmd("ZSCORE")
            .arg(format!("sidecast:{{{room}}}:presence-exp"))
            .arg(&many.client_id)
            .query(&mut cluster)
            .unwrap()
    };
    let first: Vec<u64> = rooms.iter().map(|r| expiry(r)).collect();
    eventually("every channel's entry refreshed", || {
        let later: Vec<u64> = rooms.iter().map(|r| expiry(r)).collect();
        let moved = later.iter().zip(&first).all(|(l, f)| l > f);
        async move { moved }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_on_a_redis_cluster_is_reaped_once() {
    let redis = RedisCluster::start(3);
    let urls = redis.urls();
    let extra = [("redis_presence_ttl", "3s")];
    let survivor = node(&urls, &extra).await;
    let mut doomed = NodeProcess::start(ROOMS, &settings(&urls, &extra)).await;
    let mut audit = Member::join(&survivor, "audit", &[EventKind::Disconnect], 0).await;
    let mut watcher = member(&survivor, "w").await;
    watcher.subscribe(2, "room:k").await;
    let mut victim = doomed.user("v", json!({"channels": ["room:*"]})).await;
    victim.subscribe(2, "room:k").await;
    assert_eq!(next_of(&mut watcher, "join").await["user"], "v");

    doomed.kill();
    let leave = next_of(&mut watcher, "leave").await;
    assert_eq!(leave["user"], "v", "{leave}");
    let ended = audit.next_acked().await;
    assert_eq!(ended.client, victim.client_id);
    let Some(Kind::Disconnect(d)) = ended.kind else {
        panic!("not a disconnect: {ended:?}");
    };
    assert_eq!(d.code, 1006, "{d:?}");
    let control = survivor.grpc().await;
    assert_eq!(present_users(&control, "room:k").await, ["w"]);
    // A publication after the leave: a second leave would come before it.
    control
        .clone()
        .publish(publish("room:k", r#""marker""#))
        .await
        .unwrap();
    let next = loop {
        let m = watcher.recv().await;
        if m["type"] != "join" {
            break m;
        }
    };
    assert_eq!(
        (next["type"].as_str(), &next["data"]),
        (Some("pub"), &json!("marker")),
        "{next}"
    );
}

/// A node process whose log is read: it must say why it cannot use `broker`, and stay not
/// ready.
async fn refused_with(settings: &[(&str, &str)], expected: &str) {
    let (admin, ws, grpc) = (free_port(), free_port(), free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sidecast"));
    command
        .args(["--ws-addr", &format!("127.0.0.1:{ws}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--set", "token_hmac_secret=s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in settings {
        command.args(["--set", &format!("{k}={v}")]);
    }
    let mut child = KillOnDrop(Some(command.spawn().unwrap()));
    let stderr = child.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(tokio::process::ChildStderr::from_std(stderr).unwrap()).lines();
    let said = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(expected) {
                return line;
            }
        }
        panic!("the node ended without saying {expected:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("the node did not say {expected:?} in time"));
    assert!(said.contains("127.0.0.1"), "the address is named: {said}");
    let admin = format!("127.0.0.1:{admin}").parse().unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 503, "never ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_redis_cluster_or_the_reverse_is_named_and_never_ready() {
    let cluster = RedisCluster::start(3);
    let seed = cluster.nodes[0].url();
    refused_with(&[("broker", &seed)], "set redis_cluster = true").await;
    let single = RedisServer::start();
    refused_with(
        &[("broker", &single.url()), ("redis_cluster", "true")],
        "cluster support disabled",
    )
    .await;
}

/// Publishes `i` on `channel` under the idempotency key `f<i>`, retrying what is refused
/// `UNAVAILABLE` (a failover in progress) for at most 30 s: exactly once.
async fn publish_once(
    grpc: &mut pb::control_client::ControlClient<tonic::transport::Channel>,
    channel: &str,
    i: u64,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut request = publish(channel, &i.to_string());
        request.idempotency_key = format!("f{i}");
        match grpc.publish(request).await {
            Ok(_) => return,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(tokio::time::Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// The next `pub` or `unsub` of a client.
async fn next_delivery(client: &mut Client) -> Value {
    loop {
        let m = client.recv().await;
        if m["type"] == "pub" || m["type"] == "unsub" {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_lost_fails_over_and_its_subscribers_are_told_to_reload() {
    let mut redis = RedisCluster::start_with_replicas(3, 1);
    let urls = redis.urls();
    let (a, b) = (node(&urls, &[]).await, node(&urls, &[]).await);
    let mut client = member(&a, "f").await;
    let epoch = client.subscribe(2, "room:f").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let mut grpc = b.grpc().await;
    for i in 1..=10 {
        publish_once(&mut grpc, "room:f", i).await;
        assert_eq!(next_delivery(&mut client).await["offset"], i);
    }

    // The channel's primary dies; its replica, promoted, may lack the last publications it
    // acknowledged (replication is asynchronous), so the channel's position starts again
    // there: a new epoch, never an offset given twice.
    let (primary, replicas) = redis.serving("sidecast:{room:f}:meta");
    assert_eq!(replicas.len(), 1);
    let port = primary.port;
    redis
        .nodes
        .iter_mut()
        .find(|n| n.port == port)
        .unwrap()
        .stop();
    const LAST: u64 = 40;
    let publisher = tokio::spawn(async move {
        for i in 11..=LAST {
            publish_once(&mut grpc, "room:f", i).await;
        }
        grpc
    });

    // The subscriber is told to resubscribe, and its position is found gone: the signal to
    // reload, never a publication skipped in silence.
    let m = next_delivery(&mut client).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_u64()),
        (Some("unsub"), Some(2500)),
        "{m}"
    );
    let mut id = 10;
    let at = loop {
        id += 1;
        let reply = client
            .request(json!({"id": id, "op": "subscribe", "channel": "room:f", "since": {"offset": 10, "epoch": epoch}}))
            .await;
        if reply["error"]["code"] == "unavailable" {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(reply["result"]["recovered"], false, "{reply}");
        assert_ne!(reply["result"]["epoch"], epoch.as_str(), "{reply}");
        break reply["result"]["offset"].as_u64().unwrap();
    };
    // Then live, in the new epoch, to the last.
    for offset in at + 1..=LAST - 10 {
        let m = next_delivery(&mut client).await;
        assert_eq!(
            (m["type"].as_str(), m["offset"].as_u64()),
            (Some("pub"), Some(offset)),
            "{m}"
        );
    }
    let mut grpc = publisher.await.unwrap();
    let history = grpc
        .history(pb::HistoryRequest {
            channel: "room:f".into(),
            since: Some(pb::StreamPosition {
                offset: 0,
                epoch: String::new(),
            }),
            limit: 100,
            reverse: false,
        })
        .await
        .unwrap()
        .into_inner();
    let data: Vec<String> = history
        .publications
        .iter()
        .map(|p| String::from_utf8(p.data.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (11..=LAST).map(|i| i.to_string()).collect();
    assert_eq!(
        data, expected,
        "each publication after the failover once, in order"
    );
    eventually("both nodes ready again", || async {
        http_get(a.admin, "/readyz").await.0 == 200 && http_get(b.admin, "/readyz").await.0 == 200
    })
    .await;
}
