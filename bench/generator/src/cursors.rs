//! Live cursors (`cursors`): every user of one room publishes its cursor from its own socket
//! `moves` times a second into a namespace with `slow_consumer = "conflate"` keyed by user
//! (bench/cursors.toml, which bench/run passes with BENCH_SERVER_CONFIG). A share of the users
//! are slow: they read only during the first tenth of each second and leave their socket
//! unread the rest of it (they keep publishing). Reports the deliveries per second, the
//! server's CPU per delivery, the others' latency, and how old the cursors the slow ones read
//! were (their staleness), with how many of the moves they were sent.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::Member;
use crate::probe::Snapshot;
use crate::scenario::{members, open_all, Ctx};
use crate::wsclient::{WsConn, OP_CLOSE, OP_TEXT};

const CHANNEL: &str = "cursors:room";

struct Seen {
    /// Publish-to-receive, in µs, at the users that keep up.
    latency: Histogram<u64>,
    /// Age of each cursor a slow user read, in µs.
    staleness: Histogram<u64>,
    fast_received: u64,
    slow_received: u64,
    published: u64,
    closes: u64,
}

impl Seen {
    fn new() -> Seen {
        let histogram = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
        Seen {
            latency: histogram(),
            staleness: histogram(),
            fast_received: 0,
            slow_received: 0,
            published: 0,
            closes: 0,
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The `"t":` number of a `pub` frame (the move's send time), found without parsing the rest.
fn sent_at(payload: &[u8]) -> Option<u64> {
    if !payload.starts_with(br#"{"type":"pub""#) {
        return None;
    }
    let at = payload.windows(4).position(|w| w == br#""t":"#)? + 4;
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

pub async fn cursors(
    ctx: &Ctx,
    users: usize,
    moves: f64,
    slow_pct: f64,
    secs: f64,
) -> anyhow::Result<()> {
    let slow = ((users as f64) * slow_pct / 100.0).ceil() as usize;
    let ms = members(users, |i| Member {
        user: format!("u{i}"),
        subs: vec![],
        channels: vec![CHANNEL.into()],
        small_buffer: i < slow,
    });
    let conns = open_all(ctx, &ms).await?;
    let seen = Rc::new(RefCell::new(Seen::new()));
    let stop = CancellationToken::new();
    let start = Instant::now();
    let before = Snapshot::take(ctx.server_pid.as_deref());
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let phase = Duration::from_secs_f64(i as f64 / users as f64 / moves);
        tasks.push(tokio::task::spawn_local(user(
            conn,
            i,
            moves,
            i < slow,
            phase,
            seen.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep_until(start + Duration::from_secs_f64(secs)).await;
    let after = Snapshot::take(ctx.server_pid.as_deref());
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let (wall, server_cpu, generator_cpu) = after.since(&before);
    let seen = seen.borrow();
    let received = seen.fast_received + seen.slow_received;
    let per_sec = received as f64 / wall;
    let cpu_per_delivery_us = server_cpu / received.max(1) as f64 * 1e6;
    let generator_share = generator_cpu / wall;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    // Each user receives every move in the room, its own included.
    let offered_to_slow = seen.published as f64 * slow as f64;
    let bound = if generator_share > 0.8 {
        " (GENERATOR-BOUND: figure does not count)"
    } else {
        ""
    };
    println!(
        "{} cursors users={users} moves={moves}/s slow={slow}: {per_sec:.0} deliveries/s, server {cpu_per_delivery_us:.2} CPU-µs per delivery, others p50 {:.2} ms p99 {:.2} ms, slow ones read {:.1}% of the moves sent to them, staleness p50 {:.0} ms p99 {:.0} ms max {:.0} ms, closes {}, generator CPU {:.0}%{bound}",
        ctx.peer,
        ms(&seen.latency, 0.5),
        ms(&seen.latency, 0.99),
        100.0 * seen.slow_received as f64 / offered_to_slow.max(1.0),
        ms(&seen.staleness, 0.5),
        ms(&seen.staleness, 0.99),
        seen.staleness.max() as f64 / 1000.0,
        seen.closes,
        generator_share * 100.0,
    );
    let result = json!({
        "peer": ctx.peer, "scenario": "cursors", "users": users, "moves_per_sec": moves,
        "slow": slow, "seconds": wall, "published": seen.published, "received": received,
        "deliveries_per_sec": per_sec, "server_cpu_us_per_delivery": cpu_per_delivery_us,
        "others_p50_ms": ms(&seen.latency, 0.5), "others_p99_ms": ms(&seen.latency, 0.99),
        "slow_received": seen.slow_received, "slow_offered": offered_to_slow,
        "staleness_p50_ms": ms(&seen.staleness, 0.5), "staleness_p99_ms": ms(&seen.staleness, 0.99),
        "staleness_max_ms": seen.staleness.max() as f64 / 1000.0,
        "closes": seen.closes, "generator_cpu": generator_share,
        "generator_bound": generator_share > 0.8,
    });
    println!("RESULT {result}");
    Ok(())
}

/// One user: publishes its cursor every 1/`moves` s from its socket and reads the room's (a
/// slow one only during the first 100 ms of each second).
async fn user(
    mut conn: WsConn,
    index: usize,
    moves: f64,
    slow: bool,
    phase: Duration,
    seen: Rc<RefCell<Seen>>,
    stop: CancellationToken,
) {
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / moves));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let epoch = Instant::now();
    let mut id = 10u64;
    loop {
        let into_second = epoch.elapsed().as_millis() % 1000;
        let reading = !slow || into_second < 100;
        let pause = Duration::from_millis((1000 - into_second) as u64);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                id += 1;
                let command = format!(
                    r#"{{"id":{id},"op":"publish","channel":"{CHANNEL}","data":{{"user":"u{index}","x":{id},"y":{index},"t":{}}}}}"#,
                    now_us()
                );
                if conn.send_text(command.as_bytes()).await.is_err() {
                    return;
                }
                seen.borrow_mut().published += 1;
            }
            frame = conn.next(), if reading => {
                let Ok(frame) = frame else { return };
                if frame.opcode == OP_CLOSE {
                    seen.borrow_mut().closes += 1;
                    return;
                }
                if frame.opcode != OP_TEXT {
                    continue;
                }
                let payload = conn.payload(&frame);
                if payload == br#"{"type":"ping"}"# {
                    if conn.send_text(br#"{"op":"pong"}"#).await.is_err() {
                        return;
                    }
                    continue;
                }
                if let Some(t) = sent_at(payload) {
                    let age = now_us().saturating_sub(t).max(1);
                    let mut s = seen.borrow_mut();
                    if slow {
                        s.slow_received += 1;
                        let _ = s.staleness.record(age);
                    } else {
                        s.fast_received += 1;
                        let _ = s.latency.record(age);
                    }
                }
            }
            _ = tokio::time::sleep(pause), if !reading => {}
        }
    }
}
