//! Several nodes on Redis (real redis-server processes): fan-out, recovery, presence and
//! faults across the cluster. Each test starts its own Redis and its nodes.

use std::collections::HashSet;

use serde_json::{json, Value};
use sidecast::pb;
use sidecast::testkit::RedisServer;

use crate::support::{eventually, http_get, present_users, publish, sample, Client, TestServer};

/// `room:` keeps history, presence and join/leave.
const ROOMS: &str = "[namespaces.room]\nhistory_size = 1000\nhistory_ttl = \"5m\"\npresence = true\njoin_leave = true\n";

async fn node(brokers: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut settings = vec![("broker", brokers)];
    settings.extend_from_slice(extra);
    let server = TestServer::start_with_file(Some(ROOMS), &settings).await;
    ready(&server).await;
    server
}

async fn ready(server: &TestServer) {
    let admin = server.admin;
    eventually("the node is ready", || async move {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;
}

async fn member(server: &TestServer, user: &str) -> Client {
    server.user(user, json!({"channels": ["room:*"]})).await
}

/// The next `pub` of a client, other pushes skipped.
async fn next_pub(client: &mut Client) -> Value {
    next_of(client, "pub").await
}

/// The next message of type `kind` (`join`/`leave` of other members skipped).
async fn next_of(client: &mut Client, kind: &str) -> Value {
    loop {
        let message = client.recv().await;
        if message["type"] == kind {
            return message;
        }
    }
}

/// The subscribers Redis counts on a channel's topic: one per node that subscribed it.
fn topic_subscribers(redis: &RedisServer, channel: &str) -> i64 {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("sidecast:topic:{{{channel}}}"))
        .query::<Vec<(String, i64)>>(&mut conn)
        .unwrap()
        .remove(0);
    n
}

/// Publishers on every node at once, `each` publications of `channel` apiece: Redis orders
/// them, and every client (subscribed to the channel, on any node) gets them all once, in
/// offset order, in the same order as every other client.
pub async fn one_order_from_every_node(
    nodes: &[&TestServer],
    clients: &mut [Client],
    channel: &str,
    each: u64,
) {
    let mut publishers = Vec::new();
    for n in nodes {
        let mut grpc = n.grpc().await;
        let channel = channel.to_string();
        publishers.push(tokio::spawn(async move {
            for i in 0..each {
                grpc.publish(publish(&channel, &format!("{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let total = each * nodes.len() as u64;
    let mut orders = Vec::new();
    for c in clients.iter_mut() {
        let mut got = Vec::new();
        for _ in 0..total {
            let p = next_pub(c).await;
            got.push((p["offset"].as_u64().unwrap(), p["data"].clone()));
        }
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=total).collect::<Vec<_>>(),
            "once each, in order"
        );
        orders.push(got);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "the same order everywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_reaches_every_node_in_the_same_order() {
    let redis = RedisServer::start();
    let nodes = [
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
    ];
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut c = member(n, &format!("u{i}")).await;
        assert!(c.subscribe(2, "room:order").await["result"].is_object());
        clients.push(c);
    }
    one_order_from_every_node(
        &nodes.iter().collect::<Vec<_>>(),
        &mut clients,
        "room:order",
        30,
    )
    .await;

    // Only nodes with subscribers of a channel receive its traffic.
    let mut one = member(&nodes[0], "solo").await;
    one.subscribe(2, "room:solo").await;
    assert_eq!(topic_subscribers(&redis, "room:solo"), 1);
    assert_eq!(topic_subscribers(&redis, "room:order"), 3);
    drop(clients);
    eventually("topics without subscribers are dropped", || async {
        topic_subscribers(&redis, "room:order") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url(), &[]).await, node(&redis.url(), &[]).await);
    let mut grpc = a.grpc().await;
    let mut first = member(&a, "r").await;
    let reply = first.subscribe(2, "room:r").await;
    let epoch = reply["result"]["epoch"].as_str().unwrap().to_string();
    grpc.publish(publish("room:r", "1")).await.unwrap();
    let last = next_pub(&mut first).await["offset"].as_u64().unwrap();
    drop(first);
    for n in 2..=6 {
        grpc.publish(publish("room:r", &n.to_string()))
            .await
            .unwrap();
    }
    let mut again = member(&b, "r").await;
    let reply = again
        .request(json!({"id": 2, "op": "subscribe", "channel": "room:r", "since": {"offset": last, "epoch": epoch}}))
        .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    let offsets: Vec<u64> = reply["result"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![2, 3, 4, 5, 6]);
    assert_eq!(
        reply["result"]["epoch"],
        epoch.as_str(),
        "the epoch lives in Redis"
    );
    b.grpc()
        .await
        .publish(publish("room:r", "7"))
        .await
        .unwrap();
    assert_eq!(next_pub(&mut again).await["offset"], 7, "then live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_span_the_nodes() {
    let redis = RedisServer::start();
    let nodes = [
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
    ];
    let mut alice = member(&nodes[0], "alice").await;
    alice.subscribe(2, "room:p").await;
    let mut bob = member(&nodes[1], "bob").await;
    bob.subscribe(2, "room:p").await;
    let join = alice.recv().await;
    assert_eq!(
        (join["type"].as_str(), join["user"].as_str()),
        (Some("join"), Some("bob")),
        "{join}"
    );
    let grpc = nodes[2].grpc().await;
    let users = || present_users(&grpc, "room:p");
    eventually("both in presence, asked on a third node", || async {
        users().await == ["alice", "bob"]
    })
    .await;
    let stats = grpc
        .clone()
        .presence_stats(pb::PresenceStatsRequest {
            channel: "room:p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.num_clients, stats.num_users), (2, 2));
    drop(bob);
    let leave = alice.recv().await;
    assert_eq!(
        (leave["type"].as_str(), leave["user"].as_str()),
        (Some("leave"), Some("bob")),
        "{leave}"
    );
    eventually("bob left presence", || async { users().await == ["alice"] }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pub_sub_link_makes_clients_resubscribe_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url(), &[]).await, node(&redis.url(), &[]).await);
    let mut client = member(&a, "c").await;
    let reply = client.subscribe(2, "room:gap").await;
    let epoch = reply["result"]["epoch"].as_str().unwrap().to_string();
    let mut grpc = b.grpc().await;
    let publisher = tokio::spawn(async move {
        for i in 1..=200 {
            grpc.publish(publish("room:gap", &i.to_string()))
                .await
                .unwrap();
        }
    });
    // Every node's pub/sub connections drop while publications go on.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    assert!(killed >= 2, "{killed}");
    let mut seen = Vec::new();
    let mut last = 0;
    let mut resubscribed = 0;
    while last < 200 {
        let m = client.recv().await;
        match m["type"].as_str() {
            Some("pub") => {
                last = m["offset"].as_u64().unwrap();
                seen.push(last);
            }
            Some("unsub") => {
                assert_eq!(
                    (m["code"].as_u64(), m["resubscribe"].as_bool()),
                    (Some(2500), Some(true)),
                    "{m}"
                );
                resubscribed += 1;
                let id = 10 + resubscribed;
                let reply = client
                    .request(json!({"id": id, "op": "subscribe", "channel": "room:gap", "since": {"offset": last, "epoch": epoch}}))
                    .await;
                assert_eq!(reply["result"]["recovered"], true, "{reply}");
                for p in reply["result"]["publications"].as_array().unwrap() {
                    last = p["offset"].as_u64().unwrap();
                    seen.push(last);
                }
            }
            _ => {}
        }
    }
    publisher.await.unwrap();
    assert!(resubscribed >= 1, "the client was told");
    let metrics = http_get(a.admin, "/metrics").await.1;
    assert!(
        sample(&metrics, "sidecast_resubscribes_total").unwrap() >= resubscribed as f64,
        "and the operator sees it"
    );
    assert_eq!(
        seen,
        (1..=200).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_unavailable_and_not_ready_then_service_resumes() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis.url(), &[]).await, node(&redis.url(), &[]).await);
    let mut client = member(&a, "c").await;
    client.subscribe(2, "room:down").await;
    let mut grpc = b.grpc().await;
    grpc.publish(publish("room:down", "1")).await.unwrap();
    assert_eq!(next_pub(&mut client).await["offset"], 1);

    redis.stop();
    let admin = a.admin;
    eventually("not ready without Redis", || async move {
        http_get(admin, "/readyz").await == (503, "engine not ready\n".to_string())
    })
    .await;
    let metrics = http_get(a.admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, "sidecast_engine_ready"), Some(0.0));
    let refused = grpc.publish(publish("room:down", "2")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains(&redis.url()),
        "names the address: {refused:?}"
    );

    redis.restart();
    ready(&a).await;
    ready(&b).await;
    let metrics = http_get(a.admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, "sidecast_engine_ready"), Some(1.0));
    // Redis came back empty: the client is told to resubscribe, and its position's epoch
    // is gone, which the reply says.
    let unsub = client.recv().await;
    assert_eq!(
        (unsub["type"].as_str(), unsub["code"].as_u64()),
        (Some("unsub"), Some(2500)),
        "{unsub}"
    );
    let reply = client
        .request(json!({"id": 3, "op": "subscribe", "channel": "room:down", "since": {"offset": 1, "epoch": "gone"}}))
        .await;
    assert_eq!(reply["result"]["recovered"], false, "{reply}");
    grpc.publish(publish("room:down", "3")).await.unwrap();
    assert_eq!(next_pub(&mut client).await["data"], 3, "delivery resumes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_waits_not_ready_then_serves() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = TestServer::start_with_file(Some(ROOMS), &[("broker", &url)]).await;
    let admin = server.admin;
    eventually("the admin listener answers", || async move {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    assert_eq!(http_get(admin, "/healthz").await.0, 200, "alive, not ready");
    let refused = server
        .grpc()
        .await
        .publish(publish("room:x", "1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let mut redis = RedisServer::start();
    redis.port = port;
    redis.restart();
    ready(&server).await;
    server
        .grpc()
        .await
        .publish(publish("room:x", "1"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_over_two_redis_addresses() {
    let (one, two) = (RedisServer::start(), RedisServer::start());
    let brokers = format!("{},{}", one.url(), two.url());
    let (a, b) = (node(&brokers, &[]).await, node(&brokers, &[]).await);
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
        let p = next_pub(&mut client).await;
        assert_eq!(p["offset"], 1);
        got.insert(p["channel"].as_str().unwrap().to_string());
    }
    for redis in [&one, &two] {
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("sidecast:*:meta")
            .query(&mut conn)
            .unwrap();
        assert!(
            (3..=13).contains(&keys.len()),
            "each address holds a share of the channels: {keys:?}"
        );
    }
}

fn user(name: &str) -> Option<pb::Target> {
    Some(pb::Target {
        target: Some(pb::target::Target::User(name.into())),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_calls_act_on_every_node() {
    let redis = RedisServer::start();
    let nodes = [
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
    ];
    let mut tabs = [
        member(&nodes[0], "alice").await,
        member(&nodes[1], "alice").await,
    ];
    let mut grpc = nodes[2].grpc().await;

    let sent = grpc
        .send(pb::SendRequest {
            target: user("alice"),
            data: br#"{"hi":1}"#.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sent.delivered, 2,
        "both of alice's connections, on two other nodes"
    );
    for tab in &mut tabs {
        let m = tab.recv().await;
        assert_eq!(
            (m["type"].as_str(), &m["data"]),
            (Some("message"), &json!({"hi": 1})),
            "{m}"
        );
    }

    let subscribed = grpc
        .subscribe(pb::SubscribeRequest {
            channel: "room:ctl".into(),
            target: user("alice"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(subscribed.subscribed, 2);
    for tab in &mut tabs {
        let m = tab.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["channel"].as_str()),
            (Some("sub"), Some("room:ctl")),
            "{m}"
        );
    }
    let channels = nodes[0]
        .grpc()
        .await
        .channels(pb::ChannelsRequest {
            pattern: "room:*".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .channels;
    let ctl: Vec<_> = channels
        .iter()
        .filter(|c| c.channel == "room:ctl")
        .collect();
    assert_eq!(ctl.len(), 1, "{channels:?}");
    assert_eq!(ctl[0].subscribers, 2, "summed over the nodes");

    let info = grpc.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.nodes.len(), 3, "{info:?}");
    assert_eq!(info.nodes[0].node_id, info.node_id, "this node first");
    let connections: u32 = info.nodes.iter().map(|n| n.connections).sum();
    assert_eq!(connections, 2);

    let unsubscribed = grpc
        .unsubscribe(pb::UnsubscribeRequest {
            channel: "room:ctl".into(),
            target: user("alice"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unsubscribed.unsubscribed, 2);
    for tab in &mut tabs {
        let m = next_of(tab, "unsub").await;
        assert_eq!(m["code"].as_u64(), Some(2000), "{m}");
    }

    let disconnected = grpc
        .disconnect(pb::DisconnectRequest {
            target: user("alice"),
            code: 4601,
            reason: "banned".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disconnected.disconnected, 2);
    for tab in &mut tabs {
        assert_eq!(tab.closed().await, (4601, "banned".to_string()));
    }
}

/// A client that follows a channel from `since` to `last`: recovered then live, resubscribing
/// on 2500. Returns every offset it was handed, in order, and how many times it was told to
/// resubscribe.
async fn follow(
    client: &mut Client,
    channel: &str,
    since: u64,
    epoch: &str,
    last: u64,
) -> (Vec<u64>, usize) {
    let mut seen = Vec::new();
    let mut resubscribed = 0;
    let mut at = since;
    let mut id = 100;
    let mut subscribe = true;
    while at < last {
        if subscribe {
            id += 1;
            let reply = client
                .request(json!({"id": id, "op": "subscribe", "channel": channel, "since": {"offset": at, "epoch": epoch}}))
                .await;
            assert_eq!(reply["result"]["recovered"], true, "{reply}");
            for p in reply["result"]["publications"].as_array().unwrap() {
                at = p["offset"].as_u64().unwrap();
                seen.push(at);
            }
            subscribe = false;
            continue;
        }
        let m = client.recv().await;
        match m["type"].as_str() {
            Some("pub") => {
                at = m["offset"].as_u64().unwrap();
                seen.push(at);
            }
            Some("unsub") => {
                assert_eq!(m["code"], 2500, "{m}");
                resubscribed += 1;
                subscribe = true;
            }
            _ => {}
        }
    }
    (seen, resubscribed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_mid_stream_on_any_node_see_each_publication_once() {
    let redis = RedisServer::start();
    let nodes = [
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
        node(&redis.url(), &[]).await,
    ];
    const EACH: u64 = 150;
    let total = EACH * nodes.len() as u64;
    // The channel's epoch, made by a first read.
    let mut probe = member(&nodes[0], "probe").await;
    let epoch = probe.subscribe(2, "room:storm").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    drop(probe);
    let mut publishers = Vec::new();
    for n in &nodes {
        let mut grpc = n.grpc().await;
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                grpc.publish(publish("room:storm", &i.to_string()))
                    .await
                    .unwrap();
            }
        }));
    }
    // Followers join while the publications go on, each from the position it reads, on
    // every node in turn.
    let mut followers = Vec::new();
    for i in 0..12 {
        let mut client = member(&nodes[i % nodes.len()], &format!("f{i}")).await;
        let history = nodes[(i + 1) % nodes.len()]
            .grpc()
            .await
            .history(pb::HistoryRequest {
                channel: "room:storm".into(),
                limit: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let since = history.offset;
        let epoch = epoch.clone();
        followers.push(tokio::spawn(async move {
            let (seen, resubscribed) =
                follow(&mut client, "room:storm", since, &epoch, total).await;
            (since, seen, resubscribed)
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    for f in followers {
        let (since, seen, resubscribed) = f.await.unwrap();
        assert_eq!(
            seen,
            (since + 1..=total).collect::<Vec<_>>(),
            "from {since}: once each, in order"
        );
        assert_eq!(
            resubscribed, 0,
            "nothing broke: no reason to tell anyone to resubscribe"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_holds_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url(), &[]).await, node(&redis.url(), &[]).await);
    let mut client = member(&b, "k").await;
    client.subscribe(2, "room:idem").await;
    let keyed = |data: &str| pb::PublishRequest {
        channel: "room:idem".into(),
        data: data.as_bytes().to_vec(),
        idempotency_key: "order-17".into(),
        ..Default::default()
    };
    let first = a
        .grpc()
        .await
        .publish(keyed("1"))
        .await
        .unwrap()
        .into_inner();
    let retry = b
        .grpc()
        .await
        .publish(keyed("2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retry.offset, &retry.epoch),
        (first.offset, &first.epoch),
        "the first result"
    );
    b.grpc()
        .await
        .publish(publish("room:idem", "3"))
        .await
        .unwrap();
    let got: Vec<Value> = vec![next_pub(&mut client).await, next_pub(&mut client).await];
    assert_eq!(
        got.iter().map(|p| p["data"].clone()).collect::<Vec<_>>(),
        vec![json!(1), json!(3)],
        "the retry published nothing"
    );
}
