//! The generator's WebSocket connections: opened from several 127.0.0.x source addresses,
//! authenticated, subscribed, then read by one task each until told to stop. They speak
//! sidecast's protocol (which the Node `ws` peer imitates) or Centrifugo's JSON protocol.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::stats::{Sequences, Stats};
use crate::wsclient::{WsConn, OP_CLOSE, OP_TEXT};

/// The client protocol a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// sidecast v1: `{"op":"connect"}`, `{"type":"pub"}` pushes, one message per frame.
    Sidecast,
    /// Centrifugo's JSON protocol: `{"connect":{}}` commands, `{"push":{"pub":{}}}` pushes,
    /// several messages in one frame separated by newlines, `{}` pings answered with `{}`.
    Centrifugo,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Sidecast => "sidecast",
            Protocol::Centrifugo => "centrifugo",
        }
    }
}

#[derive(Clone)]
pub struct Target {
    /// One address per node; connection i goes to address i mod n.
    pub ws: Vec<SocketAddr>,
    pub path: String,
    pub secret: String,
    /// How many 127.0.0.x source addresses to spread connections over.
    pub sources: u8,
    pub protocol: Protocol,
}

/// One simulated client.
#[derive(Clone, Debug)]
pub struct Member {
    pub user: String,
    /// Channels in the token's `subs` claim (subscribed by the server at connect).
    pub subs: Vec<String>,
    /// Channels subscribed with the subscribe command.
    pub channels: Vec<String>,
    /// A small receive buffer, for clients that will stop reading.
    pub small_buffer: bool,
}

impl Target {
    fn source(&self, index: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % self.sources.max(1) as usize) as u8,
        ))
    }

    fn token(&self, member: &Member) -> String {
        let now = crate::stats::now_nanos() / 1_000_000_000;
        let claims = match self.protocol {
            Protocol::Sidecast => json!({
                "sub": member.user, "exp": now + 86_400, "iat": now,
                "channels": member.channels, "subs": member.subs,
            }),
            // Centrifugo's `channels` claim lists server-side subscriptions (sidecast's `subs`);
            // the namespace's configuration allows subscribing to the others.
            Protocol::Centrifugo => json!({
                "sub": member.user, "exp": now + 86_400, "iat": now,
                "channels": member.subs,
            }),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("HS256 signing")
    }

    /// Opens the socket and completes the WebSocket upgrade only.
    pub async fn upgrade(&self, index: usize, member: &Member) -> std::io::Result<WsConn> {
        let rcvbuf = member.small_buffer.then_some(4096);
        let ws = self.ws[index % self.ws.len()];
        WsConn::connect(ws, self.source(index), &self.path, rcvbuf).await
    }

    /// Sends `connect` and waits for `connected` (and the `sub` pushes of the subs claim).
    pub async fn authenticate(&self, conn: &mut WsConn, member: &Member) -> std::io::Result<()> {
        if self.protocol == Protocol::Centrifugo {
            // Server-side subscriptions are part of Centrifugo's connect reply.
            let connect = json!({"id": 1, "connect": {"token": self.token(member)}});
            conn.send_text(connect.to_string().as_bytes()).await?;
            return reply(conn, 1, "connect").await;
        }
        let connect = json!({"id": 1, "op": "connect", "token": self.token(member)});
        conn.send_text(connect.to_string().as_bytes()).await?;
        conn.expect(|p| p.starts_with(br#"{"type":"connected""#))
            .await?;
        for _ in &member.subs {
            conn.expect(|p| p.starts_with(br#"{"type":"sub""#)).await?;
        }
        Ok(())
    }

    /// Subscribes with commands and waits for each reply.
    pub async fn subscribe(&self, conn: &mut WsConn, member: &Member) -> std::io::Result<()> {
        for (i, channel) in member.channels.iter().enumerate() {
            let id = 10 + i as u64;
            if self.protocol == Protocol::Centrifugo {
                let command = json!({"id": id, "subscribe": {"channel": channel}});
                conn.send_text(command.to_string().as_bytes()).await?;
                reply(conn, id, "subscribe").await?;
                continue;
            }
            let command = json!({"id": id, "op": "subscribe", "channel": channel});
            conn.send_text(command.to_string().as_bytes()).await?;
            let prefix = format!(r#"{{"id":{id},"#);
            let reply = conn.expect(|p| p.starts_with(prefix.as_bytes())).await?;
            if !reply.windows(9).any(|w| w == br#""result":"#) {
                return Err(std::io::Error::other(format!(
                    "subscribe refused: {}",
                    String::from_utf8_lossy(&reply)
                )));
            }
        }
        Ok(())
    }

    /// Upgrade, authenticate and subscribe.
    pub async fn open(&self, index: usize, member: &Member) -> std::io::Result<WsConn> {
        let mut conn = self.upgrade(index, member).await?;
        self.authenticate(&mut conn, member).await?;
        self.subscribe(&mut conn, member).await?;
        Ok(conn)
    }
}

/// Waits for a Centrifugo reply to command `id`, an error unless it carries `kind`.
async fn reply(conn: &mut WsConn, id: u64, kind: &str) -> std::io::Result<()> {
    let prefix = format!(r#"{{"id":{id},"#);
    let reply = conn.expect(|p| p.starts_with(prefix.as_bytes())).await?;
    let expected = format!(r#"{prefix}"{kind}":"#);
    if !reply.starts_with(expected.as_bytes()) {
        return Err(std::io::Error::other(format!(
            "{kind} refused: {}",
            String::from_utf8_lossy(&reply)
        )));
    }
    Ok(())
}

/// Runs `f` for `items` with at most `limit` in flight, on the current thread; results keep
/// the order of `items`.
pub async fn in_batches<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = R> + 'static,
    R: 'static,
{
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let mut running = tokio::task::JoinSet::new();
    for (i, item) in items.into_iter().enumerate() {
        if running.len() >= limit {
            let (done, r) = running
                .join_next()
                .await
                .expect("a task")
                .expect("task ran");
            results[done] = Some(r);
        }
        let fut = f(item);
        running.spawn_local(async move { (i, fut.await) });
    }
    while let Some(joined) = running.join_next().await {
        let (done, r) = joined.expect("task ran");
        results[done] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every result"))
        .collect()
}

/// Reads a connection until `stop`, recording publications; answers pings.
pub async fn read(
    mut conn: WsConn,
    protocol: Protocol,
    stats: Rc<RefCell<Stats>>,
    stop: CancellationToken,
) {
    let mut seqs = Sequences::default();
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        // Our own client's read is cancel-safe: bytes are only ever appended to the buffer.
        let frame = tokio::select! {
            biased;
            _ = &mut cancelled => return,
            frame = conn.next() => frame,
        };
        let Ok(frame) = frame else { return };
        match frame.opcode {
            OP_TEXT => {
                let payload = conn.payload(&frame);
                let pings = match protocol {
                    Protocol::Sidecast => {
                        if payload.starts_with(br#"{"type":"pub""#) {
                            stats.borrow_mut().delivered(&mut seqs, payload);
                        }
                        usize::from(payload == br#"{"type":"ping"}"#)
                    }
                    Protocol::Centrifugo => {
                        let mut pings = 0;
                        for message in payload.split(|b| *b == b'\n') {
                            if message.starts_with(br#"{"push":"#) {
                                stats.borrow_mut().delivered(&mut seqs, message);
                            } else if message == b"{}" {
                                pings += 1;
                            }
                        }
                        pings
                    }
                };
                let pong: &[u8] = match protocol {
                    Protocol::Sidecast => br#"{"op":"pong"}"#,
                    Protocol::Centrifugo => b"{}",
                };
                for _ in 0..pings {
                    if conn.send_text(pong).await.is_err() {
                        return;
                    }
                }
            }
            OP_CLOSE => {
                let p = conn.payload(&frame);
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                *stats.borrow_mut().closes.entry(code).or_default() += 1;
                return;
            }
            _ => {}
        }
    }
}
