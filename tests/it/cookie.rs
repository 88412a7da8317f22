//! Cookie sessions: with `auth_cookie`, a `connect` without a token authenticates with the
//! JWT in the upgrade request's cookie, verified exactly like a token; `allowed_origins`
//! keeps other sites' pages from using a visitor's cookie.

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::{http_status, now, sign_hs256, token, Client, TestServer, SECRET};

const ORIGIN: &str = "https://app.example.com";

async fn cookie_server() -> TestServer {
    TestServer::start(&[
        ("auth_cookie", "sid"),
        ("allowed_origins", ORIGIN),
        ("token_leeway", "0s"),
    ])
    .await
}

/// A socket opened from the app's page: its Origin, and `cookie` as the Cookie header.
async fn open(server: &TestServer, cookie: &str) -> Client {
    let mut request = server.ws_url.as_str().into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("origin", HeaderValue::from_static(ORIGIN));
    headers.insert("cookie", HeaderValue::from_str(cookie).unwrap());
    Client::open_request(request).await
}

#[tokio::test]
async fn a_connect_without_a_token_authenticates_with_the_session_cookie() {
    let server = cookie_server().await;
    let cookie = format!(
        "theme=dark; sid={}; other=1",
        token("alice", json!({"channels": ["news"]}))
    );
    let mut client = open(&server, &cookie).await;
    client.send(json!({"id": 1, "op": "connect"})).await;
    let connected = client.recv().await;
    assert_eq!(connected["type"], "connected");
    assert_eq!(connected["user"], "alice");
    // The cookie's claims are the connection's grants, as a token's would be.
    assert!(client.subscribe(2, "news").await.get("result").is_some());
    let mut control = server.grpc().await;
    control
        .publish(crate::support::publish("news", r#"{"n":1}"#))
        .await
        .unwrap();
    let publication = client.recv().await;
    assert_eq!(publication["type"], "pub");
    assert_eq!(publication["data"], json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_session_on_a_cluster_node_receives_what_another_node_publishes() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let settings = [
        ("auth_cookie", "sid"),
        ("allowed_origins", ORIGIN),
        ("broker", url.as_str()),
    ];
    let (a, b) = (
        TestServer::start_ready(None, &settings).await,
        TestServer::start_ready(None, &settings).await,
    );
    let cookie = format!("sid={}", token("alice", json!({"channels": ["news"]})));
    let mut client = open(&a, &cookie).await;
    client.send(json!({"id": 1, "op": "connect"})).await;
    assert_eq!(client.recv().await["user"], "alice");
    assert!(client.subscribe(2, "news").await.get("result").is_some());
    b.grpc()
        .await
        .publish(crate::support::publish("news", r#"{"n":2}"#))
        .await
        .unwrap();
    let publication = client.recv().await;
    assert_eq!(
        (publication["type"].as_str(), &publication["data"]),
        (Some("pub"), &json!({"n": 2}))
    );
}

#[tokio::test]
async fn a_token_in_connect_wins_over_the_cookie() {
    let server = cookie_server().await;
    let mut client = open(&server, &format!("sid={}", token("alice", json!({})))).await;
    client
        .send(json!({"id": 1, "op": "connect", "token": token("bob", json!({}))}))
        .await;
    assert_eq!(client.recv().await["user"], "bob");
}

#[tokio::test]
async fn the_cookie_is_refused_like_a_token() {
    let server = cookie_server().await;
    let cases = [
        (
            sign_hs256(&json!({"sub": "a", "exp": now() + 60}), "wrong"),
            (4001, "bad signature"),
        ),
        (
            sign_hs256(&json!({"sub": "a", "exp": now() - 1}), SECRET),
            (4002, "token expired"),
        ),
        ("garbage".to_string(), (4001, "malformed token")),
    ];
    for (jwt, (code, reason)) in cases {
        let mut client = open(&server, &format!("sid={jwt}")).await;
        client.send(json!({"id": 1, "op": "connect"})).await;
        assert_eq!(client.only_close().await, (code, reason.to_string()));
    }
    // A cookie's expiry ends the connection like a token's: its page reconnects, and the
    // browser sends the cookie the app has renewed meanwhile.
    let short = sign_hs256(&json!({"sub": "gus", "exp": now() + 2}), SECRET);
    let mut client = open(&server, &format!("sid={short}")).await;
    client.send(json!({"id": 1, "op": "connect"})).await;
    assert_eq!(client.recv().await["user"], "gus");
    assert_eq!(client.closed().await, (4002, "token expired".into()));
}

#[tokio::test]
async fn without_the_cookie_a_connect_still_needs_a_token() {
    let server = cookie_server().await;
    let missing = json!({"id": 1, "error": {"code": "bad_request", "message": "missing token"}});
    // Other cookies, or a near name, are not the session cookie.
    let mut client = open(&server, "sid2=x; SID=y").await;
    assert_eq!(
        client.request(json!({"id": 1, "op": "connect"})).await,
        missing
    );
    // The connection stays, unconnected, and may still connect with a token.
    client
        .send(json!({"id": 2, "op": "connect", "token": token("dan", json!({}))}))
        .await;
    assert_eq!(client.recv().await["user"], "dan");

    // Without auth_cookie a Cookie header means nothing.
    let plain = TestServer::start(&[]).await;
    let mut request = plain.ws_url.as_str().into_client_request().unwrap();
    let header = format!("sid={}", token("eve", json!({})));
    request
        .headers_mut()
        .insert("cookie", HeaderValue::from_str(&header).unwrap());
    let mut client = Client::open_request(request).await;
    assert_eq!(
        client.request(json!({"id": 1, "op": "connect"})).await,
        missing
    );
}

#[tokio::test]
async fn another_sites_page_is_refused_before_the_upgrade() {
    let server = cookie_server().await;
    let cookie = format!("sid={}", token("alice", json!({})));
    let request = |origin: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Origin: {origin}\r\nCookie: {cookie}\r\n\r\n"
        )
    };
    assert_eq!(
        http_status(server.ws_addr, &request("https://evil.example")).await,
        403
    );
    assert_eq!(http_status(server.ws_addr, &request(ORIGIN)).await, 101);
}
