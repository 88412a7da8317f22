//! The soak: a full fleet held for a long time with reconnect churn, steady publications on
//! many channels with history and presence, heartbeats and an event group acknowledging,
//! while the server's memory, the kernel's slab, open files, threads and tasks are sampled.
//!
//! Every client keeps one channel's position (offset and epoch). Each one leaves after a
//! random time (a Close frame or just a dropped socket, alternately), stays away a moment
//! while publications go on, and comes back subscribing `since` its position: the recovery
//! must return exactly what it missed, and the live publications must follow without a
//! gap or a duplicate. At the end the churn and the publications stop, and every client must
//! hold its channel's last offset, presence must count every client once, and the event
//! group must have seen one connect, one subscribe and one disconnect per connection.
//!
//! `--check` turns the counts and the memory bounds into the exit status (CI runs a short
//! soak that way); bench/soak runs the long one and plots the samples.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use sidecast::pb::{self, events_response::Response, EventKind};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep, timeout, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Member, Target};
use crate::probe::{rss_bytes, slab_bytes};
use crate::scenario::Ctx;
use crate::wsclient::{WsConn, OP_CLOSE, OP_TEXT};

pub struct Options {
    pub connections: usize,
    pub seconds: f64,
    /// Reconnects per second, fleet-wide.
    pub churn: f64,
    pub channels: usize,
    /// Publications per second, all channels together.
    pub rate: f64,
    /// Seconds between samples.
    pub sample_every: f64,
    /// Where the samples go as CSV.
    pub csv: Option<PathBuf>,
    pub check: bool,
}

/// How long the end of the run may take to settle (every client caught up, presence exact,
/// every disconnect reported): a safety net, not a pacing device.
const SETTLE: Duration = Duration::from_secs(60);
/// Longest a control call may take before it counts as failed.
const CALL: Duration = Duration::from_secs(10);

/// A control call within `CALL`, its lateness as an error.
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    timeout(CALL, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within 10 s")))
}
/// Connection setups in flight at once (the first ramp and the reconnects).
const SETUP_CONCURRENCY: usize = 256;

/// What the clients saw.
#[derive(Default, Debug)]
struct Tally {
    connects: u64,
    connect_errors: u64,
    subscribes: u64,
    recovered: u64,
    /// Publications received inside recovery replies.
    recovered_publications: u64,
    /// Resubscribes answered `recovered: false` (a documented signal, but not expected here).
    unrecovered: u64,
    received: u64,
    /// Offsets skipped (each one a publication lost without a signal).
    gaps: u64,
    duplicates: u64,
    /// Closes the server sent without being asked, by code.
    server_closes: BTreeMap<u16, u64>,
    /// Connections that ended without a close while the client was reading.
    dropped: u64,
    leaves: u64,
    publications: u64,
    publish_errors: u64,
    presence_queries: u64,
    presence_errors: u64,
    /// Each client's last offset, and whether it is connected now.
    last: Vec<u64>,
    connected: Vec<bool>,
}

/// What the event group's member saw.
#[derive(Default, Debug)]
struct Events {
    events: u64,
    connects: u64,
    subscribes: u64,
    disconnects: u64,
    /// `lost` events, and how many events their ranges name.
    lost: u64,
    lost_named: u64,
    /// Sequence numbers skipped without a `lost` event naming them.
    seq_gaps: u64,
    next_seq: u64,
}

impl Events {
    /// Every event the fleet's connections made is either here or named lost.
    fn accounted(&self, t: &Tally) -> bool {
        self.connects + self.subscribes + self.disconnects + self.lost_named
            >= 2 * t.connects + t.subscribes
    }
}

/// One reading of the server.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at: f64,
    rss: u64,
    slab: u64,
    fds: u64,
    threads: u64,
    tasks: u64,
    connections: u64,
}

pub async fn soak(ctx: &Ctx, opts: Options) -> anyhow::Result<()> {
    let pid = ctx
        .server_pid
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the soak needs --server-pid"))?;
    anyhow::ensure!(
        ctx.metrics.is_some(),
        "the soak needs --metrics (the admin address)"
    );
    let tally = Rc::new(RefCell::new(Tally {
        last: vec![0; opts.connections],
        connected: vec![false; opts.connections],
        ..Tally::default()
    }));
    let events = Rc::new(RefCell::new(Events {
        next_seq: 1,
        ..Events::default()
    }));
    let start = Instant::now();
    let mut csv = match &opts.csv {
        Some(path) => {
            let mut file = std::fs::File::create(path)?;
            writeln!(
                file,
                "seconds,rss_bytes,slab_bytes,open_files,threads,tasks,connections"
            )?;
            Some(file)
        }
        None => None,
    };
    let mut samples = Vec::new();
    let mut record = |sample: Sample, label: &str| -> anyhow::Result<()> {
        println!(
            "soak {label} t={:.0}s rss {:.1} MiB, slab {:.1} MiB, {} files, {} threads, {} tasks, {} connections",
            sample.at,
            sample.rss as f64 / MIB,
            sample.slab as f64 / MIB,
            sample.fds,
            sample.threads,
            sample.tasks,
            sample.connections,
        );
        if let Some(file) = csv.as_mut() {
            writeln!(
                file,
                "{:.1},{},{},{},{},{},{}",
                sample.at,
                sample.rss,
                sample.slab,
                sample.fds,
                sample.threads,
                sample.tasks,
                sample.connections
            )?;
        }
        samples.push(sample);
        Ok(())
    };

    let member_stop = CancellationToken::new();
    join_group(ctx, events.clone(), member_stop.clone()).await?;
    let idle = sample(ctx, &pid, start).await;
    record(idle, "idle")?;

    // The fleet: every client its own task, until `stop`; no more reconnects after `calm`.
    let stop = CancellationToken::new();
    let calm = CancellationToken::new();
    let setups = Rc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mean_hold = opts.connections as f64 / opts.churn.max(0.001);
    let mut fleet = tokio::task::JoinSet::new();
    for i in 0..opts.connections {
        let client = Client {
            index: i,
            target: ctx.target.clone(),
            member: Member {
                user: format!("u{i}"),
                subs: Vec::new(),
                channels: vec![format!("soak:{}", i % opts.channels)],
                small_buffer: false,
            },
            mean_hold,
            tally: tally.clone(),
            setups: setups.clone(),
            stop: stop.clone(),
            calm: calm.clone(),
        };
        fleet.spawn_local(client.run());
    }

    // Publications, presence queries and samples until the end of the run.
    let last_offsets = Rc::new(RefCell::new(vec![0u64; opts.channels]));
    let publishing = CancellationToken::new();
    let publisher = tokio::task::spawn_local(publish(
        ctx.grpc.clone(),
        opts.rate,
        last_offsets.clone(),
        tally.clone(),
        publishing.clone(),
    ));
    let presence = tokio::task::spawn_local(query_presence(
        ctx.grpc.clone(),
        opts.channels,
        tally.clone(),
        publishing.clone(),
    ));
    let end = start + Duration::from_secs_f64(opts.seconds);
    let mut next_sample = start + Duration::from_secs_f64(opts.sample_every);
    while next_sample < end {
        tokio::time::sleep_until(next_sample).await;
        record(sample(ctx, &pid, start).await, "run")?;
        next_sample += Duration::from_secs_f64(opts.sample_every);
    }
    tokio::time::sleep_until(end).await;

    // The end: no more churn or publications; everyone must catch up.
    calm.cancel();
    publishing.cancel();
    publisher.await??;
    presence.await?;
    let last_offsets = last_offsets.borrow().clone();
    let settled = Instant::now() + SETTLE;
    let behind = |t: &Tally| -> (usize, u64) {
        let mut clients = 0;
        let mut missing = 0;
        for (i, last) in t.last.iter().enumerate() {
            let want = last_offsets[i % opts.channels];
            if !t.connected[i] || *last != want {
                clients += 1;
                missing += want.saturating_sub(*last);
            }
        }
        (clients, missing)
    };
    while behind(&tally.borrow()).0 > 0 && Instant::now() < settled {
        sleep(Duration::from_millis(200)).await;
    }
    let (clients_behind, missing) = behind(&tally.borrow());
    let presence_wrong = presence_counts(ctx, &opts, settled).await?;
    let steady = sample(ctx, &pid, start).await;
    record(steady, "steady")?;

    // Everyone leaves: the group must hear every disconnect, the node must let go of all.
    stop.cancel();
    while fleet.join_next().await.is_some() {}
    loop {
        let done = events.borrow().accounted(&tally.borrow());
        let after = sample(ctx, &pid, start).await;
        if (done && after.connections == 0) || Instant::now() >= settled + SETTLE {
            record(after, "after")?;
            break;
        }
        sleep(Duration::from_millis(200)).await;
    }
    member_stop.cancel();
    let after = *samples.last().expect("the sample after");

    let t = tally.borrow();
    let e = events.borrow();
    let slopes = Slopes::of(&samples, opts.seconds);
    let first_half = peak_rss(&samples, 0.0, opts.seconds / 2.0);
    let second_half = peak_rss(&samples, opts.seconds / 2.0, opts.seconds);
    println!(
        "soak: {} connections, {} connects ({} failed), {} recovered ({} publications), {} not recovered, \
         {} publications ({} failed), {} received, {} gaps, {} duplicates, {} clients behind ({} missing), \
         server closes {:?}, {} dropped without a close, presence wrong on {} channels, \
         {} presence queries ({} failed); events {} (connect {}, subscribe {}, disconnect {}, \
         lost {} naming {}, seq gaps {})",
        opts.connections,
        t.connects,
        t.connect_errors,
        t.recovered,
        t.recovered_publications,
        t.unrecovered,
        t.publications,
        t.publish_errors,
        t.received,
        t.gaps,
        t.duplicates,
        clients_behind,
        missing,
        t.server_closes,
        t.dropped,
        presence_wrong,
        t.presence_queries,
        t.presence_errors,
        e.events,
        e.connects,
        e.subscribes,
        e.disconnects,
        e.lost,
        e.lost_named,
        e.seq_gaps,
    );
    println!(
        "soak: slopes over the last 3/4 of the run, per hour: rss {:+.2} MiB, slab {:+.2} MiB, files {:+.1}, tasks {:+.1}; \
         peak rss {:.1} MiB in the first half, {:.1} MiB in the second",
        slopes.rss / MIB,
        slopes.slab / MIB,
        slopes.fds,
        slopes.tasks,
        first_half as f64 / MIB,
        second_half as f64 / MIB,
    );
    let mut result = json!({
        "scenario": "soak", "connections": opts.connections, "seconds": opts.seconds,
        "churn": opts.churn, "channels": opts.channels, "rate": opts.rate,
        "connects": t.connects, "connect_errors": t.connect_errors, "recovered": t.recovered,
        "recovered_publications": t.recovered_publications, "unrecovered": t.unrecovered,
        "publications": t.publications, "publish_errors": t.publish_errors,
        "received": t.received, "gaps": t.gaps, "duplicates": t.duplicates,
        "clients_behind": clients_behind, "missing": missing,
        "server_closes": format!("{:?}", t.server_closes), "leaves": t.leaves,
        "presence_wrong": presence_wrong, "presence_queries": t.presence_queries,
        "presence_errors": t.presence_errors,
        "events": e.events, "event_connects": e.connects, "event_subscribes": e.subscribes,
        "event_disconnects": e.disconnects, "events_lost": e.lost, "event_seq_gaps": e.seq_gaps,
        "rss_slope_mib_per_h": slopes.rss / MIB, "slab_slope_mib_per_h": slopes.slab / MIB,
        "files_slope_per_h": slopes.fds, "tasks_slope_per_h": slopes.tasks,
        "peak_rss_first_half": first_half, "peak_rss_second_half": second_half,
        "idle": [idle.rss, idle.fds, idle.tasks], "steady": [steady.rss, steady.fds, steady.tasks],
        "after": [after.rss, after.fds, after.tasks],
    });
    // Beyond what one json! holds before the macro's recursion limit.
    result["events_lost_named"] = e.lost_named.into();
    result["dropped"] = t.dropped.into();
    println!("RESULT {result}");
    if !opts.check {
        return Ok(());
    }

    let mut failed = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            failed.push(what);
        }
    };
    expect(t.gaps == 0, format!("{} offsets skipped", t.gaps));
    expect(t.duplicates == 0, format!("{} duplicates", t.duplicates));
    expect(
        clients_behind == 0,
        format!("{clients_behind} clients behind at the end ({missing} publications missing)"),
    );
    expect(
        t.unrecovered == 0,
        format!("{} resubscribes not recovered", t.unrecovered),
    );
    expect(
        t.server_closes.is_empty() && t.dropped == 0,
        format!(
            "closes from the server: {:?}, {} dropped without a close",
            t.server_closes, t.dropped
        ),
    );
    expect(
        t.connect_errors == 0 && t.publish_errors == 0 && t.presence_errors == 0,
        format!(
            "errors: {} connects, {} publications, {} presence queries",
            t.connect_errors, t.publish_errors, t.presence_errors
        ),
    );
    expect(t.recovered > 0, "no resubscribe recovered anything".into());
    expect(
        presence_wrong == 0,
        format!("presence wrong on {presence_wrong} channels"),
    );
    expect(
        e.connects == t.connects && e.subscribes == t.subscribes && e.disconnects == t.connects,
        format!(
            "events: connect {} subscribe {} disconnect {} for {} connects and {} subscribes",
            e.connects, e.subscribes, e.disconnects, t.connects, t.subscribes
        ),
    );
    expect(
        e.lost == 0 && e.seq_gaps == 0,
        format!(
            "events lost {} (naming {}), seq gaps {}",
            e.lost, e.lost_named, e.seq_gaps
        ),
    );
    // Memory: the second half of the run holds no more than the first (with room for the
    // allocator's noise); once everyone has left, the node is back to its idle files and
    // tasks.
    expect(
        second_half as f64 <= first_half as f64 * 1.2 + 8.0 * MIB,
        format!(
            "peak rss grew from {:.1} to {:.1} MiB",
            first_half as f64 / MIB,
            second_half as f64 / MIB
        ),
    );
    expect(
        after.connections == 0 && after.fds <= idle.fds + 2 && after.tasks <= idle.tasks + 2,
        format!(
            "after everyone left: {} connections, {} files (idle {}), {} tasks (idle {})",
            after.connections, after.fds, idle.fds, after.tasks, idle.tasks
        ),
    );
    if failed.is_empty() {
        println!("soak: every check passed");
        Ok(())
    } else {
        anyhow::bail!("soak failed: {}", failed.join("; "))
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// One simulated client, for the whole run.
struct Client {
    index: usize,
    target: Target,
    member: Member,
    /// Mean seconds connected between two reconnects.
    mean_hold: f64,
    tally: Rc<RefCell<Tally>>,
    setups: Rc<Semaphore>,
    stop: CancellationToken,
    calm: CancellationToken,
}

/// Why a client's session ended.
enum Ended {
    Stop,
    Leave,
    Lost,
}

impl Client {
    async fn run(self) {
        let mut epoch: Option<String> = None;
        let mut leaves = 0u64;
        while !self.stop.is_cancelled() {
            let conn = {
                let _permit = self.setups.acquire().await.expect("never closed");
                self.open(&mut epoch).await
            };
            let Some(mut conn) = conn else {
                // Counted; try again a little later.
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = sleep(Duration::from_millis(500)) => continue,
                }
            };
            self.tally.borrow_mut().connected[self.index] = true;
            let hold = rand::rng().random_range(0.0..2.0 * self.mean_hold);
            let ended = self.read(&mut conn, Duration::from_secs_f64(hold)).await;
            self.tally.borrow_mut().connected[self.index] = false;
            match ended {
                Ended::Stop | Ended::Leave => {
                    // Half the clients say goodbye, the others just drop the socket.
                    if (self.index + leaves as usize) % 2 == 0 {
                        let _ = conn.send_close(1000).await;
                    }
                    drop(conn);
                    if matches!(ended, Ended::Stop) {
                        return;
                    }
                    leaves += 1;
                    self.tally.borrow_mut().leaves += 1;
                }
                Ended::Lost => {}
            }
            // Away for a moment while publications go on: recovery brings them back.
            let away = rand::rng().random_range(0..300);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = sleep(Duration::from_millis(away)) => {}
            }
        }
    }

    /// Upgrade, connect and subscribe (since the position held, after the first time).
    async fn open(&self, epoch: &mut Option<String>) -> Option<WsConn> {
        let attempt = async {
            let mut conn = self.target.upgrade(self.index, &self.member).await?;
            self.target.authenticate(&mut conn, &self.member).await?;
            self.tally.borrow_mut().connects += 1;
            let channel = &self.member.channels[0];
            let mut command = json!({"id": 2, "op": "subscribe", "channel": channel});
            if let Some(epoch) = epoch.as_ref() {
                let offset = self.tally.borrow().last[self.index];
                command["since"] = json!({"offset": offset, "epoch": epoch});
            }
            conn.send_text(command.to_string().as_bytes()).await?;
            let reply = conn.expect(|p| p.starts_with(br#"{"id":2,"#)).await?;
            Ok::<_, std::io::Error>((conn, reply))
        };
        let (conn, reply) = match timeout(SETTLE, attempt).await {
            Ok(Ok(done)) => done,
            _ => {
                self.tally.borrow_mut().connect_errors += 1;
                return None;
            }
        };
        let Ok(reply) = serde_json::from_slice::<Value>(&reply) else {
            self.tally.borrow_mut().connect_errors += 1;
            return None;
        };
        let result = &reply["result"];
        let (Some(offset), Some(now)) = (result["offset"].as_u64(), result["epoch"].as_str())
        else {
            eprintln!("soak: subscribe refused: {reply}");
            self.tally.borrow_mut().connect_errors += 1;
            return None;
        };
        let mut t = self.tally.borrow_mut();
        t.subscribes += 1;
        if epoch.is_none() {
            t.last[self.index] = offset;
        } else if result["recovered"] == json!(true) {
            t.recovered += 1;
            for publication in result["publications"].as_array().into_iter().flatten() {
                t.recovered_publications += 1;
                t.offset(self.index, publication["offset"].as_u64().unwrap_or(0));
            }
        } else {
            t.unrecovered += 1;
            t.last[self.index] = offset;
        }
        *epoch = Some(now.to_string());
        Some(conn)
    }

    /// Reads publications (and answers pings) until the hold time is up (unless calm), the
    /// run stops or the connection is lost.
    async fn read(&self, conn: &mut WsConn, hold: Duration) -> Ended {
        let leave_at = Instant::now() + hold;
        loop {
            let leave = async {
                if self.calm.is_cancelled() {
                    std::future::pending::<()>().await;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(leave_at) => {}
                    _ = self.calm.cancelled() => std::future::pending::<()>().await,
                }
            };
            // Our own client's read is cancel-safe: bytes are only ever appended to the buffer.
            let frame = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ended::Stop,
                _ = leave => return Ended::Leave,
                frame = conn.next() => frame,
            };
            let Ok(frame) = frame else {
                self.tally.borrow_mut().dropped += 1;
                return Ended::Lost;
            };
            match frame.opcode {
                OP_TEXT => {
                    let payload = conn.payload(&frame);
                    if payload.starts_with(br#"{"type":"pub""#) {
                        let offset = pub_offset(payload).unwrap_or(0);
                        let mut t = self.tally.borrow_mut();
                        t.received += 1;
                        t.offset(self.index, offset);
                    } else if payload == br#"{"type":"ping"}"#
                        && conn.send_text(br#"{"op":"pong"}"#).await.is_err()
                    {
                        self.tally.borrow_mut().dropped += 1;
                        return Ended::Lost;
                    }
                }
                OP_CLOSE => {
                    let p = conn.payload(&frame);
                    let code = p
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    *self
                        .tally
                        .borrow_mut()
                        .server_closes
                        .entry(code)
                        .or_default() += 1;
                    return Ended::Lost;
                }
                _ => {}
            }
        }
    }
}

impl Tally {
    /// A publication at `offset` reached client `i`: the next one, a duplicate, or past a gap.
    fn offset(&mut self, i: usize, offset: u64) {
        let last = self.last[i];
        if offset <= last {
            self.duplicates += 1;
        } else {
            self.gaps += offset - last - 1;
            self.last[i] = offset;
        }
    }
}

/// The `offset` of a `pub` frame (the last field, after the publication's data).
fn pub_offset(frame: &[u8]) -> Option<u64> {
    let at = frame.windows(9).rposition(|w| w == br#""offset":"#)? + 9;
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Publishes `rate` per second, round-robin over the channels, until `stop`; notes each
/// channel's last offset.
async fn publish(
    grpc: String,
    rate: f64,
    last_offsets: Rc<RefCell<Vec<u64>>>,
    tally: Rc<RefCell<Tally>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = pb::control_client::ControlClient::connect(grpc).await?;
    let channels = last_offsets.borrow().len();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let channel = (n % channels as u64) as usize;
        let request = pb::PublishRequest {
            channel: format!("soak:{channel}"),
            data: format!(r#"{{"n":{n}}}"#).into_bytes(),
            idempotency_key: String::new(),
            ..Default::default()
        };
        let answer = within(client.publish(request)).await;
        let mut t = tally.borrow_mut();
        match answer {
            Ok(response) => {
                t.publications += 1;
                let offset = response.into_inner().offset;
                let mut last = last_offsets.borrow_mut();
                last[channel] = last[channel].max(offset);
            }
            Err(status) => {
                t.publish_errors += 1;
                eprintln!("soak: publish failed: {status}");
            }
        }
    }
    Ok(())
}

/// A presence query and a presence-stats query per second on rotating channels, as a
/// backend showing who is online would make, until `stop`.
async fn query_presence(
    grpc: String,
    channels: usize,
    tally: Rc<RefCell<Tally>>,
    stop: CancellationToken,
) {
    let Ok(mut client) = pb::control_client::ControlClient::connect(grpc).await else {
        tally.borrow_mut().presence_errors += 1;
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0usize.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let channel = format!("soak:{}", n % channels);
        let presence = within(client.presence(pb::PresenceRequest {
            channel: channel.clone(),
        }))
        .await;
        let stats = within(client.presence_stats(pb::PresenceStatsRequest { channel })).await;
        let mut t = tally.borrow_mut();
        t.presence_queries += 2;
        t.presence_errors += u64::from(presence.is_err()) + u64::from(stats.is_err());
    }
}

/// Channels whose presence does not count exactly their clients once every client is back,
/// asked until right or `deadline`.
async fn presence_counts(ctx: &Ctx, opts: &Options, deadline: Instant) -> anyhow::Result<usize> {
    let mut client = pb::control_client::ControlClient::connect(ctx.grpc.clone()).await?;
    let expected = |c: usize| {
        (opts.connections / opts.channels + usize::from(c < opts.connections % opts.channels))
            as u32
    };
    let mut wrong: Vec<usize> = (0..opts.channels).collect();
    loop {
        let mut still = Vec::new();
        for c in wrong {
            let stats = within(client.presence_stats(pb::PresenceStatsRequest {
                channel: format!("soak:{c}"),
            }))
            .await?
            .into_inner();
            if stats.num_clients != expected(c) || stats.num_users != expected(c) {
                still.push(c);
            }
        }
        wrong = still;
        if wrong.is_empty() || Instant::now() >= deadline {
            return Ok(wrong.len());
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Joins the group `soak` (connect, subscribe, disconnect) and acknowledges every event
/// (in batches, and at least every 100 ms) until `stop`.
async fn join_group(
    ctx: &Ctx,
    seen: Rc<RefCell<Events>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = pb::control_client::ControlClient::connect(ctx.grpc.clone()).await?;
    let (tx, rx) = mpsc::channel(1024);
    let join = pb::EventsRequest {
        request: Some(pb::events_request::Request::Join(pb::Join {
            group: "soak".into(),
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
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => None,
                m = stream.message() => match m {
                    Ok(Some(m)) => Some(m),
                    _ => return,
                },
            };
            if let Some(Response::Event(event)) = message.and_then(|m| m.response) {
                let mut s = seen.borrow_mut();
                s.events += 1;
                // One member, so events come in order; a `lost` event comes right after
                // the range it names.
                let named = match &event.kind {
                    Some(pb::event::Kind::Lost(lost)) if lost.first_seq == s.next_seq => {
                        lost.last_seq + 1
                    }
                    _ => s.next_seq,
                };
                if event.seq != named {
                    s.seq_gaps += 1;
                }
                s.next_seq = event.seq + 1;
                match event.kind {
                    Some(pb::event::Kind::Connect(_)) => s.connects += 1,
                    Some(pb::event::Kind::Subscribe(_)) => s.subscribes += 1,
                    Some(pb::event::Kind::Disconnect(_)) => s.disconnects += 1,
                    Some(pb::event::Kind::Lost(lost)) => {
                        s.lost += 1;
                        s.lost_named += lost.last_seq + 1 - lost.first_seq;
                    }
                    _ => {}
                }
                pending.push(event.seq);
                if pending.len() < 64 {
                    continue;
                }
            }
            if pending.is_empty() {
                continue;
            }
            let ack = pb::EventsRequest {
                request: Some(pb::events_request::Request::Ack(pb::Ack {
                    seqs: std::mem::take(&mut pending),
                })),
            };
            if tx.send(ack).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Reads the server's memory, the kernel's slab, the server's open files and threads from
/// /proc, and its tasks and connections from /metrics.
async fn sample(ctx: &Ctx, pid: &str, start: Instant) -> Sample {
    let text = crate::writes::scrape(ctx.metrics).await.unwrap_or_default();
    let metric = |name| crate::writes::value(&text, name).unwrap_or(0);
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        .unwrap_or(0);
    Sample {
        at: start.elapsed().as_secs_f64(),
        rss: rss_bytes(pid),
        slab: slab_bytes(),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
        threads,
        tasks: metric("sidecast_tasks"),
        connections: metric("sidecast_connections"),
    }
}

fn peak_rss(samples: &[Sample], from: f64, to: f64) -> u64 {
    samples
        .iter()
        .filter(|s| s.at > from && s.at <= to)
        .map(|s| s.rss)
        .max()
        .unwrap_or(0)
}

/// Least-squares slopes, per hour, over the samples of the last three quarters of the run.
struct Slopes {
    rss: f64,
    slab: f64,
    fds: f64,
    tasks: f64,
}

impl Slopes {
    fn of(samples: &[Sample], seconds: f64) -> Slopes {
        let window: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= seconds / 4.0 && s.at <= seconds)
            .collect();
        let slope = |value: fn(&Sample) -> u64| -> f64 {
            let n = window.len() as f64;
            if n < 2.0 {
                return 0.0;
            }
            let mean_t = window.iter().map(|s| s.at).sum::<f64>() / n;
            let mean_v = window.iter().map(|s| value(s) as f64).sum::<f64>() / n;
            let (mut num, mut den) = (0.0, 0.0);
            for s in &window {
                num += (s.at - mean_t) * (value(s) as f64 - mean_v);
                den += (s.at - mean_t).powi(2);
            }
            if den == 0.0 {
                0.0
            } else {
                num / den * 3600.0
            }
        };
        Slopes {
            rss: slope(|s| s.rss),
            slab: slope(|s| s.slab),
            fds: slope(|s| s.fds),
            tasks: slope(|s| s.tasks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_the_end_of_a_pub() {
        let frame = br#"{"type":"pub","channel":"soak:3","data":{"offset":1},"offset":1234}"#;
        assert_eq!(pub_offset(frame), Some(1234));
        assert_eq!(
            pub_offset(br#"{"type":"pub","channel":"x","data":1}"#),
            None
        );
    }

    #[test]
    fn a_gap_and_a_duplicate_are_counted() {
        let mut t = Tally {
            last: vec![5],
            ..Tally::default()
        };
        t.offset(0, 6);
        t.offset(0, 9);
        t.offset(0, 9);
        assert_eq!((t.last[0], t.gaps, t.duplicates), (9, 2, 1));
    }

    #[test]
    fn slopes_per_hour() {
        let samples: Vec<Sample> = (0..=10)
            .map(|i| Sample {
                at: i as f64 * 60.0,
                rss: 1000 + i * 10,
                ..Sample::default()
            })
            .collect();
        let slopes = Slopes::of(&samples, 600.0);
        assert!((slopes.rss - 600.0).abs() < 1e-6, "{}", slopes.rss);
        assert_eq!(slopes.tasks, 0.0);
    }
}
