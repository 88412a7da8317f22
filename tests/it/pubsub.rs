//! Subscribing, publishing and unsubscribing; ordering; channel cleanup.

use serde_json::json;
use sidecast::pb::InfoRequest;

use crate::support::{eventually, publish, TestServer};

#[tokio::test]
async fn subscribe_publish_unsubscribe() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let mut client = server.user("alice", json!({"channels": ["chat:*"]})).await;
    assert_eq!(
        client.subscribe(2, "chat:lobby").await,
        json!({"id": 2, "result": {"recoverable": false}})
    );
    // Data is sent verbatim: spacing and key order survive.
    let data = r#"{"text": "hi",  "n":[1, 2]}"#;
    let reply = grpc
        .publish(publish("chat:lobby", data))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.delivered, 1);
    assert_eq!((reply.offset, reply.epoch.as_str()), (0, ""));
    let raw = client.recv().await;
    assert_eq!(
        raw,
        json!({"type": "pub", "channel": "chat:lobby", "data": {"text": "hi", "n": [1, 2]}})
    );
    assert_eq!(
        client
            .request(json!({"id": 3, "op": "unsubscribe", "channel": "chat:lobby"}))
            .await["result"],
        json!({})
    );
    // Unsubscribing twice is fine.
    assert_eq!(
        client
            .request(json!({"id": 4, "op": "unsubscribe", "channel": "chat:lobby"}))
            .await["result"],
        json!({})
    );
    assert_eq!(
        grpc.publish(publish("chat:lobby", "1"))
            .await
            .unwrap()
            .into_inner()
            .delivered,
        0
    );
    // Frames of one connection keep their order, so the next one proves nothing came before it.
    client.subscribe(5, "chat:other").await;
    grpc.publish(publish("chat:other", "2")).await.unwrap();
    assert_eq!(client.recv().await["data"], 2);
}

#[tokio::test]
async fn subs_claim_subscribes_at_connect() {
    let server = TestServer::start(&[]).await;
    let mut client = server.user("bob", json!({"subs": ["user:bob"]})).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "sub", "channel": "user:bob", "recoverable": false})
    );
    server
        .grpc()
        .await
        .publish(publish("user:bob", r#""for bob""#))
        .await
        .unwrap();
    assert_eq!(client.recv().await["data"], "for bob");
    // A channel in `subs` may be subscribed again only by the server: already_subscribed.
    assert_eq!(
        client.subscribe(2, "user:bob").await["error"]["code"],
        "already_subscribed"
    );
}

#[tokio::test]
async fn subscribe_errors_keep_the_connection() {
    let server = TestServer::start(&[("max_subscriptions", "2")]).await;
    let mut client = server.user("c", json!({"channels": ["chat:*"]})).await;
    let forbidden = client.subscribe(2, "news:1").await;
    assert_eq!(forbidden["error"]["code"], "forbidden", "{forbidden}");
    assert_eq!(
        client.subscribe(3, "bad channel").await["error"]["code"],
        "bad_request"
    );
    assert_eq!(
        client.subscribe(4, &"x".repeat(256)).await["error"]["code"],
        "bad_request"
    );
    client.subscribe(5, "chat:1").await;
    assert_eq!(
        client.subscribe(6, "chat:1").await["error"]["code"],
        "already_subscribed"
    );
    client.subscribe(7, "chat:2").await;
    let limit = client.subscribe(8, "chat:3").await;
    assert_eq!(limit["error"]["code"], "limit_exceeded", "{limit}");
    let unknown = client.request(json!({"id": 9, "op": "dance"})).await;
    assert_eq!(unknown["error"]["code"], "bad_request");
    let missing = client.request(json!({"id": 10, "op": "subscribe"})).await;
    assert_eq!(missing["error"]["message"], "missing channel");
    assert_eq!(
        client.request(json!({"id": 11, "op": "ping"})).await["result"],
        json!({})
    );
}

#[tokio::test]
async fn namespaces_public_and_max_subscribers() {
    let file = "[namespaces.open]\npublic = true\nmax_subscribers = 1\n";
    let server = TestServer::start_with_file(Some(file), &[]).await;
    let mut a = server.user("a", json!({})).await;
    let mut b = server.user("b", json!({})).await;
    assert_eq!(
        a.subscribe(2, "open:room").await["result"],
        json!({"recoverable": false})
    );
    assert_eq!(
        b.subscribe(2, "open:room").await["error"]["code"],
        "limit_exceeded"
    );
    assert_eq!(
        b.subscribe(3, "closed:room").await["error"]["code"],
        "forbidden"
    );
}

#[tokio::test]
async fn client_publish_needs_a_grant_or_the_namespace() {
    let file = "[namespaces.chat]\nallow_client_publish = true\npublic = true\n";
    let server = TestServer::start_with_file(Some(file), &[("max_publication_size", "100")]).await;
    let mut writer = server.user("w", json!({"publish": ["feed:*"]})).await;
    let mut reader = server.user("r", json!({"channels": ["feed:*"]})).await;
    reader.subscribe(2, "feed:1").await;
    reader.subscribe(3, "chat:1").await;
    assert_eq!(
        writer
            .request(json!({"id": 2, "op": "publish", "channel": "feed:1", "data": {"a": 1}}))
            .await,
        json!({"id": 2, "result": {}})
    );
    assert_eq!(reader.recv().await["data"], json!({"a": 1}));
    // Not granted, and not subscribed where the namespace allows it.
    let denied = writer
        .request(json!({"id": 3, "op": "publish", "channel": "news", "data": 1}))
        .await;
    assert_eq!(denied["error"]["code"], "forbidden");
    let denied = writer
        .request(json!({"id": 4, "op": "publish", "channel": "chat:1", "data": 1}))
        .await;
    assert_eq!(denied["error"]["code"], "forbidden");
    writer.subscribe(5, "chat:1").await;
    let ok = writer
        .request(json!({"id": 6, "op": "publish", "channel": "chat:1", "data": "yo"}))
        .await;
    assert_eq!(ok["result"], json!({}));
    assert_eq!(reader.recv().await["data"], "yo");
    let big = writer
        .request(json!({"id": 7, "op": "publish", "channel": "feed:1", "data": "x".repeat(200)}))
        .await;
    assert_eq!(big["error"]["code"], "limit_exceeded");
    let no_data = writer
        .request(json!({"id": 8, "op": "publish", "channel": "feed:1"}))
        .await;
    assert_eq!(no_data["error"]["code"], "bad_request");
}

/// Data nested deeper than 64 levels is refused and named (receivers' parsers recurse);
/// 64 levels pass.
#[tokio::test]
async fn data_nested_too_deep_is_refused() {
    let server = TestServer::start_with_file(
        Some("[namespaces.chat]\nallow_client_publish = true\npublic = true\n"),
        &[],
    )
    .await;
    let mut writer = server.user("w", json!({})).await;
    writer.subscribe(2, "chat:1").await;
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let frame = |id: u64, data: &str| {
        format!(r#"{{"id":{id},"op":"publish","channel":"chat:1","data":{data}}}"#)
    };
    writer
        .send_raw(tokio_tungstenite::tungstenite::Message::text(frame(
            9,
            &nested(65),
        )))
        .await;
    let deep = writer.recv().await;
    assert_eq!(deep["id"], 9, "{deep}");
    assert_eq!(deep["error"]["code"], "bad_request", "{deep}");
    assert!(
        deep["error"]["message"]
            .as_str()
            .unwrap()
            .contains("64 levels"),
        "{deep}"
    );
    writer
        .send_raw(tokio_tungstenite::tungstenite::Message::text(frame(
            10,
            &nested(64),
        )))
        .await;
    let ok = writer.request(json!({"id": 11, "op": "ping"})).await;
    assert_eq!(ok["id"], 11);
}

#[tokio::test]
async fn concurrent_publishers_give_every_subscriber_the_same_order() {
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 100;
    const SUBSCRIBERS: usize = 50;
    let server = TestServer::start(&[]).await;
    let mut clients = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut c = server
            .user(&format!("u{i}"), json!({"channels": ["room"]}))
            .await;
        c.subscribe(2, "room").await;
        clients.push(c);
    }
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let mut grpc = server.grpc().await;
        tasks.push(tokio::spawn(async move {
            for n in 0..EACH {
                grpc.publish(publish("room", &format!(r#"{{"p":{p},"n":{n}}}"#)))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut sequences = Vec::new();
    for c in &mut clients {
        let mut seq = Vec::new();
        for _ in 0..PUBLISHERS * EACH {
            let m = c.recv().await;
            seq.push((
                m["data"]["p"].as_u64().unwrap(),
                m["data"]["n"].as_u64().unwrap(),
            ));
        }
        sequences.push(seq);
    }
    for seq in &sequences[1..] {
        assert_eq!(seq, &sequences[0]);
    }
    // Each publisher's own publications stay in its order, and none is missing.
    for p in 0..PUBLISHERS {
        let mine: Vec<u64> = sequences[0]
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn channels_leave_the_index_when_empty() {
    // A thousand commands back to back: far past the default command rate, which is not
    // what this test is about.
    let server = TestServer::start(&[("max_commands_per_second", "0")]).await;
    let mut grpc = server.grpc().await;
    let mut client = server.user("churn", json!({"channels": ["c:*"]})).await;
    for round in 0..50u64 {
        for ch in 0..10 {
            client
                .subscribe(round * 100 + ch * 2, &format!("c:{ch}"))
                .await;
        }
        for ch in 0..10 {
            let id = round * 100 + ch * 2 + 1;
            client
                .request(json!({"id": id, "op": "unsubscribe", "channel": format!("c:{ch}")}))
                .await;
        }
    }
    let info = grpc.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.channels, info.subscriptions, info.connections),
        (0, 0, 1)
    );
    // A connection that goes away leaves nothing behind either.
    client.subscribe(9999, "c:last").await;
    drop(client);
    eventually("the closed connection is forgotten", || {
        let mut grpc = grpc.clone();
        async move {
            let info = grpc.info(InfoRequest {}).await.unwrap().into_inner();
            info.connections == 0 && info.channels == 0 && info.users == 0
        }
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    let server = TestServer::start(&[]).await;
    let mut a = server.user("a", json!({})).await;
    let mut pending = crate::support::Client::open(&server.ws_url).await;
    server.stop().await;
    assert_eq!(a.closed().await, (1001, "server shutting down".into()));
    assert_eq!(pending.closed().await.0, 1001);
}

#[tokio::test]
async fn the_subscribe_reply_precedes_the_first_publication() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let publishing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                grpc.publish(publish("busy", &n.to_string())).await.unwrap();
                n += 1;
            }
        })
    };
    for i in 0..20 {
        let mut client = server
            .user(&format!("s{i}"), json!({"channels": ["busy"]}))
            .await;
        client
            .send(json!({"id": 2, "op": "subscribe", "channel": "busy"}))
            .await;
        assert_eq!(
            client.recv().await,
            json!({"id": 2, "result": {"recoverable": false}})
        );
        let first = client.recv().await["data"].as_u64().unwrap();
        let second = client.recv().await["data"].as_u64().unwrap();
        assert_eq!(second, first + 1, "no gap after the reply");
    }
    stop.cancel();
    publishing.await.unwrap();
}
