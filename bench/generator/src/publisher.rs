//! Publishing at a set rate, open loop: publication i of a channel is due at start + i/rate
//! and carries that due time, so a sender that falls behind shows up as latency. One task
//! per channel publishes in sequence (so per-channel sequence numbers match the order the
//! server sees); channels run concurrently. With `--publish-stream` each publisher sends over
//! one Control.PublishStream without waiting for answers (a failed answer fails the next
//! publish); against Centrifugo the same flag sends through its batch API, each request
//! carrying whatever publications queued while the previous one was answered.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use sidecast::pb::control_client::ControlClient;
use sidecast::pb::{publish_stream_response, PublishRequest, PublishStreamRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_stream::wrappers::ReceiverStream;

use crate::stats::{now_nanos, payload, Stats};

/// Where publications go: sidecast's control API (one unary Publish each, or one
/// PublishStream per publisher) or a peer's HTTP publish API.
#[derive(Clone)]
pub enum Sink {
    /// One unary Publish each, with this W3C traceparent when not empty (`--traceparent`).
    Grpc(ControlClient<tonic::transport::Channel>, String),
    GrpcStream(ControlClient<tonic::transport::Channel>),
    Http(std::net::SocketAddr, HttpApi),
    /// Centrifugo's `POST /api/batch` with this API key.
    HttpBatch(std::net::SocketAddr, String),
}

/// The most publications one batch request carries.
const BATCH_MAX: usize = 100;

/// A peer's HTTP publish API, one request per publication on a kept-alive connection.
#[derive(Clone)]
pub enum HttpApi {
    /// The Node `ws` peer: `POST /publish?channel=NAME` with the data as the body.
    NodeWs,
    /// Centrifugo's server API: `POST /api/publish` with `X-API-Key` and
    /// `{"channel":NAME,"data":DATA}`; a refusal is a 200 whose body holds `"error"`.
    Centrifugo { key: String },
}

pub enum Conn {
    Grpc(ControlClient<tonic::transport::Channel>, String),
    /// The stream's requests, the next id, and the failures its answers reported so far.
    GrpcStream(
        mpsc::Sender<PublishStreamRequest>,
        u64,
        Rc<std::cell::Cell<u64>>,
    ),
    Http(TcpStream, Vec<u8>, HttpApi),
    /// Publications for the batching task, the failures its replies reported, and the task.
    HttpBatch(
        mpsc::Sender<(String, Vec<u8>)>,
        Rc<std::cell::Cell<u64>>,
        tokio::task::JoinHandle<()>,
    ),
}

impl Sink {
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        Ok(match self {
            Sink::Grpc(client, traceparent) => Conn::Grpc(client.clone(), traceparent.clone()),
            Sink::GrpcStream(client) => {
                let (tx, rx) = mpsc::channel(1024);
                let mut answers = client
                    .clone()
                    .publish_stream(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let failed = Rc::new(std::cell::Cell::new(0));
                let counted = failed.clone();
                tokio::task::spawn_local(async move {
                    while let Ok(Some(answer)) = answers.message().await {
                        if let Some(publish_stream_response::Result::Error(e)) = answer.result {
                            if counted.get() == 0 {
                                eprintln!("publication {} failed: {}", answer.id, e.message);
                            }
                            counted.set(counted.get() + 1);
                        }
                    }
                });
                Conn::GrpcStream(tx, 0, failed)
            }
            Sink::Http(addr, api) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Conn::Http(stream, Vec::with_capacity(512), api.clone())
            }
            Sink::HttpBatch(addr, key) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (tx, rx) = mpsc::channel(4 * BATCH_MAX);
                let failed = Rc::new(std::cell::Cell::new(0));
                let task =
                    tokio::task::spawn_local(batches(stream, key.clone(), rx, failed.clone()));
                Conn::HttpBatch(tx, failed, task)
            }
        })
    }
}

/// Sends what `rx` carries to Centrifugo's batch API, one request at a time, each with every
/// publication queued meanwhile (at most BATCH_MAX); counts the replies that hold an error.
async fn batches(
    mut stream: TcpStream,
    key: String,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    failed: Rc<std::cell::Cell<u64>>,
) {
    let mut buf = Vec::with_capacity(4096);
    let mut queued = Vec::with_capacity(BATCH_MAX);
    while rx.recv_many(&mut queued, BATCH_MAX).await > 0 {
        let mut body = br#"{"commands":["#.to_vec();
        for (i, (channel, data)) in queued.drain(..).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(br#"{"publish":{"channel":""#);
            body.extend_from_slice(channel.as_bytes());
            body.extend_from_slice(br#"","data":"#);
            body.extend_from_slice(&data);
            body.extend_from_slice(b"}}");
        }
        body.extend_from_slice(b"]}");
        let head = format!(
            "POST /api/batch HTTP/1.1\r\nHost: peer\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = stream.write_all(&[head.as_bytes(), &body].concat()).await;
        let errors = match sent.map_err(anyhow::Error::from) {
            Ok(()) => read_http_body(&mut stream, &mut buf)
                .await
                .map(|body| body.windows(8).filter(|w| w == br#""error":"#).count() as u64),
            Err(e) => Err(e),
        };
        match errors {
            Ok(0) => {}
            Ok(n) => failed.set(failed.get() + n),
            Err(e) => {
                eprintln!("batch publish failed: {e}");
                failed.set(failed.get() + 1);
                return;
            }
        }
    }
}

impl Conn {
    pub async fn publish(&mut self, channel: &str, data: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Conn::Grpc(client, traceparent) => {
                client
                    .publish(PublishRequest {
                        channel: channel.to_string(),
                        data,
                        idempotency_key: String::new(),
                        traceparent: traceparent.clone(),
                        ..Default::default()
                    })
                    .await?;
            }
            Conn::GrpcStream(tx, next_id, failed) => {
                anyhow::ensure!(failed.get() == 0, "{} publications failed", failed.get());
                let request = PublishStreamRequest {
                    id: *next_id,
                    publication: Some(PublishRequest {
                        channel: channel.to_string(),
                        data,
                        idempotency_key: String::new(),
                        ..Default::default()
                    }),
                };
                *next_id += 1;
                tx.send(request)
                    .await
                    .map_err(|_| anyhow::anyhow!("publish stream ended"))?;
            }
            Conn::Http(stream, buf, HttpApi::NodeWs) => {
                let head = format!(
                    "POST /publish?channel={channel} HTTP/1.1\r\nHost: peer\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    data.len()
                );
                stream.write_all(&[head.as_bytes(), &data].concat()).await?;
                read_http_response(stream, buf).await?;
            }
            Conn::Http(stream, buf, HttpApi::Centrifugo { key }) => {
                let body = [
                    br#"{"channel":""#.as_slice(),
                    channel.as_bytes(),
                    br#"","data":"#,
                    &data,
                    b"}",
                ]
                .concat();
                let head = format!(
                    "POST /api/publish HTTP/1.1\r\nHost: peer\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(&[head.as_bytes(), &body].concat()).await?;
                read_http_response(stream, buf).await?;
            }
            Conn::HttpBatch(tx, failed, _) => {
                anyhow::ensure!(failed.get() == 0, "{} publications failed", failed.get());
                tx.send((channel.to_string(), data))
                    .await
                    .map_err(|_| anyhow::anyhow!("batch publisher ended"))?;
            }
        }
        Ok(())
    }

    /// Waits until every publication handed over has been sent and answered (a batch
    /// publisher's queue), or only drops the connection (the others).
    pub async fn finish(self) {
        if let Conn::HttpBatch(tx, _, task) = self {
            drop(tx);
            let _ = task.await;
        }
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body; errors unless 200 and the body
/// names no error.
async fn read_http_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let body = read_http_body(stream, buf).await?;
    anyhow::ensure!(
        !body.windows(8).any(|w| w == br#""error":"#),
        "publish refused: {}",
        String::from_utf8_lossy(body)
    );
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body; errors unless 200.
async fn read_http_body<'a>(
    stream: &mut TcpStream,
    buf: &'a mut Vec<u8>,
) -> anyhow::Result<&'a [u8]> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "publish connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
            anyhow::ensure!(head.starts_with("http/1.1 200"), "publish refused: {head}");
            return Ok(&buf[end + 4..end + 4 + length]);
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "publish connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One channel a plan publishes to.
pub struct PlanChannel {
    pub name: String,
    pub index: u32,
    /// The first sequence number (continues across steps of a ladder).
    pub first_seq: u64,
}

/// One publisher's plan: publication k goes to channel k mod n, so each channel's
/// publications stay in sequence while one task (and one connection) serves many channels.
pub struct Plan {
    pub channels: Vec<PlanChannel>,
    /// Publications per second, all of this plan's channels together.
    pub rate: f64,
    pub duration: Duration,
    pub pad: usize,
    /// Connections subscribed to each channel (for loss and time-to-last accounting).
    pub subscribers: u32,
    pub track_last: bool,
    /// Where in its interval this plan starts, as a fraction in [0, 1): many publishers are
    /// spread out instead of all publishing in the same instant.
    pub phase: f64,
}

#[derive(Default, Debug, Clone)]
pub struct Sent {
    pub published: u64,
    pub errors: u64,
    /// Publications sent more than one interval after they were due.
    pub late: u64,
    /// The sequence number each channel's next publication takes, in plan order.
    pub next_seqs: Vec<u64>,
}

/// Publishes `plan` open loop on `conn`; returns what was sent.
pub async fn run(plan: Plan, mut conn: Conn, stats: Rc<RefCell<Stats>>) -> (Sent, Conn) {
    let mut sent = Sent {
        next_seqs: plan.channels.iter().map(|c| c.first_seq).collect(),
        ..Sent::default()
    };
    let interval = Duration::from_secs_f64(1.0 / plan.rate);
    let start = Instant::now();
    let start_nanos = now_nanos();
    let end = start + plan.duration;
    for k in 0u64.. {
        let offset = interval.mul_f64(k as f64 + plan.phase);
        let due = start + offset;
        if due >= end {
            break;
        }
        let now = Instant::now();
        if now < due {
            sleep_until(due).await;
        } else if now - due > interval {
            sent.late += 1;
        }
        let slot = (k % plan.channels.len() as u64) as usize;
        let channel = &plan.channels[slot];
        let seq = sent.next_seqs[slot];
        sent.next_seqs[slot] = seq + 1;
        let data = payload(
            channel.index,
            seq,
            start_nanos + offset.as_nanos() as u64,
            plan.pad,
        );
        stats
            .borrow_mut()
            .published(channel.index, seq, plan.subscribers, plan.track_last);
        match conn.publish(&channel.name, data).await {
            Ok(()) => sent.published += 1,
            Err(e) => {
                if sent.errors == 0 {
                    eprintln!("publish to {} failed: {e}", channel.name);
                }
                sent.errors += 1;
            }
        }
    }
    (sent, conn)
}
