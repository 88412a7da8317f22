//! The Server-Sent Events transport, for clients whose network blocks WebSockets: the
//! same protocol, its server messages as events of a `GET` stream and its commands as
//! `POST`s.
//!
//! `open` checks a `GET` (its token, `Last-Event-ID` and `channel`s) before any byte of
//! the stream is sent, so that each refusal is an HTTP status with the close code a
//! WebSocket would have got. An accepted stream is a connection like any other: its task
//! (`connection::run_sse`) reads [`Commands`], the frames of what the client POSTs, and
//! writes its usual server frames into a pipe, which [`SseBody`] turns into events
//! (`wire::sse`) as the socket takes them. docs/protocol.md (section 15) is the
//! specification.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};

use crate::node::Node;
use crate::wire::close;
use crate::wire::command;
use crate::wire::cookie;
use crate::wire::sse::Translator;
use crate::ws::connection::Credentials;
use crate::ws::reader::Fill;

/// Commands POSTed to a session and not yet read: more are answered 429.
pub const COMMAND_QUEUE: usize = 64;

/// What the connection may write ahead of the socket, besides its queue.
const PIPE_BYTES: usize = 16 * 1024;

/// How long a client waits before it reconnects a stream that ended (the `retry` field).
const RETRY_MS: u32 = 1000;

/// The open streams of a listener, by their session key: where POSTed commands go.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<Box<str>, mpsc::Sender<Bytes>>>>);

impl Sessions {
    fn sender(&self, key: &str) -> Option<mpsc::Sender<Bytes>> {
        self.0.lock().expect("sessions lock").get(key).cloned()
    }
}

/// A stream's place in [`Sessions`], given up when its connection ends.
struct Entry {
    sessions: Sessions,
    key: Box<str>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.sessions
            .0
            .lock()
            .expect("sessions lock")
            .remove(&self.key);
    }
}

/// What an accepted `GET` starts: the response, and its connection's parts.
pub struct Opened {
    pub response: Response<SseBody>,
    pub parts: Parts,
}

/// What an SSE stream's connection runs with.
pub struct Parts {
    pub commands: Commands,
    pub pipe: DuplexStream,
    pub credentials: Credentials,
    /// Cancelled once the response's body is gone (sent, or the client left).
    pub gone: CancellationToken,
    /// Ends the HTTP connection that carries the stream (set by the listener).
    pub hangup: CancellationToken,
}

/// Checks a `GET` of the stream and opens it; a refusal is the answer to send instead.
pub fn open(req: &Request<Incoming>, node: &Node, sessions: &Sessions) -> Result<Opened, Refused> {
    let query = req.uri().query().unwrap_or("");
    let token = bearer(req)
        .or_else(|| query_values(query, "token").into_iter().next())
        .or_else(|| {
            let name = node.config.auth_cookie.as_deref()?;
            let headers = req.headers().get_all(hyper::header::COOKIE);
            cookie::find(headers.iter().map(|v| v.as_bytes()), name)
        });
    let Some(token) = token else {
        return Err(Refused::new(
            StatusCode::UNAUTHORIZED,
            close::UNAUTHORIZED,
            "missing token",
        ));
    };
    let claims = node
        .verifier
        .verify(&token, crate::ws::unix_now())
        .map_err(|e| {
            let close = e.close();
            Refused::new(StatusCode::UNAUTHORIZED, close.code, &close.reason)
        })?;
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().map(String::from).unwrap_or_default())
        .or_else(|| query_values(query, "last_event_id").into_iter().next());
    let positions = match last_event_id.as_deref() {
        None | Some("") => Vec::new(),
        Some(id) => command::positions(id).map_err(|e| {
            let reason = format!("bad Last-Event-ID: {e}");
            Refused::new(StatusCode::BAD_REQUEST, close::BAD_REQUEST, &reason)
        })?,
    };
    let asked = query_values(query, "channel");
    if asked.len() > node.config.max_subscriptions {
        let reason = format!(
            "more than max_subscriptions ({}) channels",
            node.config.max_subscriptions
        );
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            close::BAD_REQUEST,
            &reason,
        ));
    }
    let mut channels: Vec<String> = Vec::with_capacity(asked.len());
    for channel in asked {
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    for channel in &channels {
        if let Err(e) = node.check_client_subscribe(&claims, channel) {
            let status = match e {
                crate::node::NodeError::Forbidden(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            let reason = format!("channel {channel:?}: {e}");
            return Err(Refused::new(status, close::BAD_REQUEST, &reason));
        }
    }

    let key: Box<str> = Box::from(format!("{:032x}", rand::random::<u128>()));
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    sessions
        .0
        .lock()
        .expect("sessions lock")
        .insert(key.clone(), tx);
    let gone = CancellationToken::new();
    let commands = Commands {
        rx,
        gone: Box::pin(gone.clone().cancelled_owned()),
        _entry: Entry {
            sessions: sessions.clone(),
            key: key.clone(),
        },
    };
    let (pipe, read) = tokio::io::duplex(PIPE_BYTES);
    let head = format!("retry: {RETRY_MS}\nevent: session\ndata: {{\"session\":\"{key}\"}}\n\n");
    let body = SseBody {
        read,
        translator: Translator::default(),
        head: Some(Bytes::from(head)),
        _gone: gone.clone().drop_guard(),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    // Proxies that buffer responses (nginx) would hold the events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    Ok(Opened {
        response,
        parts: Parts {
            commands,
            pipe,
            credentials: Credentials {
                query_token: Some(token),
                cookie: None,
                positions,
                channels,
            },
            gone,
            hangup: CancellationToken::new(),
        },
    })
}

/// A command POSTed to a stream (`?session=`, the key of the stream's `session` event): it
/// is read like a WebSocket message, and its reply comes on the stream. 202 once queued.
pub async fn post(
    req: Request<Incoming>,
    sessions: &Sessions,
    node: &Node,
) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let Some(key) = query_values(query, "session").into_iter().next() else {
        return refusal(
            StatusCode::BAD_REQUEST,
            close::BAD_REQUEST,
            "missing session",
        );
    };
    let Some(sender) = sessions.sender(&key) else {
        return refusal(StatusCode::NOT_FOUND, close::BAD_REQUEST, "unknown session");
    };
    let max = node.config.max_message_size;
    let read = Limited::new(req.into_body(), max).collect();
    let body = match tokio::time::timeout(node.config.header_read_timeout, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let reason = format!("a command is at most max_message_size ({max} bytes)");
            return refusal(StatusCode::PAYLOAD_TOO_LARGE, close::TOO_BIG, &reason);
        }
        Ok(Err(_)) => return refusal(StatusCode::BAD_REQUEST, close::BAD_REQUEST, "body not read"),
        Err(_) => {
            return refusal(
                StatusCode::REQUEST_TIMEOUT,
                close::BAD_REQUEST,
                "body not sent within header_read_timeout",
            )
        }
    };
    if std::str::from_utf8(&body).is_err() {
        return refusal(
            StatusCode::BAD_REQUEST,
            close::INVALID_PAYLOAD,
            "invalid UTF-8",
        );
    }
    match sender.try_send(body) {
        Ok(()) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::ACCEPTED;
            response
        }
        Err(mpsc::error::TrySendError::Full(_)) => refusal(
            StatusCode::TOO_MANY_REQUESTS,
            close::RATE_LIMITED,
            "too many commands waiting",
        ),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            refusal(StatusCode::NOT_FOUND, close::BAD_REQUEST, "unknown session")
        }
    }
}

/// The answer to a CORS preflight: a page of another origin may open the stream with an
/// `Authorization` or `Last-Event-ID` header, and POST commands.
pub fn preflight() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST"),
    );
    headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, last-event-id, content-type"),
    );
    headers.insert("access-control-max-age", HeaderValue::from_static("600"));
    response
}

/// Lets the page of `origin` (already checked against allowed_origins) read an answer.
pub fn allow_origin<B>(response: &mut Response<B>, origin: Option<&HeaderValue>) {
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert("access-control-allow-origin", origin.clone());
        headers.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
        headers.insert(hyper::header::VARY, HeaderValue::from_static("origin"));
    }
}

/// An SSE request refused: its status, the close code a WebSocket would have got, and
/// the reason.
#[derive(Debug)]
pub struct Refused {
    status: StatusCode,
    code: u16,
    reason: String,
}

impl Refused {
    fn new(status: StatusCode, code: u16, reason: &str) -> Refused {
        Refused {
            status,
            code,
            reason: reason.to_string(),
        }
    }

    /// The answer: the status, with `{"code":4001,"reason":"bad signature"}`.
    pub fn response(&self) -> Response<Full<Bytes>> {
        refusal(self.status, self.code, &self.reason)
    }
}

fn refusal(status: StatusCode, code: u16, reason: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"code": code, "reason": reason}).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // As every answer but an upgrade or a stream: the socket does not outlive it.
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn bearer<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// Every value of `key` in a query string, percent-decoded (`+` kept as is); values that
/// do not decode, and empty ones, are left out.
pub fn query_values(query: &str, key: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == key)
        .filter_map(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
        .collect()
}

/// Decodes `%XX` escapes; None if malformed.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The commands POSTed to a stream, as the frames a WebSocket client would have sent; the
/// end of the stream once its body is gone (the client left, or the stream ended).
pub struct Commands {
    rx: mpsc::Receiver<Bytes>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    _entry: Entry,
}

impl Fill for Commands {
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        _needed: usize,
    ) -> Poll<io::Result<usize>> {
        if self.gone.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(0));
        }
        match ready!(self.rx.poll_recv(cx)) {
            Some(command) => {
                let before = buf.len();
                masked_text(&command, buf);
                Poll::Ready(Ok(buf.len() - before))
            }
            None => Poll::Ready(Ok(0)),
        }
    }
}

/// A final text frame as a client sends it: masked, here with a zero key (RFC 6455 lets
/// the client choose it), which leaves the payload as it is.
fn masked_text(payload: &[u8], out: &mut BytesMut) {
    let len = payload.len();
    out.reserve(len + 14);
    out.put_u8(0x81);
    if len < 126 {
        out.put_u8(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(0x80 | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(len as u64);
    }
    out.put_slice(&[0; 4]);
    out.put_slice(payload);
}

/// The stream's body: its head (`retry`, then the `session` event), then the events of the
/// frames the connection writes into the pipe, until its Close frame or the pipe's end.
/// Dropping it (the client went away) ends the connection's [`Commands`].
pub struct SseBody {
    read: DuplexStream,
    translator: Translator,
    head: Option<Bytes>,
    _gone: DropGuard,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        let mut chunk = [0u8; 8 * 1024];
        loop {
            if this.translator.closed() {
                return Poll::Ready(None);
            }
            let mut read = ReadBuf::new(&mut chunk);
            if ready!(Pin::new(&mut this.read).poll_read(cx, &mut read)).is_err()
                || read.filled().is_empty()
            {
                return Poll::Ready(None);
            }
            let mut out = BytesMut::new();
            this.translator.feed(read.filled(), &mut out);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_values(
                "channel=a%3A1&x=1&channel=b&channel=&channel=%zz",
                "channel"
            ),
            ["a:1", "b"]
        );
    }

    #[test]
    fn posted_commands_decode_as_client_frames() {
        let mut buf = BytesMut::new();
        let long = format!(r#"{{"id":1,"op":"ping","pad":"{}"}}"#, "x".repeat(300));
        masked_text(long.as_bytes(), &mut buf);
        match crate::wire::inbound::decode(&mut buf, 1 << 20) {
            Ok(crate::wire::inbound::Decoded::Frame(frame)) => {
                assert_eq!(&frame.payload[..], long.as_bytes())
            }
            other => panic!("not a frame: {:?}", other.is_ok()),
        }
    }
}
