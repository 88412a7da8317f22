//! Faults of a cluster caused for real: a node's path to Redis that silently stops carrying
//! packets (a veth link into a network namespace, taken down), and a node killed with
//! SIGKILL.

use std::process::{Child, Stdio};

use serde_json::json;
use sidecast::pb::{self, EventKind};
use sidecast::testkit::RedisServer;

use crate::events::{disconnect, kind, Member};
use crate::support::{
    eventually, http_get, present_users, publish, Netns, NodeProcess, TestServer, PATIENCE,
};

/// `room:` keeps history, presence and join/leave; `lobby:` only announces join/leave.
const ROOMS: &str = "[namespaces.room]\nhistory_size = 1000\nhistory_ttl = \"5m\"\npresence = true\njoin_leave = true\n[namespaces.lobby]\njoin_leave = true\n";

/// A redis-server in a network namespace of its own, reached through a veth link that can
/// be taken down: packets then vanish without an error or a reset.
struct PartitionedRedis {
    net: Netns,
    child: Child,
    url: String,
}

impl PartitionedRedis {
    fn start() -> PartitionedRedis {
        let net = Netns::new("scp");
        let child = net
            .exec("redis-server")
            .args([
                "--port",
                "6379",
                "--bind",
                &net.far_ip,
                "--protected-mode",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let url = format!("redis://{}:6379", net.far_ip);
        let client = redis::Client::open(url.as_str()).unwrap();
        let deadline = std::time::Instant::now() + PATIENCE;
        while client
            .get_connection_with_timeout(std::time::Duration::from_millis(200))
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server in the namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        PartitionedRedis { net, child, url }
    }

    fn link(&self, state: &str) {
        self.net.link(state);
    }
}

impl Drop for PartitionedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn readyz(server: &TestServer) -> u16 {
    http_get(server.admin, "/readyz").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_from_redis_is_detected_and_healed() {
    let redis = PartitionedRedis::start();
    let settings = [("broker", redis.url.as_str()), ("redis_timeout", "500ms")];
    let a = TestServer::start_with_file(Some(ROOMS), &settings).await;
    let b = TestServer::start_with_file(Some(ROOMS), &settings).await;
    for n in [&a, &b] {
        eventually("ready", || async { readyz(n).await == 200 }).await;
    }
    let mut client = a.user("c", json!({"channels": ["room:*"]})).await;
    let epoch = client.subscribe(2, "room:part").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let mut grpc = b.grpc().await;
    grpc.publish(publish("room:part", "1")).await.unwrap();
    assert_eq!(client.recv().await["offset"], 1);

    redis.link("down");
    // No call waits on the dead path past its deadline: a refusal, not a hang.
    let refused = tokio::time::timeout(PATIENCE, grpc.publish(publish("room:part", "2")))
        .await
        .expect("the call ends")
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    for n in [&a, &b] {
        eventually("not ready while partitioned", || async {
            readyz(n).await == 503
        })
        .await;
    }

    redis.link("up");
    for n in [&a, &b] {
        eventually("ready again", || async { readyz(n).await == 200 }).await;
    }
    // The client stayed connected; its node lost the topic, so it is told to resubscribe.
    let unsub = client.recv().await;
    assert_eq!(
        (unsub["type"].as_str(), unsub["code"].as_u64()),
        (Some("unsub"), Some(2500)),
        "{unsub}"
    );
    let reply = client
        .request(json!({"id": 3, "op": "subscribe", "channel": "room:part", "since": {"offset": 1, "epoch": epoch}}))
        .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    // The refused publish may still have reached Redis when the link came back (a timeout
    // cannot tell): then it is in the recovery, in order, and in the history for everyone.
    let recovered: Vec<u64> = reply["result"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert!(recovered.is_empty() || recovered == [2], "{reply}");
    grpc.publish(publish("room:part", "3")).await.unwrap();
    let next = client.recv().await;
    let expected = 2 + recovered.len() as u64;
    assert_eq!(
        (next["offset"].as_u64(), &next["data"]),
        (Some(expected), &json!(3)),
        "{next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_presence_and_its_leaves_come_once() {
    let redis = RedisServer::start();
    let settings = [
        ("broker", redis.url()),
        ("redis_presence_ttl", "3s".to_string()),
    ];
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let survivor = TestServer::start_with_file(Some(ROOMS), &settings).await;
    let mut doomed = NodeProcess::start(ROOMS, &settings).await;
    eventually("the survivor is ready", || async {
        http_get(survivor.admin, "/readyz").await.0 == 200
    })
    .await;

    // The survivor's backend: it will hear of the victim's end.
    let mut audit = Member::join(
        &survivor,
        "audit",
        &[EventKind::Connect, EventKind::Disconnect],
        0,
    )
    .await;
    let grants = json!({"channels": ["room:*", "lobby:*"]});
    let mut watcher = survivor.user("w", grants.clone()).await;
    watcher.subscribe(2, "room:k").await;
    watcher.subscribe(3, "lobby:k").await;
    let mut victim = doomed.user("v", grants).await;
    let victim_id = victim.client_id.clone();
    victim.subscribe(2, "room:k").await;
    victim.subscribe(3, "lobby:k").await;
    for channel in ["room:k", "lobby:k"] {
        let join = watcher.recv().await;
        assert_eq!(
            (
                join["type"].as_str(),
                join["user"].as_str(),
                join["channel"].as_str()
            ),
            (Some("join"), Some("v"), Some(channel)),
            "{join}"
        );
    }
    let mut control = survivor.grpc().await;
    let present = || present_users(&control, "room:k");
    eventually("both present", || async { present().await == ["v", "w"] }).await;

    doomed.kill();

    // Within redis_presence_ttl (and a refresh), the survivor clears the entry and the
    // leave comes, once.
    // (in both namespaces: the one with presence and the one with join/leave only).
    let mut left = Vec::new();
    while left.len() < 2 {
        let leave = watcher.recv().await;
        assert_eq!(
            (leave["type"].as_str(), leave["user"].as_str()),
            (Some("leave"), Some("v")),
            "{leave}"
        );
        left.push(leave["channel"].as_str().unwrap().to_string());
    }
    left.sort();
    assert_eq!(left, ["lobby:k", "room:k"]);
    assert_eq!(present().await, ["w"]);
    assert_eq!(present().await, ["w"], "asked again: nothing left to clear");
    // A publication after the leaves on each channel: any second leave would come before
    // it (one topic per channel).
    for channel in ["room:k", "lobby:k"] {
        control
            .publish(publish(channel, r#""marker""#))
            .await
            .unwrap();
        let next = watcher.recv().await;
        assert_eq!(
            (
                next["type"].as_str(),
                &next["data"],
                next["channel"].as_str()
            ),
            (Some("pub"), &json!("marker"), Some(channel)),
            "{next}"
        );
    }
    eventually("the killed node leaves Info", || async {
        control
            .clone()
            .info(pb::InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .len()
            == 1
    })
    .await;

    // The victim's connection ended on no node's watch: the survivor that claimed the dead
    // node reports it...
    let ended = loop {
        let event = audit.next_acked().await;
        if kind(&event) == "disconnect" && event.client == victim_id {
            break disconnect(&event);
        }
    };
    assert_eq!(ended, (1006, "its node stopped".to_string()));
    // ...once: nothing more of it before a later connect.
    let marker = survivor.user("marker", json!({})).await;
    loop {
        let event = audit.next_acked().await;
        if kind(&event) == "connect" && event.client == marker.client_id {
            break;
        }
        assert!(
            event.client != victim_id,
            "a second event of the victim: {event:?}"
        );
    }
}
