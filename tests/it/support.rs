//! The test DSL: an in-process node on port 0, WebSocket clients (tokio-tungstenite, an
//! independent implementation) and the generated gRPC client.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sidecast::config::Config;
use sidecast::pb::control_client::ControlClient;
use sidecast::{run, Listeners};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret";
/// A safety net so a broken server fails the test instead of hanging it; never a pacing device.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub ws_url: String,
    pub grpc_url: String,
    pub admin: SocketAddr,
    pub ws_addr: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A node with the test HMAC secret and `settings` as configuration overrides.
    pub async fn start(settings: &[(&str, &str)]) -> TestServer {
        TestServer::start_with_file(None, settings).await
    }

    pub async fn start_with_file(file: Option<&str>, settings: &[(&str, &str)]) -> TestServer {
        let mut overrides: Vec<(String, String)> =
            vec![("token_hmac_secret".into(), SECRET.into())];
        overrides.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_layers(file.map(|f| ("test.toml", f)), &[], &overrides)
            .expect("valid test config");
        TestServer::start_config(config).await
    }

    /// [`TestServer::start_with_file`], then waits until /readyz answers 200 (a node on Redis
    /// is ready once its engine carries publications).
    pub async fn start_ready(file: Option<&str>, settings: &[(&str, &str)]) -> TestServer {
        let server = TestServer::start_with_file(file, settings).await;
        let admin = server.admin;
        eventually("the node is ready", || async move {
            http_get(admin, "/readyz").await.0 == 200
        })
        .await;
        server
    }

    pub async fn start_config(config: Config) -> TestServer {
        TestServer::start_config_on(config, "127.0.0.1").await
    }

    /// With the WebSocket listener on `ws_host` (an address of a veth link, say); the
    /// other listeners stay on loopback.
    pub async fn start_config_on(config: Config, ws_host: &str) -> TestServer {
        TestServer::start_config_hosts(config, ws_host, "127.0.0.1").await
    }

    /// With the WebSocket listener on `ws_host` and the control API on `grpc_host`.
    pub async fn start_config_hosts(config: Config, ws_host: &str, grpc_host: &str) -> TestServer {
        let ws = TcpListener::bind((ws_host, 0)).await.unwrap();
        let grpc = TcpListener::bind((grpc_host, 0)).await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = ws.local_addr().unwrap();
        let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let listeners = Listeners { ws, grpc, admin };
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            run(listeners, config, token).await.expect("node runs");
        });
        TestServer {
            ws_url: format!("ws://{ws_addr}/ws"),
            grpc_url,
            admin: admin_addr,
            ws_addr,
            shutdown,
            handle: Some(handle),
        }
    }

    pub async fn grpc(&self) -> ControlClient<tonic::transport::Channel> {
        ControlClient::connect(self.grpc_url.clone())
            .await
            .expect("grpc connects")
    }

    /// Connects with the first-frame form and returns once `connected` arrived.
    pub async fn connect(&self, token: &str) -> Client {
        Client::open(&self.ws_url).await.authenticate(token).await
    }

    /// A connected client of `user` with the given extra claims (channels, publish, subs...).
    pub async fn user(&self, user: &str, claims: Value) -> Client {
        self.connect(&token(user, claims)).await
    }

    /// Like [`TestServer::user`], over a socket with a 4 KiB receive buffer: a client that
    /// stops reading soon leaves the server's frames queued.
    pub async fn user_small_buffer(&self, user: &str, claims: Value) -> Client {
        Client::open_small_buffer(self.ws_addr, &self.ws_url)
            .await
            .authenticate(&token(user, claims))
            .await
    }

    /// Waits until the node holds no connection.
    pub async fn until_no_connections(&self) {
        let grpc = self.grpc().await;
        eventually("no connection left", || {
            let mut grpc = grpc.clone();
            async move {
                grpc.info(sidecast::pb::InfoRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .connections
                    == 0
            }
        })
        .await;
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn now() -> u64 {
    sidecast::ws::unix_now()
}

/// An HS256 token for `user` with `exp` an hour away, merged with `claims`.
pub fn token(user: &str, claims: Value) -> String {
    let mut all = json!({"sub": user, "exp": now() + 3600, "iat": now()});
    for (k, v) in claims.as_object().cloned().unwrap_or_default() {
        all[k] = v;
    }
    sign_hs256(&all, SECRET)
}

pub fn sign_hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub client_id: String,
}

impl Client {
    pub async fn open(url: &str) -> Client {
        Client::open_request(url.into_client_request().unwrap()).await
    }

    /// Opens with the request's own headers (a Cookie, an Origin).
    pub async fn open_request(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket opens");
        Client {
            ws,
            client_id: String::new(),
        }
    }

    /// Sends the first-frame `connect` and returns once `connected` arrived.
    pub async fn authenticate(mut self, token: &str) -> Client {
        self.send(json!({"id": 1, "op": "connect", "token": token}))
            .await;
        let connected = self.recv().await;
        assert_eq!(connected["type"], "connected", "{connected}");
        self.client_id = connected["client"].as_str().unwrap().to_string();
        self
    }

    /// Opens over a socket with a small receive buffer (for slow-consumer tests).
    pub async fn open_small_buffer(addr: SocketAddr, url: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let request = url.into_client_request().unwrap();
        let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        Client {
            ws,
            client_id: String::new(),
        }
    }

    pub async fn send(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// Ends the TCP stream's sending half (a FIN, no WebSocket Close), still able to read.
    pub fn half_close(&self) {
        let MaybeTlsStream::Plain(stream) = self.ws.get_ref() else {
            panic!("a plain TCP client");
        };
        socket2::SockRef::from(stream)
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
    }

    /// Sends without reading; false once the server has dropped the socket.
    pub async fn try_send_raw(&mut self, message: Message) -> bool {
        self.ws.send(message).await.is_ok()
    }

    /// The next JSON message, pings included.
    pub async fn recv_any(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a message in time")
                .expect("the connection is open")
                .expect("a frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(frame) => panic!("closed while waiting for a message: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next JSON message that is not a heartbeat ping.
    pub async fn recv(&mut self) -> Value {
        loop {
            let value = self.recv_any().await;
            if value["type"] != "ping" {
                return value;
            }
        }
    }

    /// Sends a command and returns its reply (pushes before it are skipped).
    pub async fn request(&mut self, command: Value) -> Value {
        let id = command["id"].clone();
        self.send(command).await;
        loop {
            let value = self.recv().await;
            if value["id"] == id {
                return value;
            }
        }
    }

    pub async fn subscribe(&mut self, id: u64, channel: &str) -> Value {
        self.request(json!({"id": id, "op": "subscribe", "channel": channel}))
            .await
    }

    /// Reads until the server's Close, skipping messages; returns (code, reason). The whole
    /// wait is bounded: messages that keep coming (pings) cannot keep it waiting.
    pub async fn closed(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a close in time");
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("error instead of a close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }

    /// The server's Close, when nothing else comes before it (a refused connection must not
    /// see `connected` first): (code, reason).
    pub async fn only_close(&mut self) -> (u16, String) {
        let next = tokio::time::timeout(PATIENCE, self.ws.next())
            .await
            .expect("a close in time");
        match next {
            Some(Ok(Message::Close(Some(frame)))) => {
                (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => (1005, String::new()),
            other => panic!("a close and nothing else was expected, got {other:?}"),
        }
    }

    /// Counts the messages until the stream ends, and the close code if it ended with a
    /// Close frame (None: the TCP stream ended, or was reset, without one; any other error
    /// fails the test).
    pub async fn count_until_end(&mut self) -> (usize, Option<u16>) {
        use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
        let mut count = 0;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("the end in time");
            match next {
                Some(Ok(Message::Close(frame))) => {
                    return (count, Some(frame.map_or(1005, |f| u16::from(f.code))))
                }
                Some(Ok(_)) => count += 1,
                Some(Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))) | None => {
                    return (count, None)
                }
                Some(Err(Error::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return (count, None)
                }
                Some(Err(e)) => panic!("not the end of the stream: {e}"),
            }
        }
    }

    /// Collects messages until the server's Close: (messages, close code).
    pub async fn drain_until_close(&mut self) -> (Vec<Value>, u16) {
        self.drain_until_close_by(tokio::time::Instant::now() + PATIENCE)
            .await
    }

    /// As `drain_until_close`, with the close due by `deadline`.
    pub async fn drain_until_close_by(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> (Vec<Value>, u16) {
        let mut messages = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a close in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    messages.push(serde_json::from_str(&text).unwrap())
                }
                Some(Ok(Message::Close(frame))) => {
                    return (messages, frame.map_or(1005, |f| u16::from(f.code)))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("error instead of a close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }
}

/// A Publish request with `data` as JSON text.
pub fn publish(channel: &str, data: &str) -> sidecast::pb::PublishRequest {
    sidecast::pb::PublishRequest {
        channel: channel.into(),
        data: data.as_bytes().to_vec(),
        idempotency_key: String::new(),
        ..Default::default()
    }
}

/// Sends a raw HTTP request and returns the status code.
pub async fn http_status(addr: SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// GET `path` over HTTP/1.1: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The value of one sample in a /metrics text (`name` with its labels, exactly as exposed).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Polls a condition of the node's state until it holds (state changes after a socket
/// closes are not observable as an event from outside).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node in a process of its own (so that a test can SIGKILL it), with `file` as its
/// configuration file and `settings` as overrides; killed when dropped.
pub struct NodeProcess {
    pub child: KillOnDrop,
    pub ws_url: String,
    pub grpc_url: String,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts the node and waits until it is ready.
    pub async fn start(file: &str, settings: &[(&str, &str)]) -> NodeProcess {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, file).unwrap();
        let (ws, grpc, admin) = (free_port(), free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidecast"));
        command
            .arg("--config")
            .arg(&path)
            .args(["--ws-addr", &format!("127.0.0.1:{ws}")])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--set", &format!("token_hmac_secret={SECRET}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in settings {
            command.args(["--set", &format!("{k}={v}")]);
        }
        let child = KillOnDrop(Some(command.spawn().unwrap()));
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        eventually("the node process is ready", || async move {
            TcpStream::connect(admin).await.is_ok() && http_get(admin, "/readyz").await.0 == 200
        })
        .await;
        NodeProcess {
            child,
            ws_url: format!("ws://127.0.0.1:{ws}/ws"),
            grpc_url: format!("http://127.0.0.1:{grpc}"),
            _dir: dir,
        }
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        let mut child = self.child.0.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A connected client of `user` with the given extra claims.
    pub async fn user(&self, user: &str, claims: Value) -> Client {
        Client::open(&self.ws_url)
            .await
            .authenticate(&token(user, claims))
            .await
    }
}

/// A loopback port nobody listens on (now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The users present in `channel` (Control.Presence), sorted.
pub async fn present_users(
    grpc: &sidecast::pb::control_client::ControlClient<tonic::transport::Channel>,
    channel: &str,
) -> Vec<String> {
    let presence = grpc
        .clone()
        .presence(sidecast::pb::PresenceRequest {
            channel: channel.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut users: Vec<String> = presence.clients.into_iter().map(|c| c.user).collect();
    users.sort();
    users
}

/// `ip` with arguments; panics on failure (the tests run as root, as on CI).
pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("iproute2");
    assert!(status.success(), "ip {args:?}");
}

/// A network namespace joined to this one by a veth pair: this side has `near_ip`, the
/// namespace `far_ip` (a /30 of 10.64.0.0/10 picked from the test process's id and `tag`).
/// Taking the far end down makes packets vanish without an error or a reset, as on a
/// half-open connection. Everything in the namespace is killed, and it is removed, on drop.
pub struct Netns {
    pub ns: String,
    near: String,
    far: String,
    pub near_ip: String,
    pub far_ip: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let id = std::process::id();
        let (ns, near, far) = (
            format!("{tag}{id}"),
            format!("{tag}{id}a"),
            format!("{tag}{id}b"),
        );
        // A /30 per (process, tag): tags differ in their last letter.
        let slot = u32::from(tag.bytes().last().unwrap_or(0)) % 64;
        let net = format!("10.{}.{}.{}", 64 + (id >> 8) % 64, id % 256, slot * 4);
        let base: Vec<u32> = net.split('.').map(|p| p.parse().unwrap()).collect();
        let addr = |last: u32| format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + last);
        let (near_ip, far_ip) = (addr(1), addr(2));
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &near, "type", "veth", "peer", "name", &far]);
        ip(&["link", "set", &far, "netns", &ns]);
        ip(&["addr", "add", &format!("{near_ip}/30"), "dev", &near]);
        ip(&["link", "set", &near, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{far_ip}/30"), "dev", &far]);
        inside(&["link", "set", &far, "up"]);
        inside(&["link", "set", "lo", "up"]);
        Netns {
            ns,
            near,
            far,
            near_ip,
            far_ip,
        }
    }

    /// A command run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns, program]);
        command
    }

    /// Takes the namespace's end of the link `up` or `down`.
    pub fn link(&self, state: &str) {
        ip(&[
            "netns", "exec", &self.ns, "ip", "link", "set", &self.far, state,
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.near])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
