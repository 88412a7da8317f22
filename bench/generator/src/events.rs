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
