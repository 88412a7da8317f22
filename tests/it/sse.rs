//! The SSE transport through a real HTTP client (hyper's): the same messages as events of
//! a `GET` stream, commands POSTed, recovery from `Last-Event-ID`, heartbeats, closes, and
//! each refusal with its status and close code.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use sidecast::pb::{self, target::Target as T, Target};
use tokio::net::TcpStream;

use crate::support::{eventually, http_get, now, publish, sample, token, TestServer, PATIENCE};

const HISTORY: &str = "[namespaces.h]\nhistory_size = 100\nhistory_ttl = \"1m\"\n";

/// One event: its name (`message` when none is given), id and data.
#[derive(Debug)]
struct Event {
    name: String,
    id: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// An open stream, read as a client would.
struct Stream {
    body: Incoming,
    text: String,
}

/// An HTTP/1.1 request on a connection of its own: (status, headers, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> hyper::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sidecast.test");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("an answer in time")
        .unwrap()
}

/// The whole body of an answer, as JSON.
async fn json_body(response: hyper::Response<Incoming>) -> Value {
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("a body in time")
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&body).expect("a JSON body")
}

async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Stream {
    let response = request(addr, "GET", path, headers, "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    Stream {
        body: response.into_body(),
        text: String::new(),
    }
}

impl Stream {
    /// The next event; None when the stream ended.
    async fn event(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut event = Event {
                    name: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut lines = Vec::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event.name = name.into();
                    } else if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.into());
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        lines.push(data);
                    }
                }
                // A block of only `retry` carries no event.
                if lines.is_empty() {
                    continue;
                }
                event.data = lines.join("\n");
                return Some(event);
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("an event in time");
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.text.push_str(std::str::from_utf8(&data).unwrap());
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event's data as JSON, skipping pings.
    async fn message(&mut self) -> Value {
        loop {
            let event = self.event().await.expect("the stream goes on");
            assert_eq!(event.name, "message", "{event:?}");
            let message = event.json();
            if message["type"] != "ping" {
                return message;
            }
        }
    }

    /// The `session` event's key, then `connected`.
    async fn start(&mut self) -> (String, Value) {
        let session = self.event().await.expect("a session event");
        assert_eq!(session.name, "session");
        let key = session.json()["session"].as_str().unwrap().to_string();
        let connected = self.message().await;
        assert_eq!(connected["type"], "connected");
        (key, connected)
    }

    /// Events until the stream ends: the last one must be `close`; its data.
    async fn close(&mut self) -> Value {
        let mut last = None;
        while let Some(event) = self.event().await {
            last = Some(event);
        }
        let last = last.expect("a close event");
        assert_eq!(last.name, "close", "{last:?}");
        last.json()
    }
}

async fn post(addr: SocketAddr, session: &str, command: &str) -> u16 {
    let path = format!("/sse?session={session}");
    request(addr, "POST", &path, &[], command)
        .await
        .status()
        .as_u16()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn user(u: &str) -> Option<Target> {
    Some(Target {
        target: Some(T::User(u.into())),
    })
}

#[tokio::test]
async fn a_stream_carries_the_protocol_and_posted_commands_are_answered_on_it() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let auth = bearer(&token("ann", json!({"channels": ["h:*", "news"]})));
    let mut stream = open(
        server.ws_addr,
        // A channel asked twice is subscribed once.
        "/sse?channel=h%3Aroom&channel=news&channel=h:room",
        &[("authorization", &auth)],
    )
    .await;
    let (session, connected) = stream.start().await;
    assert_eq!(connected["user"], "ann");
    // The channels asked for in the query are announced like server-side subscriptions.
    let sub = stream.event().await.unwrap();
    assert_eq!(sub.json()["type"], "sub");
    assert_eq!(sub.json()["channel"], "h:room");
    let epoch = sub.json()["epoch"].as_str().unwrap().to_string();
    let id: Value = serde_json::from_str(sub.id.as_deref().unwrap()).unwrap();
    assert_eq!(id, json!({"h:room": {"offset": 0, "epoch": epoch}}));
    let news = stream.message().await;
    assert_eq!(
        (news["type"].as_str(), news["channel"].as_str()),
        (Some("sub"), Some("news"))
    );

    let mut grpc = server.grpc().await;
    // Line breaks inside the data (JSON whitespace) come back as the event's lines.
    grpc.publish(publish("h:room", "{\n\"n\": 1\n}"))
        .await
        .unwrap();
    let event = stream.event().await.unwrap();
    assert_eq!(event.json()["data"], json!({"n": 1}));
    assert_eq!(event.json()["offset"], 1);
    let id: Value = serde_json::from_str(event.id.as_deref().unwrap()).unwrap();
    assert_eq!(id, json!({"h:room": {"offset": 1, "epoch": epoch}}));

    // A command POSTed to the session is read like a WebSocket message.
    assert_eq!(
        post(
            server.ws_addr,
            &session,
            r#"{"id":7,"op":"presence_stats","channel":"news"}"#
        )
        .await,
        202
    );
    assert_eq!(stream.message().await["id"], 7);
    assert_eq!(
        post(
            server.ws_addr,
            &session,
            r#"{"id":8,"op":"subscribe","channel":"h:other"}"#
        )
        .await,
        202
    );
    let reply = stream.message().await;
    assert_eq!(reply["id"], 8);
    assert_eq!(reply["result"]["recoverable"], true);
    assert_eq!(
        post(server.ws_addr, &session, r#"{"id":9,"op":"dance"}"#).await,
        202
    );
    assert_eq!(stream.message().await["error"]["code"], "bad_request");

    // A backend's Disconnect ends the stream with a `close` event.
    grpc.disconnect(pb::DisconnectRequest {
        target: user("ann"),
        code: 4100,
        reason: "moved".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        stream.close().await,
        json!({"code": 4100, "reason": "moved"})
    );
    server.until_no_connections().await;
    // The session is gone with its stream.
    assert_eq!(
        post(server.ws_addr, &session, r#"{"id":1,"op":"ping"}"#).await,
        404
    );
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_recovers_exactly_what_was_missed() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let auth = bearer(&token("bo", json!({"channels": ["h:*"]})));
    let headers = [("authorization", auth.as_str())];
    let mut grpc = server.grpc().await;
    grpc.publish(publish("h:feed", r#"{"n":0}"#)).await.unwrap();
    let mut stream = open(server.ws_addr, "/sse?channel=h:feed", &headers).await;
    stream.start().await;
    assert_eq!(stream.message().await["type"], "sub");
    grpc.publish(publish("h:feed", r#"{"n":1}"#)).await.unwrap();
    let seen = stream.event().await.unwrap();
    assert_eq!(seen.json()["offset"], 2);
    let last_id = seen.id.unwrap();
    // The client goes away; its connection ends with the stream.
    drop(stream);
    server.until_no_connections().await;
    for n in 2..=3 {
        grpc.publish(publish("h:feed", &format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
    }

    let headers = [
        ("authorization", auth.as_str()),
        ("last-event-id", &last_id),
    ];
    let mut stream = open(server.ws_addr, "/sse?channel=h:feed", &headers).await;
    stream.start().await;
    let sub = stream.message().await;
    assert_eq!(sub["recovered"], true);
    let recovered: Vec<&Value> = sub["publications"].as_array().unwrap().iter().collect();
    assert_eq!(
        recovered
            .iter()
            .map(|p| p["offset"].clone())
            .collect::<Vec<_>>(),
        [json!(3), json!(4)]
    );
    assert_eq!(recovered[1]["data"], json!({"n": 3}));
    grpc.publish(publish("h:feed", r#"{"n":4}"#)).await.unwrap();
    assert_eq!(stream.message().await["offset"], 5);

    // The same position from the query, for a client that cannot set the header.
    drop(stream);
    let path = format!(
        "/sse?channel=h:feed&last_event_id={}",
        percent_encode(&last_id)
    );
    let mut stream = open(server.ws_addr, &path, &headers[..1]).await;
    stream.start().await;
    let sub = stream.message().await;
    assert_eq!(sub["recovered"], true);
    assert_eq!(sub["publications"].as_array().unwrap().len(), 3);
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn heartbeats_are_pings_and_a_client_that_never_pongs_is_closed_4007() {
    let server = TestServer::start(&[("ping_interval", "300ms"), ("pong_timeout", "300ms")]).await;
    let auth = bearer(&token("cy", json!({})));
    let headers = [("authorization", auth.as_str())];

    // A client that answers each ping with a POSTed pong stays.
    let mut stream = open(server.ws_addr, "/sse", &headers).await;
    let (session, _) = stream.start().await;
    for _ in 0..3 {
        let ping = stream.event().await.unwrap();
        assert_eq!(ping.json(), json!({"type": "ping"}));
        assert_eq!(
            post(server.ws_addr, &session, r#"{"op":"pong"}"#).await,
            202
        );
    }

    let mut silent = open(server.ws_addr, "/sse", &headers).await;
    silent.start().await;
    let close = silent.close().await;
    assert_eq!(close["code"], 4007);
    assert_eq!(close["reason"], "no pong within pong_timeout");
    // The answering one is still there.
    assert_eq!(
        stream.event().await.unwrap().json(),
        json!({"type": "ping"})
    );
}

#[tokio::test]
async fn refusals_come_before_the_stream_with_a_status_and_a_close_code() {
    let server = TestServer::start_with_file(
        Some(HISTORY),
        &[
            ("allowed_origins", "https://app.example.com"),
            ("max_message_size", "1024"),
        ],
    )
    .await;
    let addr = server.ws_addr;
    let good = bearer(&token("di", json!({"channels": ["h:*"]})));
    let expired = bearer(&sidecast_token_expired());
    // (path, headers, status, close code, reason)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, u16, &'a str);
    let cases: [Case; 6] = [
        ("/sse", vec![], 401, 4001, "missing token"),
        (
            "/sse",
            vec![("authorization", "Bearer x.y.z")],
            401,
            4001,
            "malformed token",
        ),
        (
            "/sse",
            vec![("authorization", &expired)],
            401,
            4002,
            "token expired",
        ),
        (
            "/sse?channel=secret",
            vec![("authorization", &good)],
            403,
            4500,
            "channel \"secret\": no permission to subscribe to this channel",
        ),
        (
            "/sse?channel=h:a",
            vec![("authorization", &good), ("last-event-id", "{\"h:a\":3}")],
            400,
            4500,
            "bad Last-Event-ID: a position is {\"offset\": integer, \"epoch\": string}",
        ),
        (
            "/sse?channel=bad%20name",
            vec![("authorization", &good)],
            400,
            4500,
            "",
        ),
    ];
    for (path, headers, status, code, reason) in cases {
        let response = request(addr, "GET", path, &headers, "").await;
        assert_eq!(response.status(), status, "{path} {headers:?}");
        let body = json_body(response).await;
        assert_eq!(body["code"], code, "{path}: {body}");
        if !reason.is_empty() {
            assert_eq!(body["reason"], reason);
        }
    }
    // A refusal closes its connection, as every answer but an upgrade or a stream does.
    let refused = request(
        addr,
        "GET",
        "/sse",
        &[("authorization", "Bearer x.y.z")],
        "",
    )
    .await;
    assert_eq!(refused.headers()["connection"], "close");

    // The token in the query, as for a WebSocket.
    let query = format!("/sse?token={}", good.trim_start_matches("Bearer "));
    assert_eq!(request(addr, "GET", &query, &[], "").await.status(), 200);

    // Another site's page: refused like a WebSocket upgrade; the app's own page is let in,
    // and may read the answers (CORS).
    let evil = [
        ("origin", "https://evil.example"),
        ("authorization", good.as_str()),
    ];
    assert_eq!(request(addr, "GET", "/sse", &evil, "").await.status(), 403);
    let app = [("origin", "https://app.example.com")];
    let preflight = request(addr, "OPTIONS", "/sse", &app, "").await;
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    assert_eq!(request(addr, "PUT", "/sse", &app, "").await.status(), 405);

    // Commands: an unknown session, one too big, one not UTF-8, and too many waiting.
    let unknown = request(addr, "POST", "/sse?session=nope", &app, "{}").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(json_body(unknown).await["reason"], "unknown session");
    let with_origin = [
        ("origin", "https://app.example.com"),
        ("authorization", good.as_str()),
    ];
    let mut stream = open(addr, "/sse", &with_origin).await;
    let (session, _) = stream.start().await;
    let big = format!(r#"{{"id":1,"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    let path = format!("/sse?session={session}");
    let too_big = request(addr, "POST", &path, &app, &big).await;
    assert_eq!(too_big.status(), 413);
    assert_eq!(
        too_big.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(json_body(too_big).await["code"], 1009);
    let evil_post = request(addr, "POST", &path, &evil[..1], r#"{"id":1,"op":"ping"}"#).await;
    assert_eq!(evil_post.status(), 403);
    // The refused commands did not reach the connection: the next one is answered first.
    assert_eq!(post(addr, &session, r#"{"id":2,"op":"ping"}"#).await, 202);
    assert_eq!(stream.message().await, json!({"id": 2, "result": {}}));
}

fn sidecast_token_expired() -> String {
    crate::support::sign_hs256(
        &json!({"sub": "old", "exp": now() - 60}),
        crate::support::SECRET,
    )
}

#[tokio::test]
async fn a_client_that_goes_away_ends_its_connection_and_leaves_presence() {
    let file = "[namespaces.p]\npresence = true\n";
    let server = TestServer::start_with_file(Some(file), &[]).await;
    let auth = bearer(&token("ed", json!({"channels": ["p:*"]})));
    let stream = open(
        server.ws_addr,
        "/sse?channel=p:room",
        &[("authorization", &auth)],
    )
    .await;
    let mut watcher = server.user("fay", json!({"channels": ["p:*"]})).await;
    watcher.subscribe(1, "p:room").await;
    let mut grpc = server.grpc().await;
    let stats = grpc
        .presence_stats(pb::PresenceStatsRequest {
            channel: "p:room".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.num_users, 2);
    drop(stream);
    let grpc_for_check = grpc.clone();
    eventually("the SSE client left presence", || {
        let mut grpc = grpc_for_check.clone();
        async move {
            grpc.presence_stats(pb::PresenceStatsRequest {
                channel: "p:room".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .num_users
                == 1
        }
    })
    .await;
    let admin = server.admin;
    eventually("the SSE connection is counted gone", || async move {
        let metrics = http_get(admin, "/metrics").await.1;
        sample(&metrics, "sidecast_connections") == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_stream_opened_with_the_cookie_recovers_on_another_node() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let origin = "https://app.example.com";
    let settings = [
        ("auth_cookie", "sid"),
        ("allowed_origins", origin),
        ("broker", url.as_str()),
    ];
    let (a, b) = (
        TestServer::start_ready(Some(HISTORY), &settings).await,
        TestServer::start_ready(Some(HISTORY), &settings).await,
    );
    let cookie = format!("sid={}", token("gus", json!({"channels": ["h:*"]})));
    let headers = [("origin", origin), ("cookie", cookie.as_str())];
    let mut stream = open(a.ws_addr, "/sse?channel=h:live", &headers).await;
    assert_eq!(stream.start().await.1["user"], "gus");
    assert_eq!(stream.message().await["type"], "sub");
    let mut grpc = b.grpc().await;
    grpc.publish(publish("h:live", r#"{"n":1}"#)).await.unwrap();
    let seen = stream.event().await.unwrap();
    assert_eq!(seen.json()["data"], json!({"n": 1}));
    drop(stream);
    for n in 2..=3 {
        grpc.publish(publish("h:live", &format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
    }
    let last_id = seen.id.unwrap();
    let headers = [
        ("origin", origin),
        ("cookie", cookie.as_str()),
        ("last-event-id", last_id.as_str()),
    ];
    let mut stream = open(b.ws_addr, "/sse?channel=h:live", &headers).await;
    stream.start().await;
    let sub = stream.message().await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let data: Vec<&Value> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["data"])
        .collect();
    assert_eq!(data, [&json!({"n": 2}), &json!({"n": 3})]);
}

/// Writes `bytes` on a connection of its own and reads the answer's status line and body.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "no answer");
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.parse().unwrap())
                })
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                break end;
            }
        }
    };
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(&text[head_end + 4..]).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn posts_without_a_session_not_utf8_or_too_slow_are_refused() {
    let server = TestServer::start(&[("header_read_timeout", "300ms")]).await;
    let addr = server.ws_addr;
    let auth = bearer(&token("hal", json!({})));
    let mut stream = open(addr, "/sse", &[("authorization", &auth)]).await;
    let (session, _) = stream.start().await;

    let (status, body) = raw(
        addr,
        b"POST /sse HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("missing session"))
    );

    let mut not_utf8 =
        format!("POST /sse?session={session} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
            .into_bytes();
    not_utf8.extend_from_slice(&[0x7B, 0xFF, 0x7D]);
    let (status, body) = raw(addr, &not_utf8).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(1007)));

    // A body announced and never sent.
    let slow =
        format!("POST /sse?session={session} HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n{{");
    let (status, _) = raw(addr, slow.as_bytes()).await;
    assert_eq!(status, 408);

    // None of them reached the connection.
    assert_eq!(post(addr, &session, r#"{"id":3,"op":"ping"}"#).await, 202);
    assert_eq!(stream.message().await, json!({"id": 3, "result": {}}));
}

/// Open descriptors of a process.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_socket_not_only_its_connection() {
    use tokio::io::AsyncWriteExt;
    let node = crate::support::NodeProcess::start(
        "[namespaces.f]\npublic = true\n",
        &[
            ("write_timeout", "300ms"),
            ("socket_send_buffer", "16384"),
            ("header_read_timeout", "60s"),
        ],
    )
    .await;
    let pid = node.child.0.as_ref().unwrap().id();
    let addr: SocketAddr = node.ws_url["ws://".len()..node.ws_url.len() - "/ws".len()]
        .parse()
        .unwrap();
    let mut grpc = sidecast::pb::control_client::ControlClient::connect(node.grpc_url.clone())
        .await
        .unwrap();
    // A client that sends its request and never reads, with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let get = format!(
        "GET /sse?channel=f:x&token={} HTTP/1.1\r\nHost: x\r\n\r\n",
        token("kim", json!({}))
    );
    tcp.write_all(get.as_bytes()).await.unwrap();
    let grpc_for_check = grpc.clone();
    eventually("the stream is open", || {
        let mut grpc = grpc_for_check.clone();
        async move {
            grpc.info(pb::InfoRequest {})
                .await
                .unwrap()
                .into_inner()
                .connections
                == 1
        }
    })
    .await;
    let open = descriptors(pid);
    let pad = "x".repeat(4000);
    for n in 0..400 {
        grpc.publish(publish("f:x", &format!(r#"{{"n":{n},"pad":"{pad}"}}"#)))
            .await
            .unwrap();
    }
    // Its connection ends (write_timeout), then its socket is closed too.
    eventually("the stalled stream's socket is closed", || async move {
        descriptors(pid) < open
    })
    .await;
    drop(tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_posted_faster_than_the_connection_reads_them_are_refused_429() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let server = TestServer::start_ready(None, &[("broker", &url), ("redis_timeout", "5s")]).await;
    let addr = server.ws_addr;
    let auth = bearer(&token("ida", json!({"publish": ["news"]})));
    let mut stream = open(addr, "/sse", &[("authorization", &auth)]).await;
    let (session, _) = stream.start().await;

    // Redis holds the publish script while paused: the connection waits on its `publish`
    // and reads no further command, so the POSTed ones queue up.
    let mut redis_conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg("3000")
        .arg("WRITE")
        .query(&mut redis_conn)
        .unwrap();
    let publish = r#"{"id":1,"op":"publish","channel":"news","data":1}"#;
    assert_eq!(post(addr, &session, publish).await, 202);
    let mut accepted = 0;
    let refusal = loop {
        assert!(accepted <= 64, "more than 64 commands were queued");
        let ping = format!(r#"{{"id":{},"op":"ping"}}"#, accepted + 2);
        let path = format!("/sse?session={session}");
        let response = request(addr, "POST", &path, &[], &ping).await;
        match response.status().as_u16() {
            202 => accepted += 1,
            429 => break json_body(response).await,
            other => panic!("POST answered {other}"),
        }
    };
    assert_eq!(
        refusal,
        json!({"code": 4005, "reason": "too many commands waiting"})
    );
    // One queue of 64: the publish was either read already or still in it.
    assert!((63..=64).contains(&accepted), "{accepted} accepted");

    // Once Redis answers, every accepted command is answered, in order, on the same stream.
    assert_eq!(stream.message().await["id"], 1);
    for id in 2..accepted + 2 {
        assert_eq!(stream.message().await, json!({"id": id, "result": {}}));
    }
    assert_eq!(post(addr, &session, r#"{"id":99,"op":"ping"}"#).await, 202);
    assert_eq!(stream.message().await, json!({"id": 99, "result": {}}));
}
