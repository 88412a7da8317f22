//! The `slow_consumer` policies through real sockets, with a client that stops reading:
//! `drop_oldest` keeps the connection and names every publication it dropped; `conflate`
//! keeps only each key's newest publication in the queue.

use serde_json::{json, Value};
use sidecast::pb::{self, control_client::ControlClient};

use crate::support::{http_get, sample, Client, TestServer};

const NAMESPACES: &str = r#"
[namespaces.feed]
history_size = 10
history_ttl = "1m"
slow_consumer = "drop_oldest"

[namespaces.cursors]
slow_consumer = "conflate"
conflate_by = "user"
"#;

async fn server() -> TestServer {
    TestServer::start_with_file(
        Some(NAMESPACES),
        &[
            ("max_queue_bytes", "131072"),
            ("max_publication_size", "16384"),
        ],
    )
    .await
}

async fn stalled(server: &TestServer, channel: &str) -> Client {
    let mut client = server
        .user_small_buffer("stalled", json!({"channels": [channel]}))
        .await;
    client.subscribe(2, channel).await;
    client
}

fn publication(channel: &str, data: Value) -> pb::PublishRequest {
    pb::PublishRequest {
        channel: channel.into(),
        data: data.to_string().into_bytes(),
        idempotency_key: String::new(),
        ..Default::default()
    }
}

/// Publishes through `grpc` until `admin`'s node has dropped something from a full queue (the
/// kernel's buffers fill first), then an end marker; how many came before the marker.
async fn publish_until_dropped(
    grpc: &mut ControlClient<tonic::transport::Channel>,
    admin: std::net::SocketAddr,
) -> u64 {
    let pad = "p".repeat(8000);
    let mut published = 0;
    loop {
        for _ in 0..25 {
            published += 1;
            let data = json!({"n": published, "pad": pad});
            grpc.publish(publication("feed:x", data)).await.unwrap();
        }
        let metrics = http_get(admin, "/metrics").await.1;
        if sample(&metrics, "sidecast_slow_consumer_drops_total").unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(published < 3000, "nothing dropped after {published}");
    }
    grpc.publish(publication("feed:x", json!({"end": true})))
        .await
        .unwrap();
    published
}

/// Reads up to the end marker: each offset must arrive once, in order, or within exactly
/// one `lost` range. The next offset expected, and how many ranges came.
async fn read_to_the_end(client: &mut Client) -> (u64, u64) {
    let mut next = 1;
    let mut ranges = 0;
    loop {
        let message = client.recv().await;
        match message["type"].as_str() {
            Some("pub") => {
                assert_eq!(message["offset"], next, "{}", message["data"]["n"]);
                next += 1;
                if message["data"]["end"] == true {
                    return (next, ranges);
                }
            }
            Some("lost") => {
                let (from, to) = (message["from"].as_u64(), message["to"].as_u64());
                assert_eq!(from, Some(next), "{message}");
                let to = to.unwrap();
                assert_eq!(message["count"].as_u64(), Some(to - next + 1), "{message}");
                assert_eq!(message["channel"], "feed:x");
                next = to + 1;
                ranges += 1;
            }
            _ => panic!("unexpected {message}"),
        }
    }
}

#[tokio::test]
async fn drop_oldest_keeps_the_connection_and_names_every_publication_it_dropped() {
    let server = server().await;
    let mut grpc = server.grpc().await;
    let mut client = stalled(&server, "feed:x").await;
    let published = publish_until_dropped(&mut grpc, server.admin).await;
    let (next, ranges) = read_to_the_end(&mut client).await;
    assert!(ranges > 0, "the queue dropped publications and said so");
    assert_eq!(next, published + 2, "every offset accounted for");
    // Still connected.
    grpc.publish(publication("feed:x", json!({"after": true})))
        .await
        .unwrap();
    assert_eq!(client.recv().await["data"]["after"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_node_of_a_slow_subscriber_drops_and_names_the_same_way() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let settings = [
        ("max_queue_bytes", "131072"),
        ("max_publication_size", "16384"),
        ("broker", url.as_str()),
    ];
    let a = TestServer::start_ready(Some(NAMESPACES), &settings).await;
    let b = TestServer::start_ready(Some(NAMESPACES), &settings).await;
    let mut client = stalled(&a, "feed:x").await;
    // Published on the other node: the subscriber's node fans it out from Redis.
    let published = publish_until_dropped(&mut b.grpc().await, a.admin).await;
    let (next, ranges) = read_to_the_end(&mut client).await;
    assert!(ranges > 0);
    assert_eq!(next, published + 2, "every offset accounted for");
}

#[tokio::test]
async fn conflate_keeps_each_keys_newest_publication_for_a_slow_subscriber() {
    const ROUNDS: u64 = 200;
    let server = server().await;
    let mut grpc = server.grpc().await;
    let mut client = stalled(&server, "cursors:room").await;
    let pad = "p".repeat(8000);
    for n in 1..=ROUNDS {
        for user in ["ann", "bob"] {
            let data = json!({"user": user, "n": n, "pad": pad});
            grpc.publish(publication("cursors:room", data))
                .await
                .unwrap();
        }
    }
    let mut last = std::collections::BTreeMap::new();
    let mut received = 0;
    while last.values().filter(|n| **n == ROUNDS).count() < 2 {
        let message = client.recv().await;
        assert_eq!(
            message["type"], "pub",
            "nothing but publications: {message}"
        );
        let user = message["data"]["user"].as_str().unwrap().to_string();
        let n = message["data"]["n"].as_u64().unwrap();
        let before = last.insert(user.clone(), n).unwrap_or(0);
        assert!(n > before, "{user}: {n} after {before}");
        received += 1;
    }
    assert!(
        received < 2 * ROUNDS,
        "older cursors were replaced in the queue ({received} of {})",
        2 * ROUNDS
    );
    let metrics = http_get(server.admin, "/metrics").await.1;
    assert_eq!(
        sample(&metrics, "sidecast_slow_consumer_closes_total"),
        Some(0.0)
    );
}
