//! The WebSocket listener: accepts TCP connections, serves the HTTP/1.1 upgrade on the
//! configured path, and spawns one session per upgraded connection.
//!
//! Checks made before the upgrade, each with its HTTP answer: the path (404), that the
//! request is a WebSocket upgrade (426), its Origin against `allowed_origins` (403), the
//! connection limits (`admission`: 503, or 429 past the attempt rate), the
//! offered subprotocols (400 when they do not include `sidecast.v1`, which is echoed when
//! offered), and the handshake headers (400).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::node::Node;
use crate::wire::{cookie, origin, SUBPROTOCOL};
use crate::ws::admission::{Admission, Refusal, Ticket};
use crate::ws::connection::{self, Credentials};
use crate::ws::sse::{self, Sessions, SseBody};

/// A response: a plain answer (or the upgrade's), or an SSE stream.
type Body = Either<Full<Bytes>, SseBody>;

/// Where connections' tasks are spawned and how they are stopped.
#[derive(Clone)]
pub struct Tasks {
    pub tracker: TaskTracker,
    /// Close every connection with 1001.
    pub shutdown: CancellationToken,
    /// End every connection now.
    pub kill: CancellationToken,
}

/// Accepts until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    node: Node,
    admission: Arc<Admission>,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let sessions = Sessions::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a transient error: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A place is taken now, not at the upgrade: a socket still sending its headers holds
        // memory too (up to MAX_HEADER_BYTES), so it counts against the limits.
        let ticket = match admission.accept(peer.ip(), Instant::now()) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                tracing::debug!(%peer, %refusal, "connection refused");
                if tls.is_none() {
                    tasks.tracker.spawn(refuse(stream, refusal));
                }
                // Over TLS no answer can be written before a handshake: the socket is closed.
                continue;
            }
        };
        let ticket = Arc::new(std::sync::Mutex::new(Some(ticket)));
        let _ = stream.set_nodelay(true);
        if node.config.socket_send_buffer > 0 {
            // A fixed size also turns the kernel's autotuning off for this socket: what a
            // stalled reader can hold in the kernel stays small, and its queue fills (4004).
            let _ = socket2::SockRef::from(&stream)
                .set_send_buffer_size(node.config.socket_send_buffer);
        }
        let node = node.clone();
        let admission = admission.clone();
        let tls = tls.clone();
        let tasks_for_conn = tasks.clone();
        let stop = stop.clone();
        let sessions = sessions.clone();
        // Ends the HTTP connection, and so drops its socket: an SSE stream's connection
        // does so when the client has taken nothing for too long (see `connection::run_sse`).
        let hangup = CancellationToken::new();
        let hangup_here = hangup.clone();
        tasks.tracker.spawn(
            async move {
                let header_read_timeout = node.config.header_read_timeout;
                let service = hyper::service::service_fn(move |req| {
                    let node = node.clone();
                    let tasks = tasks_for_conn.clone();
                    let admission = admission.clone();
                    let ticket = ticket.clone();
                    let sessions = sessions.clone();
                    let hangup = hangup.clone();
                    async move {
                        if is_sse_post(&req, &node) {
                            let response = post_command(req, &sessions, &node).await;
                            return Ok::<_, Infallible>(response.map(Either::Left));
                        }
                        let upgrade = Upgrade {
                            peer,
                            admission: &admission,
                            ticket: &ticket,
                            sessions: &sessions,
                            hangup: &hangup,
                        };
                        Ok(handle(req, upgrade, node, tasks))
                    }
                });
                // Bounded headers: more is answered 431. Every answer but the upgrade closes
                // the connection (`plain`).
                let http = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .clone();
                let served = async move {
                    let result = match tls {
                        None => {
                            http.serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await
                        }
                        Some(tls) => {
                            // The handshake shares the header read deadline.
                            let accepted =
                                tokio::time::timeout(header_read_timeout, tls.accept(stream)).await;
                            let stream = match accepted {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            };
                            http.serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                };
                tokio::select! {
                    _ = served => {}
                    _ = stop.cancelled() => {}
                    _ = hangup_here.cancelled() => {}
                }
            }
            .instrument(tracing::debug_span!("ws", %peer)),
        );
    }
}

/// What an upgrade request is admitted with: the place its socket took when accepted.
struct Upgrade<'a> {
    peer: SocketAddr,
    admission: &'a Admission,
    ticket: &'a std::sync::Mutex<Option<Ticket>>,
    sessions: &'a Sessions,
    hangup: &'a CancellationToken,
}

fn handle(
    mut req: Request<Incoming>,
    upgrade: Upgrade<'_>,
    node: Node,
    tasks: Tasks,
) -> Response<Body> {
    let Upgrade {
        peer,
        admission,
        ticket,
        sessions,
        hangup,
    } = upgrade;
    let is_sse = is_sse(&req, &node);
    if req.uri().path() != node.config.ws_path && !is_sse {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if !is_sse && !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return plain(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket only",
        );
    }
    if !origin_allowed(&req, &node) {
        return plain(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let cors = req.headers().get(hyper::header::ORIGIN).cloned();
    if is_sse && req.method() == hyper::Method::OPTIONS {
        let mut response = sse::preflight();
        sse::allow_origin(&mut response, cors.as_ref());
        return response.map(Either::Left);
    }
    // Every X-Forwarded-For line, in order: a proxy may add a line of its own rather than
    // append to the client's.
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("invalid"))
        .collect();
    let forwarded_for = (!forwarded.is_empty()).then(|| forwarded.join(","));
    let ip = admission.client_ip(peer.ip(), forwarded_for.as_deref());
    // The socket's place, taken when it was accepted; it goes with the session on upgrade.
    let mut slot = ticket.lock().expect("ticket lock");
    let Some(ticket) = slot.as_mut() else {
        return plain(StatusCode::BAD_REQUEST, "one upgrade per connection");
    };
    if let Err(refusal) = admission.forwarded(ticket, ip, Instant::now()) {
        tracing::debug!(%ip, %refusal, "upgrade refused");
        let status = StatusCode::from_u16(refusal.status()).expect("a valid status");
        let mut response = plain(status, &refusal.to_string());
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    if is_sse {
        let stream = Stream {
            sessions,
            hangup,
            cors: cors.as_ref(),
        };
        return open_sse(&req, node, &mut slot, tasks, stream);
    }
    let protocol = match offered_protocol(&req) {
        Ok(protocol) => protocol,
        Err(()) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer sidecast.v1",
            )
        }
    };
    if let Err(problem) = rfc6455(&req) {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!("bad WebSocket handshake: {problem}"),
        );
    }
    let credentials = Credentials {
        query_token: sse::query_values(req.uri().query().unwrap_or(""), "token")
            .into_iter()
            .next(),
        cookie: node.config.auth_cookie.as_deref().and_then(|name| {
            let headers = req.headers().get_all(hyper::header::COOKIE);
            cookie::find(headers.iter().map(|v| v.as_bytes()), name).map(Box::from)
        }),
        positions: Vec::new(),
        channels: Vec::new(),
    };
    let Some(ticket) = slot.take() else {
        return plain(StatusCode::BAD_REQUEST, "one upgrade per connection");
    };
    drop(slot);
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(upgraded) => upgraded,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("bad WebSocket handshake: {e}"),
            )
        }
    };
    tasks.tracker.spawn(
        connection::run(
            upgrade,
            node,
            ticket,
            credentials,
            tasks.shutdown.clone(),
            tasks.kill.clone(),
            tasks.tracker.clone(),
        )
        .in_current_span(),
    );
    let mut response = response.map(|_| Either::Left(Full::new(Bytes::new())));
    if protocol {
        response.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    response
}

/// What an SSE stream is opened with besides the request.
struct Stream<'a> {
    sessions: &'a Sessions,
    hangup: &'a CancellationToken,
    cors: Option<&'a HeaderValue>,
}

/// Opens an SSE stream (`sse::open` checks it) and spawns its connection.
fn open_sse(
    req: &Request<Incoming>,
    node: Node,
    slot: &mut Option<Ticket>,
    tasks: Tasks,
    stream: Stream<'_>,
) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the stream is opened with GET; commands are POSTed",
        );
    }
    // A refused request leaves the socket its place: the next request on it may succeed.
    let Stream {
        sessions,
        hangup,
        cors,
    } = stream;
    let opened = match sse::open(req, &node, sessions) {
        Ok(opened) => opened,
        Err(refused) => {
            let mut refusal = refused.response();
            sse::allow_origin(&mut refusal, cors);
            return refusal.map(Either::Left);
        }
    };
    let Some(ticket) = slot.take() else {
        return plain(StatusCode::BAD_REQUEST, "one stream per connection");
    };
    tasks.tracker.spawn(
        connection::run_sse(
            sse::Parts {
                hangup: hangup.clone(),
                ..opened.parts
            },
            node,
            ticket,
            tasks.shutdown.clone(),
            tasks.kill.clone(),
        )
        .in_current_span(),
    );
    let mut response = opened.response;
    sse::allow_origin(&mut response, cors);
    response.map(Either::Right)
}

fn is_sse<B>(req: &Request<B>, node: &Node) -> bool {
    !node.config.sse_path.is_empty() && req.uri().path() == node.config.sse_path
}

fn is_sse_post<B>(req: &Request<B>, node: &Node) -> bool {
    is_sse(req, node) && req.method() == hyper::Method::POST
}

fn origin_allowed<B>(req: &Request<B>, node: &Node) -> bool {
    let origin = req
        .headers()
        .get(hyper::header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    origin::allowed(&node.config.allowed_origins, origin)
}

/// A command POSTed to an SSE stream, under the same Origin rule as the stream.
async fn post_command(
    req: Request<Incoming>,
    sessions: &Sessions,
    node: &Node,
) -> Response<Full<Bytes>> {
    if !origin_allowed(&req, node) {
        let mut response = Response::new(Full::new(Bytes::from("origin not allowed\n")));
        *response.status_mut() = StatusCode::FORBIDDEN;
        return response;
    }
    let cors = req.headers().get(hyper::header::ORIGIN).cloned();
    let mut response = sse::post(req, sessions, node).await;
    sse::allow_origin(&mut response, cors.as_ref());
    response
}

/// The most bytes of request head a connection may send (hyper's read buffer): an upgrade
/// needs a few hundred, cookies included a few thousand.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// How long a refused socket is read (and what it sends discarded) after its answer, so
/// that closing it does not reset the connection before the client has read the answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Answers a socket refused when accepted (the limits, before any byte is read) and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, refusal: Refusal) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let status = StatusCode::from_u16(refusal.status()).expect("a valid status");
    let body = format!("{refusal}\n");
    let answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    );
    let linger = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < MAX_HEADER_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}

/// What RFC 6455 (section 4.2.1) requires of an opening handshake beyond the headers that
/// `fastwebsockets` checks (Upgrade, Connection, the version): a GET, over HTTP/1.1 or
/// later, whose Sec-WebSocket-Key is 16 bytes in base64.
fn rfc6455<B>(req: &Request<B>) -> Result<(), &'static str> {
    use base64::Engine;
    if req.method() != hyper::Method::GET {
        return Err("the method must be GET");
    }
    if req.version() < hyper::Version::HTTP_11 {
        return Err("HTTP/1.1 or later is required");
    }
    let key = req
        .headers()
        .get(hyper::header::SEC_WEBSOCKET_KEY)
        .ok_or("Sec-WebSocket-Key is missing")?;
    match base64::engine::general_purpose::STANDARD.decode(key.as_bytes()) {
        Ok(nonce) if nonce.len() == 16 => Ok(()),
        _ => Err("Sec-WebSocket-Key must be 16 bytes in base64"),
    }
}

/// Ok(true) when the client offered `sidecast.v1`, Ok(false) when it offered nothing.
fn offered_protocol<B>(req: &Request<B>) -> Result<bool, ()> {
    let mut offered = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok(false);
    }
    if offered.any(|p| p == SUBPROTOCOL) {
        Ok(true)
    } else {
        Err(())
    }
}

/// An answer other than the upgrade; the connection closes after it, so a socket never
/// stays open (and holding a place) between requests.
fn plain(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(format!("{body}\n")))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    response
}
