//! Connecting: tokens, the two ways to present them, refusals, refresh and expiry.

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::{http_status, now, sign_hs256, token, Client, TestServer, SECRET};

#[tokio::test]
async fn first_frame_connect_gets_connected() {
    let server = TestServer::start(&[("ping_interval", "20s")]).await;
    let mut client = Client::open(&server.ws_url).await;
    client
        .send(json!({"id": 1, "op": "connect", "token": token("alice", json!({}))}))
        .await;
    let connected = client.recv().await;
    assert_eq!(connected["type"], "connected");
    assert_eq!(connected["version"], 1);
    assert_eq!(connected["user"], "alice");
    assert_eq!(connected["ping_interval"], 20);
    let id = connected["client"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    let expires_in = connected["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    assert_eq!(
        client.request(json!({"id": 2, "op": "ping"})).await,
        json!({"id": 2, "result": {}})
    );
}

#[tokio::test]
async fn query_token_connects_and_ids_are_unique() {
    let server = TestServer::start(&[]).await;
    let url = format!("{}?token={}", server.ws_url, token("bob", json!({})));
    let mut a = Client::open(&url).await;
    let mut b = Client::open(&url).await;
    let (ca, cb) = (a.recv().await, b.recv().await);
    assert_eq!(ca["user"], "bob");
    assert_ne!(ca["client"], cb["client"]);
}

#[tokio::test]
async fn subprotocol_is_echoed_or_refused() {
    let server = TestServer::start(&[]).await;
    let mut request = server.ws_url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("other, sidecast.v1"),
    );
    let (_ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "sidecast.v1");

    let mut request = server.ws_url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

#[tokio::test]
async fn http_answers_before_the_upgrade() {
    let server = TestServer::start(&[]).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(http_status(server.ws_addr, &get("/ws")).await, 426);
    assert_eq!(http_status(server.ws_addr, &get("/nope")).await, 404);
    let bad_version = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                       Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert_eq!(http_status(server.ws_addr, bad_version).await, 400);
    // RFC 6455, section 4.2.1: a GET, over HTTP/1.1 or later, with a key of 16 bytes in base64.
    let upgrade = |method: &str, version: &str, key: &str| {
        format!(
            "{method} /ws {version}\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        )
    };
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    assert_eq!(
        http_status(server.ws_addr, &upgrade("GET", "HTTP/1.1", key)).await,
        101
    );
    for (method, version, key) in [
        ("POST", "HTTP/1.1", key),
        ("PUT", "HTTP/1.1", key),
        ("GET", "HTTP/1.0", key),
        ("GET", "HTTP/1.1", "abc"),
        ("GET", "HTTP/1.1", "dGhlIHNhbXBsZSBub25j"),
        ("GET", "HTTP/1.1", "dGhlIHNhbXBsZSBub25jZQ==dGhl"),
    ] {
        let request = upgrade(method, version, key);
        assert_eq!(
            http_status(server.ws_addr, &request).await,
            400,
            "{request}"
        );
    }
    assert_eq!(http_status(server.admin, &get("/healthz")).await, 200);
    assert_eq!(http_status(server.admin, &get("/readyz")).await, 200);
}

/// A refused token gets its close and nothing before it (no `connected`).
async fn refused(server: &TestServer, token: &str) -> (u16, String) {
    let mut client = Client::open(&server.ws_url).await;
    client
        .send(json!({"id": 1, "op": "connect", "token": token}))
        .await;
    client.only_close().await
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn every_refusal_closes_with_its_code() {
    let server = TestServer::start(&[("token_leeway", "0s")]).await;
    let base = json!({"sub": "a", "exp": now() + 60});
    assert_eq!(
        refused(&server, &sign_hs256(&base, "wrong")).await,
        (4001, "bad signature".into())
    );
    assert_eq!(
        refused(
            &server,
            &sign_hs256(&json!({"sub": "a", "exp": now() - 1}), SECRET)
        )
        .await,
        (4002, "token expired".into())
    );
    assert_eq!(
        refused(&server, &sign_hs256(&json!({"exp": now() + 60}), SECRET)).await,
        (4001, "missing sub claim".into())
    );
    let later = json!({"sub": "a", "exp": now() + 120, "nbf": now() + 60});
    assert_eq!(
        refused(&server, &sign_hs256(&later, SECRET)).await,
        (4001, "token not yet valid".into())
    );
    assert_eq!(
        refused(&server, &sign_hs256(&json!({"sub": "a"}), SECRET)).await,
        (4001, "missing exp claim".into())
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &base,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        refused(&server, &hs512).await,
        (4001, "algorithm not allowed".into())
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(base.to_string().as_bytes())
    );
    assert_eq!(
        refused(&server, &none).await,
        (4001, "algorithm not allowed".into())
    );
    assert_eq!(
        refused(&server, "garbage").await,
        (4001, "malformed token".into())
    );
    // The query form refuses the same way.
    let mut client = Client::open(&format!("{}?token=garbage", server.ws_url)).await;
    assert_eq!(client.closed().await.0, 4001);
}

/// A claim of the wrong JSON type names that claim (protocol.md, section 2), like a claim
/// of the right type with a bad value does.
#[tokio::test]
async fn claims_of_the_wrong_type_name_the_claim() {
    let server = TestServer::start(&[]).await;
    let exp = now() + 60;
    let cases = [
        (
            json!({"sub": "a", "exp": exp, "channels": "chat:*"}),
            "channels",
        ),
        (json!({"sub": "a", "exp": exp, "channels": [5]}), "channels"),
        (json!({"sub": "a", "exp": exp, "publish": "x"}), "publish"),
        (json!({"sub": "a", "exp": exp, "subs": "x"}), "subs"),
        (json!({"sub": "a", "exp": exp, "subs": [null]}), "subs"),
        (json!({"sub": {}, "exp": exp}), "sub"),
        (json!({"sub": 7, "exp": exp}), "sub"),
        (json!({"sub": "a", "exp": "soon"}), "exp"),
        (json!({"sub": "a", "exp": 1u64 << 53}), "exp"),
        (json!({"sub": "a", "exp": 1e300}), "exp"),
        (json!({"sub": "a", "exp": exp, "nbf": [1]}), "nbf"),
        (json!({"sub": "a", "exp": exp, "info": "x"}), "info"),
        (json!({"sub": "a", "exp": exp, "meta": [1]}), "meta"),
    ];
    for (claims, name) in cases {
        assert_eq!(
            refused(&server, &sign_hs256(&claims, SECRET)).await,
            (4001, format!("invalid {name} claim")),
            "{claims}"
        );
    }
}

#[tokio::test]
async fn asymmetric_keys_and_algorithm_confusion() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let public = format!("{dir}/tests/fixtures/es256-public.pem");
    let server = TestServer::start(&[
        ("token_public_key_file", &public),
        ("token_algorithms", "ES256"),
    ])
    .await;
    let private = std::fs::read(format!("{dir}/tests/fixtures/es256-private.pem")).unwrap();
    let claims = json!({"sub": "carol", "exp": now() + 60});
    let es256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&private).unwrap(),
    )
    .unwrap();
    let mut client = server.connect(&es256).await;
    assert_eq!(
        client.request(json!({"id": 5, "op": "ping"})).await["result"],
        json!({})
    );
    // HS256 signed with the public key as the secret: the classic confusion attack.
    let pem = std::fs::read_to_string(&public).unwrap();
    assert_eq!(refused(&server, &sign_hs256(&claims, &pem)).await.0, 4001);
    // The test secret is not accepted here either: only ES256 is pinned.
    assert_eq!(refused(&server, &token("carol", json!({}))).await.0, 4001);
}

#[tokio::test]
async fn nothing_before_connect() {
    let server = TestServer::start(&[("connect_timeout", "200ms")]).await;
    let mut early = Client::open(&server.ws_url).await;
    early
        .send(json!({"id": 1, "op": "subscribe", "channel": "a"}))
        .await;
    assert_eq!(early.closed().await, (4001, "connect first".into()));
    // Silence until connect_timeout: closed too.
    let mut silent = Client::open(&server.ws_url).await;
    assert_eq!(
        silent.closed().await,
        (4001, "no connect within connect_timeout".into())
    );
}

#[tokio::test]
async fn refresh_narrows_grants_with_unsub() {
    let server = TestServer::start(&[]).await;
    let mut client = server
        .user(
            "dan",
            json!({"channels": ["chat:*", "news"], "subs": ["user:dan"]}),
        )
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "sub", "channel": "user:dan", "recoverable": false})
    );
    client.subscribe(2, "chat:a").await;
    client.subscribe(3, "news").await;
    let reply = client
        .request(
            json!({"id": 4, "op": "refresh", "token": token("dan", json!({"channels": ["news"]}))}),
        )
        .await;
    assert!(
        reply["result"]["expires_in"].as_u64().unwrap() > 3500,
        "{reply}"
    );
    // The unsub push precedes the reply: it was queued while the refresh was handled.
    let mut grpc = server.grpc().await;
    let channels = grpc
        .channels(sidecast::pb::ChannelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = channels
        .channels
        .iter()
        .map(|c| c.channel.as_str())
        .collect();
    assert_eq!(
        names,
        vec!["news", "user:dan"],
        "chat:a was revoked, the server-side sub stays"
    );
    // Another user's token is refused and the connection stays.
    let other = client
        .request(json!({"id": 5, "op": "refresh", "token": token("eve", json!({}))}))
        .await;
    assert_eq!(other["error"]["code"], "forbidden");
    let bad = client
        .request(json!({"id": 6, "op": "refresh", "token": "x"}))
        .await;
    assert_eq!(bad["error"]["code"], "unauthorized");
    assert_eq!(
        client.request(json!({"id": 7, "op": "ping"})).await["result"],
        json!({})
    );
}

#[tokio::test]
async fn unsub_push_is_sent_on_revocation() {
    let server = TestServer::start(&[]).await;
    let mut client = server.user("fay", json!({"channels": ["chat:*"]})).await;
    client.subscribe(2, "chat:a").await;
    client
        .send(json!({"id": 3, "op": "refresh", "token": token("fay", json!({"channels": []}))}))
        .await;
    let unsub = client.recv().await;
    assert_eq!(unsub["type"], "unsub");
    assert_eq!(unsub["channel"], "chat:a");
    assert_eq!(unsub["code"], 2001);
    assert_eq!(unsub["resubscribe"], false);
    assert_eq!(client.recv().await["id"], 3);
}

// About time: the token's `exp` is in whole seconds.
#[tokio::test]
async fn expiry_without_refresh_closes_4002() {
    let server = TestServer::start(&[("token_leeway", "0s")]).await;
    // now() is in whole seconds: +2 leaves at least a second for the connect to be accepted.
    let token = sign_hs256(&json!({"sub": "gus", "exp": now() + 2}), SECRET);
    let mut client = server.connect(&token).await;
    assert_eq!(client.closed().await, (4002, "token expired".into()));
}

// About time: proves the refreshed expiry replaced the first one.
#[tokio::test]
async fn refresh_extends_the_connection() {
    let server = TestServer::start(&[("token_leeway", "0s")]).await;
    // At least a second for connect and refresh, at most two before it would expire.
    let first = sign_hs256(&json!({"sub": "hal", "exp": now() + 2}), SECRET);
    let mut client = server.connect(&first).await;
    let reply = client
        .request(json!({"id": 2, "op": "refresh", "token": token("hal", json!({}))}))
        .await;
    assert!(reply.get("result").is_some(), "{reply}");
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    assert_eq!(
        client.request(json!({"id": 3, "op": "ping"})).await["result"],
        json!({})
    );
}
