//! The control API: server-side subscriptions, disconnects, direct messages, presence,
//! queries, argument errors and the API key.

use serde_json::json;
use sidecast::pb::{self, target::Target as T, Target};
use tonic::Code;

use crate::support::{publish, TestServer};

fn user(u: &str) -> Option<Target> {
    Some(Target {
        target: Some(T::User(u.into())),
    })
}

fn client(c: &str) -> Option<Target> {
    Some(Target {
        target: Some(T::Client(c.into())),
    })
}

#[tokio::test]
async fn server_side_subscribe_and_unsubscribe() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let mut a1 = server.user("ann", json!({})).await;
    let mut a2 = server.user("ann", json!({})).await;
    let mut other = server.user("ben", json!({})).await;
    let reply = grpc
        .subscribe(pb::SubscribeRequest {
            channel: "team:1".into(),
            target: user("ann"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.subscribed, reply.already_subscribed), (2, 0));
    assert_eq!(
        a1.recv().await,
        json!({"type": "sub", "channel": "team:1", "recoverable": false})
    );
    assert_eq!(
        a2.recv().await,
        json!({"type": "sub", "channel": "team:1", "recoverable": false})
    );
    let again = grpc
        .subscribe(pb::SubscribeRequest {
            channel: "team:1".into(),
            target: client(&a1.client_id),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.subscribed, again.already_subscribed), (0, 1));
    grpc.publish(publish("team:1", "7")).await.unwrap();
    assert_eq!(a1.recv().await["data"], 7);
    assert_eq!(a2.recv().await["data"], 7);
    let reply = grpc
        .unsubscribe(pb::UnsubscribeRequest {
            channel: "team:1".into(),
            target: client(&a2.client_id),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.unsubscribed, 1);
    let unsub = a2.recv().await;
    assert_eq!(
        (unsub["type"].as_str(), unsub["code"].as_u64()),
        (Some("unsub"), Some(2000))
    );
    grpc.publish(publish("team:1", "8")).await.unwrap();
    assert_eq!(a1.recv().await["data"], 8);
    // ben was never subscribed: a ping round trip proves nothing was queued before it.
    assert_eq!(
        other.request(json!({"id": 9, "op": "ping"})).await,
        json!({"id": 9, "result": {}})
    );
}

#[tokio::test]
async fn disconnect_with_backend_codes() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let mut a = server.user("cat", json!({})).await;
    let mut b = server.user("cat", json!({})).await;
    let reply = grpc
        .disconnect(pb::DisconnectRequest {
            target: user("cat"),
            code: 4100,
            reason: "moved".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.disconnected, 2);
    assert_eq!(a.closed().await, (4100, "moved".into()));
    assert_eq!(b.closed().await, (4100, "moved".into()));
    let mut c = server.user("dog", json!({})).await;
    grpc.disconnect(pb::DisconnectRequest {
        target: client(&c.client_id),
        code: 0,
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        c.closed().await,
        (4006, "disconnected by the backend".into())
    );
    let mut d = server.user("eel", json!({})).await;
    let long = "é".repeat(100);
    grpc.disconnect(pb::DisconnectRequest {
        target: user("eel"),
        code: 4503,
        reason: long,
    })
    .await
    .unwrap();
    let (code, reason) = d.closed().await;
    assert_eq!(code, 4503);
    assert!(
        reason.len() <= 123 && reason.chars().all(|c| c == 'é'),
        "{reason}"
    );
    // Once the close is scheduled, the connection executes nothing more.
    let mut e = server.user("emu", json!({"channels": ["x"]})).await;
    grpc.disconnect(pb::DisconnectRequest {
        target: user("emu"),
        code: 4200,
        reason: "bye".into(),
    })
    .await
    .unwrap();
    e.send(json!({"id": 5, "op": "subscribe", "channel": "x"}))
        .await;
    let (messages, code) = e.drain_until_close().await;
    assert_eq!(code, 4200);
    assert!(messages.iter().all(|m| m["id"] != 5), "{messages:?}");
    for code in [1000, 3000, 4001, 4004, 4500, 5000] {
        let err = grpc
            .disconnect(pb::DisconnectRequest {
                target: user("eel"),
                code,
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{code}");
    }
}

#[tokio::test]
async fn send_a_direct_message() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let mut a = server.user("fox", json!({})).await;
    let reply = grpc
        .send(pb::SendRequest {
            target: user("fox"),
            data: br#"{"hello":"fox"}"#.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.delivered, 1);
    assert_eq!(
        a.recv().await,
        json!({"type": "message", "data": {"hello": "fox"}})
    );
    let none = grpc
        .send(pb::SendRequest {
            target: user("nobody"),
            data: b"1".to_vec(),
        })
        .await
        .unwrap();
    assert_eq!(none.into_inner().delivered, 0);
}

#[tokio::test]
async fn presence_and_join_leave() {
    let file = "[namespaces.room]\npresence = true\njoin_leave = true\n";
    let server = TestServer::start_with_file(Some(file), &[]).await;
    let mut grpc = server.grpc().await;
    let grants = json!({"channels": ["room:*", "plain"], "info": {"name": "Gil"}});
    let mut g = server.user("gil", grants.clone()).await;
    let mut h = server.user("hal", json!({"channels": ["room:*"]})).await;
    g.subscribe(2, "room:1").await;
    h.subscribe(2, "room:1").await;
    let join = g.recv().await;
    assert_eq!(join["type"], "join");
    assert_eq!(
        (join["user"].as_str(), join["client"].as_str()),
        (Some("hal"), Some(h.client_id.as_str()))
    );
    let presence = g
        .request(json!({"id": 3, "op": "presence", "channel": "room:1"}))
        .await;
    assert_eq!(
        presence["result"]["clients"][&g.client_id],
        json!({"user": "gil", "info": {"name": "Gil"}})
    );
    assert_eq!(
        presence["result"]["clients"][&h.client_id],
        json!({"user": "hal", "info": null})
    );
    let stats = g
        .request(json!({"id": 4, "op": "presence_stats", "channel": "room:1"}))
        .await;
    assert_eq!(stats["result"], json!({"num_clients": 2, "num_users": 2}));
    let p = grpc
        .presence(pb::PresenceRequest {
            channel: "room:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let gil = p.clients.iter().find(|c| c.user == "gil").unwrap();
    assert_eq!(gil.client, g.client_id);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&gil.info).unwrap(),
        json!({"name": "Gil"})
    );
    let s = grpc
        .presence_stats(pb::PresenceStatsRequest {
            channel: "room:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.num_clients, s.num_users), (2, 2));
    h.request(json!({"id": 5, "op": "unsubscribe", "channel": "room:1"}))
        .await;
    let leave = g.recv().await;
    assert_eq!(
        (leave["type"].as_str(), leave["user"].as_str()),
        (Some("leave"), Some("hal"))
    );
    // Not subscribed, or presence not enabled.
    assert_eq!(
        h.request(json!({"id": 6, "op": "presence", "channel": "room:1"}))
            .await["error"]["code"],
        "forbidden"
    );
    g.subscribe(7, "plain").await;
    assert_eq!(
        g.request(json!({"id": 8, "op": "presence", "channel": "plain"}))
            .await["error"]["code"],
        "not_available"
    );
    let err = grpc
        .presence(pb::PresenceRequest {
            channel: "plain".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn channels_info_and_broadcast() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let mut a = server.user("ivy", json!({"channels": ["*"]})).await;
    a.subscribe(2, "news:1").await;
    a.subscribe(3, "news:2").await;
    a.subscribe(4, "chat:1").await;
    let list = grpc
        .channels(pb::ChannelsRequest {
            pattern: "news:*".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list
        .channels
        .iter()
        .map(|c| (c.channel.as_str(), c.subscribers))
        .collect();
    assert_eq!(names, vec![("news:1", 1), ("news:2", 1)]);
    let info = grpc.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.connections,
            info.users,
            info.channels,
            info.subscriptions
        ),
        (1, 1, 3, 3)
    );
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let reply = grpc
        .broadcast(pb::BroadcastRequest {
            channels: vec!["news:1".into(), "chat:1".into()],
            data: b"true".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results.len(), 2);
    let first = a.recv().await;
    let second = a.recv().await;
    assert_eq!(
        (first["channel"].as_str(), second["channel"].as_str()),
        (Some("news:1"), Some("chat:1"))
    );
    assert_eq!(
        grpc.channels(pb::ChannelsRequest {
            pattern: "a*b".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn invalid_arguments_say_what_is_wrong() {
    let server = TestServer::start(&[("max_publication_size", "1000")]).await;
    let mut grpc = server.grpc().await;
    let cases: Vec<(pb::PublishRequest, &str)> = vec![
        (publish("ok", "{not json"), "not valid JSON"),
        (publish("ok", ""), "not valid JSON"),
        (publish("bad name", "1"), "invalid channel"),
        (publish("", "1"), "invalid channel"),
        (
            publish("ok", &format!("\"{}\"", "x".repeat(2000))),
            "max_publication_size",
        ),
        (
            publish("ok", &format!("{}{}", "[".repeat(65), "]".repeat(65))),
            "deeper than 64 levels",
        ),
    ];
    // Bytes that are not UTF-8 inside a JSON string: a text frame must never carry them.
    let not_utf8 = pb::PublishRequest {
        channel: "ok".into(),
        data: b"\"\xff\"".to_vec(),
        idempotency_key: String::new(),
        ..Default::default()
    };
    let err = grpc.publish(not_utf8).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("UTF-8"), "{}", err.message());
    let err = grpc
        .send(pb::SendRequest {
            target: user("u"),
            data: b"\"\xc3\"".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = grpc
        .broadcast(pb::BroadcastRequest {
            channels: vec!["a".into()],
            data: b"{oops".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for (request, needle) in cases {
        let err = grpc.publish(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(needle), "{}", err.message());
    }
    let err = grpc
        .subscribe(pb::SubscribeRequest {
            channel: "c".into(),
            target: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("target"));
    // The caller's input is echoed clipped: a status stays small whatever was sent.
    let err = grpc
        .publish(publish(&"c".repeat(100_000), "1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("invalid channel"),
        "{}",
        err.message()
    );
    assert!(err.message().len() < 300, "{}", err.message().len());
    let err = grpc
        .channels(pb::ChannelsRequest {
            pattern: "a b".repeat(50_000),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 300, "{}", err.message().len());
    let err = grpc
        .send(pb::SendRequest {
            target: user(""),
            data: b"1".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = grpc
        .broadcast(pb::BroadcastRequest {
            channels: vec![],
            data: b"1".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn api_key_guards_every_call() {
    let server = TestServer::start(&[("api_key", "k3y")]).await;
    let mut grpc = server.grpc().await;
    let err = grpc.info(pb::InfoRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::InfoRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        grpc.info(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(pb::InfoRequest {});
    right
        .metadata_mut()
        .insert("authorization", "Bearer k3y".parse().unwrap());
    assert!(grpc.info(right).await.is_ok());
}

/// Reads until the server closes the socket (bounded by PATIENCE): true when it did.
async fn closed_by_the_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = Vec::new();
    tokio::time::timeout(crate::support::PATIENCE, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

/// The HTTP/2 client preface and an empty SETTINGS frame: a connection that says hello and
/// then never calls.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A control connection must make its first call within header_read_timeout: one that sends
/// nothing, or only the HTTP/2 preface, is closed instead of holding a descriptor forever.
/// One that calls stays open.
#[tokio::test]
async fn control_connections_that_never_call_are_closed() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(&[("header_read_timeout", "300ms")]).await;
    let address = server.grpc_url.trim_start_matches("http://").to_string();
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut hello = tokio::net::TcpStream::connect(&address).await.unwrap();
    hello.write_all(PREFACE).await.unwrap();
    assert!(
        closed_by_the_server(&mut silent).await,
        "a silent connection is closed"
    );
    assert!(
        closed_by_the_server(&mut hello).await,
        "a preface-only connection is closed"
    );
    // A client that calls keeps its connection past the timeout: its event stream still
    // receives.
    let mut member = crate::events::Member::join(&server, "g", &[pb::EventKind::Connect], 0).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let ann = server.user("ann", json!({})).await;
    assert_eq!(member.next().await.client, ann.client_id);
}

/// At max_control_connections, a new connection is closed at once; a place frees when one
/// closes.
#[tokio::test]
async fn control_connections_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(&[
        ("max_control_connections", "2"),
        ("header_read_timeout", "60s"),
    ])
    .await;
    let address = server.grpc_url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(PREFACE).await.unwrap();
        idle.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert!(
        closed_by_the_server(&mut third).await,
        "past the bound: closed"
    );
    idle.pop();
    crate::support::eventually("a place frees", || async {
        let channel = tonic::transport::Endpoint::from_shared(server.grpc_url.clone())
            .unwrap()
            .connect_lazy();
        let mut grpc = pb::control_client::ControlClient::new(channel);
        match grpc.info(pb::InfoRequest {}).await {
            Ok(_) => true,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                false
            }
        }
    })
    .await;
}
