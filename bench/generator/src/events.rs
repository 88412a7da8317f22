//! S6 events: connection churn at a fixed rate, without and then with a backend event group,
//! so the cost of the event stream shows as server CPU per connection cycle at equal load.
//!
//! Each cycle is one client: upgrade, connect (its token's `subs` claim makes one
//! server-side subscription), then the socket is dropped. The rate is fixed (not "as fast as
//! possible") so that both windows offer the same load and leave the same number of sockets
//! in TIME_WAIT. With the group, every cycle makes
//! three events (connect, subscribe, disconnect); the member acknowledges in batches, and the
//! window counts only once every event of its cycles has arrived, numbered without a gap.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use serde_json::json;
use sidecast::pb::{self, events_response::Response, EventKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::fleet::Member;
use crate::probe::Snapshot;
use crate::scenario::Ctx;

/// What the member saw.
#[derive(Default, Debug)]
struct Seen {
    events: u64,
    connects: u64,
    disconnects: u64,
    next_seq: u64,
    gaps: u64,
}

pub async fn s6(ctx: &Ctx, rate: f64, secs: f64) -> anyhow::Result<()> {
    for with_group in [false, true] {
        let seen = Rc::new(RefCell::new(Seen {
            next_seq: 1,
            ..Seen::default()
        }));
        // The previous window's sockets are all closed on the server first: a group joined
        // while they close would see disconnects of connections it never saw connect.
        let mut control = pb::control_client::ControlClient::connect(ctx.grpc.clone()).await?;
        while control
            .info(pb::InfoRequest {})
            .await?
            .into_inner()
            .connections
            > 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let member_stop = CancellationToken::new();
        if with_group {
            join(ctx, seen.clone(), member_stop.clone()).await?;
        }
        let before = Snapshot::take(ctx.server_pid.as_deref());
        let (cycles, skipped) = churn(ctx, rate, secs).await;
        // The window ends when the member has every event of the cycles made.
        if with_group {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let done = |s: &Seen| s.connects >= cycles && s.disconnects >= cycles;
            while !done(&seen.borrow()) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let after = Snapshot::take(ctx.server_pid.as_deref());
        member_stop.cancel();
        let (wall, server_cpu, own_cpu) = after.since(&before);
        let seen = seen.borrow();
        let label = if with_group { "group" } else { "no-group" };
        let per_sec = cycles as f64 / wall;
        let cpu_per_k = server_cpu / (cycles as f64 / 1000.0);
        let complete = !with_group || (seen.connects == cycles && seen.disconnects == cycles);
        let generator = own_cpu / wall;
        let verdict = if generator > 0.8 || skipped > 0 {
            "generator-bound"
        } else {
            "ok"
        };
        println!(
            "{} s6 {label} rate={rate}/s: {cycles} connection cycles in {wall:.1} s ({per_sec:.0}/s, {skipped} not offered), \
             {} events ({:.0}/s), server {cpu_per_k:.3} CPU-s per 1k cycles, generator CPU {:.0}%, \
             events complete {complete}, gaps {}: {verdict}",
            ctx.peer,
            seen.events,
            seen.events as f64 / wall,
            generator * 100.0,
            seen.gaps,
        );
        let result = json!({
            "scenario": "s6", "peer": ctx.peer, "window": label, "rate": rate, "skipped": skipped,
            "verdict": verdict,
            "cycles": cycles, "seconds": wall, "cycles_per_sec": per_sec,
            "events": seen.events, "events_per_sec": seen.events as f64 / wall,
            "server_cpu_s_per_1k_cycles": cpu_per_k, "generator_cpu": own_cpu / wall,
            "complete": complete, "gaps": seen.gaps,
        });
        println!("RESULT {result}");
        anyhow::ensure!(complete && seen.gaps == 0, "events lost: {seen:?}");
    }
    Ok(())
}

/// Joins the group `bench` (connect, subscribe, disconnect) and reads until `stop`.
async fn join(ctx: &Ctx, seen: Rc<RefCell<Seen>>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut client = pb::control_client::ControlClient::connect(ctx.grpc.clone()).await?;
    let (tx, rx) = mpsc::channel(1024);
    let join = pb::EventsRequest {
        request: Some(pb::events_request::Request::Join(pb::Join {
            group: "bench".into(),
            kinds: [
                EventKind::Connect,
                EventKind::Subscribe,
                EventKind::Disconnect,
            ]
            .iter()
            .map(|k| *k as i32)
            .collect(),
            rpc_methods: Vec::new(),
            window: 0,
        })),
    };
    tx.send(join).await?;
    let mut stream = client.events(ReceiverStream::new(rx)).await?.into_inner();
    tokio::task::spawn_local(async move {
        let mut pending = Vec::new();
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.message() => m,
            };
            let Ok(Some(message)) = message else { return };
            let Some(Response::Event(event)) = message.response else {
                continue;
            };
            {
                let mut s = seen.borrow_mut();
                s.events += 1;
                if event.seq != s.next_seq {
                    s.gaps += 1;
                }
                s.next_seq = event.seq + 1;
                match event.kind {
                    Some(pb::event::Kind::Connect(_)) => s.connects += 1,
                    Some(pb::event::Kind::Disconnect(_)) => s.disconnects += 1,
                    _ => {}
                }
            }
            pending.push(event.seq);
            // One ack per 64 events, well inside the default window of 256.
            if pending.len() >= 64 {
                let ack = pb::EventsRequest {
                    request: Some(pb::events_request::Request::Ack(pb::Ack {
                        seqs: std::mem::take(&mut pending),
                    })),
                };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Most connection cycles in progress at once; a tick finding this many is not offered.
const MAX_IN_FLIGHT: usize = 256;

/// Starts `rate` connect-and-drop cycles per second for `secs`; returns (cycles completed,
/// ticks skipped because MAX_IN_FLIGHT cycles were still running).
async fn churn(ctx: &Ctx, rate: f64, secs: f64) -> (u64, u64) {
    let cycles = Rc::new(RefCell::new(0u64));
    let mut skipped = 0;
    let mut running = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (rate * secs) as usize;
    for i in 0..total {
        tick.tick().await;
        while running.try_join_next().is_some() {}
        if running.len() >= MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        let (target, cycles) = (ctx.target.clone(), cycles.clone());
        running.spawn_local(async move {
            let member = Member {
                user: format!("c{i}"),
                subs: vec![format!("s6:{}", i % 100)],
                channels: Vec::new(),
                small_buffer: false,
            };
            let Ok(mut conn) = target.upgrade(i, &member).await else {
                return;
            };
            if target.authenticate(&mut conn, &member).await.is_ok() {
                *cycles.borrow_mut() += 1;
            }
        });
    }
    while running.join_next().await.is_some() {}
    let n = *cycles.borrow();
    (n, skipped)
}

/// How much memory a group's full buffer takes: a member joins with `window` and either
/// reads its stream without acknowledging (`stalled` false) or never reads it; one client
/// then publishes `count` publications of `size` bytes (each a publish event for the group)
/// until the buffer overflows. Reports the server's RSS growth against the buffer's
/// `sidecast_events_buffered` and the configured `events_buffer_bytes` (`bound`).
pub async fn event_memory(
    ctx: &Ctx,
    size: usize,
    count: usize,
    window: u32,
    stalled: bool,
    group: bool,
    bound: u64,
) -> anyhow::Result<()> {
    let pid = ctx
        .server_pid
        .clone()
        .ok_or_else(|| anyhow::anyhow!("event-memory needs --server-pid"))?;
    let rss_before = crate::probe::rss_bytes(&pid);
    let received = Rc::new(RefCell::new(0u64));
    // Without a group: what publishing alone leaves in the process, for comparison.
    let member = match group {
        true => Some(join_memory_group(ctx, window, stalled, received.clone()).await?),
        false => None,
    };

    let publisher = Member {
        user: "publisher".into(),
        subs: Vec::new(),
        channels: Vec::new(),
        small_buffer: false,
    };
    let mut conn = ctx.target.upgrade(0, &publisher).await?;
    let token = {
        let now = crate::stats::now_nanos() / 1_000_000_000;
        let claims = json!({"sub": "publisher", "exp": now + 3600, "publish": ["memory:*"]});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(ctx.target.secret.as_bytes()),
        )?
    };
    let connect = json!({"id": 1, "op": "connect", "token": token});
    conn.send_text(connect.to_string().as_bytes()).await?;
    conn.expect(|p| p.starts_with(br#"{"type":"connected""#))
        .await?;
    let data = "x".repeat(size);
    for n in 0..count {
        let id = 10 + n;
        let command = json!({"id": id, "op": "publish", "channel": "memory:x", "data": data});
        conn.send_text(command.to_string().as_bytes()).await?;
        let prefix = format!(r#"{{"id":{id},"#);
        conn.expect(|p| p.starts_with(prefix.as_bytes())).await?;
    }
    // Let the member's stream take what it will, then read the node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = crate::writes::scrape(ctx.metrics).await.unwrap_or_default();
    let metric = |name| crate::writes::value(&text, name).unwrap_or(0);
    let buffered = metric("sidecast_events_buffered");
    let lost = metric("sidecast_events_lost_total");
    let rss_after = crate::probe::rss_bytes(&pid);
    let growth = rss_after.saturating_sub(rss_before);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let received = *received.borrow();
    println!(
        "event-memory size={size} window={window} stalled={stalled}: {count} published, {buffered} buffered, \
         {lost} lost, {received} read by the member; rss {:.1} → {:.1} MiB (+{:.1} MiB, {:.2}× the {:.1} MiB bound)",
        mib(rss_before),
        mib(rss_after),
        mib(growth),
        growth as f64 / bound as f64,
        mib(bound),
    );
    let result = json!({
        "scenario": "event-memory", "size": size, "count": count, "window": window,
        "stalled": stalled, "buffered": buffered, "lost": lost, "received": received,
        "rss_before": rss_before, "rss_after": rss_after, "bound": bound,
        "growth_over_bound": growth as f64 / bound as f64,
    });
    println!("RESULT {result}");
    drop(member);
    Ok(())
}

/// The member of `event_memory`: joined, and reading (counting) unless `stalled`. Dropping
/// what it returns leaves the group.
async fn join_memory_group(
    ctx: &Ctx,
    window: u32,
    stalled: bool,
    received: Rc<RefCell<u64>>,
) -> anyhow::Result<impl Drop> {
    let mut client = pb::control_client::ControlClient::connect(ctx.grpc.clone()).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::EventsRequest {
        request: Some(pb::events_request::Request::Join(pb::Join {
            group: "memory".into(),
            kinds: vec![EventKind::Publish as i32],
            rpc_methods: Vec::new(),
            window,
        })),
    })
    .await?;
    let mut stream = client.events(ReceiverStream::new(rx)).await?.into_inner();
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::task::spawn_local(async move {
        let _tx = tx;
        if stalled {
            stop.cancelled().await;
            return;
        }
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.message() => m,
            };
            let Ok(Some(message)) = message else { return };
            if let Some(Response::Event(_)) = message.response {
                *received.borrow_mut() += 1;
            }
        }
    });
    Ok(guard)
}
