//! The benchmark scenarios (BENCHMARKS.md gives the command for each) and the CI smoke run.
//!
//! Each scenario opens its fleet, runs one or more measurement windows, prints a
//! human-readable line per window and a `RESULT {json}` line for the record.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::fleet::{in_batches, read, Member, Target};
use crate::probe::{cpu_seconds, rss_bytes, slab_bytes, Snapshot};
use crate::publisher::{self, Plan, PlanChannel, Sent, Sink};
use crate::shard::{self as shards, Shards};
use crate::stats::Stats;
use crate::writes;
use crate::wsclient::WsConn;

pub struct Ctx {
    pub target: Target,
    /// Processes holding the subscribers of one-channel scenarios (`--processes`).
    pub processes: usize,
    /// The other processes' shares of the fleet (shard.rs), started by `reading_fleet`.
    pub shards: tokio::sync::Mutex<Shards>,
    pub sink: Sink,
    pub server_pid: Option<String>,
    /// Processes reported on their own: (name, pid).
    pub watch: Vec<(String, String)>,
    /// sidecast's admin address, for frames per write.
    pub metrics: Option<std::net::SocketAddr>,
    pub peer: String,
    /// sidecast's control API address (for the event stream).
    pub grpc: String,
}

/// How many connection setups run at once.
pub const SETUP_CONCURRENCY: usize = 256;

/// What one measurement window saw.
#[derive(Debug, Clone)]
pub struct Window {
    pub label: String,
    pub subscribers: usize,
    pub rate: f64,
    pub seconds: f64,
    pub received: u64,
    pub missing: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub sent: Sent,
    /// Each plan's next sequence number, in plan order (the next window continues from it).
    pub next_seqs: Vec<u64>,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub first_p50_us: u64,
    pub first_p99_us: u64,
    pub last_p50_us: u64,
    pub last_p99_us: u64,
    pub server_cpu_s: f64,
    pub generator_cpu: f64,
    pub closes: Vec<(u16, u64)>,
    /// Frames per socket write in the window (sidecast with --metrics only).
    pub frames_per_write: Option<f64>,
    /// CPU seconds of each watched process (--watch) in the window.
    pub watched: Vec<(String, f64)>,
}

impl Window {
    pub fn deliveries_per_sec(&self) -> f64 {
        self.received as f64 / self.seconds
    }
    pub fn cpu_per_million(&self) -> f64 {
        if self.received == 0 {
            return 0.0;
        }
        self.server_cpu_s / (self.received as f64 / 1e6)
    }
    pub fn generator_bound(&self) -> bool {
        self.generator_cpu > 0.8
    }
    pub fn lossless(&self) -> bool {
        self.missing == 0
            && self.gaps == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.sent.errors == 0
    }

    pub fn print(&self, peer: &str) {
        println!(
            "{peer} {} subs={} rate={}/s: {:.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, \
             last p99 {:.2} ms, missing {} gaps {} dup {} reorder {}, server {:.3} CPU-s/M deliveries, generator CPU {:.0}%{}{}",
            self.label,
            self.subscribers,
            self.rate,
            self.deliveries_per_sec(),
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.p999_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
            self.last_p99_us as f64 / 1000.0,
            self.missing,
            self.gaps,
            self.duplicates,
            self.reordered,
            self.cpu_per_million(),
            self.generator_cpu * 100.0,
            if self.generator_bound() { " (GENERATOR-BOUND: figure does not count)" } else { "" },
            match self.frames_per_write {
                Some(f) => format!(", {f:.3} frames per write"),
                None => String::new(),
            },
        );
        if !self.watched.is_empty() {
            let per_million = |cpu: f64| cpu / (self.received as f64 / 1e6);
            let parts: Vec<String> = self
                .watched
                .iter()
                .map(|(name, cpu)| {
                    format!(
                        "{name} {:.1}% of a core, {:.3} CPU-s/M deliveries, {:.1} CPU-µs per publication",
                        cpu / self.seconds * 100.0,
                        per_million(*cpu),
                        cpu * 1e6 / self.sent.published.max(1) as f64
                    )
                })
                .collect();
            println!("{peer}   by process: {}", parts.join("; "));
        }
        let result = json!({
            "peer": peer, "label": self.label, "subscribers": self.subscribers, "rate": self.rate,
            "seconds": self.seconds, "received": self.received, "deliveries_per_sec": self.deliveries_per_sec(),
            "missing": self.missing, "gaps": self.gaps, "duplicates": self.duplicates, "reordered": self.reordered,
            "published": self.sent.published, "late": self.sent.late, "errors": self.sent.errors,
            "p50_ms": self.p50_us as f64 / 1000.0, "p99_ms": self.p99_us as f64 / 1000.0,
            "p999_ms": self.p999_us as f64 / 1000.0, "max_ms": self.max_us as f64 / 1000.0,
            "last_p50_ms": self.last_p50_us as f64 / 1000.0, "last_p99_ms": self.last_p99_us as f64 / 1000.0,
            "first_p50_ms": self.first_p50_us as f64 / 1000.0, "first_p99_ms": self.first_p99_us as f64 / 1000.0,
            "server_cpu_s_per_million": self.cpu_per_million(), "generator_cpu": self.generator_cpu,
            "generator_bound": self.generator_bound(), "closes": self.closes,
            "frames_per_write": self.frames_per_write,
            "watched_cpu_s": self.watched.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("RESULT {result}");
    }
}

pub(crate) fn members(n: usize, f: impl Fn(usize) -> Member) -> Vec<Member> {
    (0..n).map(f).collect()
}

/// Opens every member's connection; fails on the first refusal.
pub(crate) async fn open_all(ctx: &Ctx, members: &[Member]) -> anyhow::Result<Vec<WsConn>> {
    let target = ctx.target.clone();
    let items: Vec<(usize, Member)> = members.iter().cloned().enumerate().collect();
    let results = in_batches(items, SETUP_CONCURRENCY, move |(i, m)| {
        let target = target.clone();
        async move { target.open(i, &m).await }
    })
    .await;
    results
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("opening connections: {e}"))
}

/// `n` connections of users `{prefix}{i}` subscribed to `channel`, each read by its own task;
/// with `--processes`, this process holds the first share and shard processes the others.
async fn reading_fleet(
    ctx: &Ctx,
    n: usize,
    prefix: &str,
    channel: &str,
) -> anyhow::Result<(Rc<RefCell<Stats>>, CancellationToken)> {
    let shares = shards::split(n, ctx.processes, prefix, channel);
    let (mine, others) = shares.split_first().expect("one share at least");
    // The shards open theirs while this process opens its own.
    let started = Shards::start(&ctx.target, others);
    let ms = members(mine.count, |i| Member {
        user: format!("{prefix}{i}"),
        subs: vec![],
        channels: vec![channel.to_string()],
        small_buffer: false,
    });
    let (conns, started) = tokio::join!(open_all(ctx, &ms), started);
    *ctx.shards.lock().await = started?;
    let stats = Rc::new(RefCell::new(Stats::default()));
    let stop = CancellationToken::new();
    spawn_readers(ctx, conns?, &stats, &stop);
    Ok((stats, stop))
}

fn spawn_readers(
    ctx: &Ctx,
    conns: Vec<WsConn>,
    stats: &Rc<RefCell<Stats>>,
    stop: &CancellationToken,
) {
    for conn in conns {
        tokio::task::spawn_local(read(conn, ctx.target.protocol, stats.clone(), stop.clone()));
    }
}

/// Runs the plans concurrently, waits for their deliveries (bounded), and measures.
async fn window(
    ctx: &Ctx,
    stats: &Rc<RefCell<Stats>>,
    label: &str,
    subscribers: usize,
    rate: f64,
    plans: Vec<Plan>,
) -> Window {
    let planned = plans
        .iter()
        .map(|p| p.duration.as_secs_f64())
        .fold(0.0, f64::max);
    stats.borrow_mut().reset();
    let mut shards = ctx.shards.lock().await;
    shards.reset().await.expect("the shard processes answer");
    let generator = std::iter::once("self".to_string())
        .chain(shards.pids())
        .collect::<Vec<_>>()
        .join(",");
    let writes_before = writes::counters(ctx.metrics).await;
    let before = Snapshot::with_generator(ctx.server_pid.as_deref(), &generator);
    let watched_before: Vec<f64> = ctx.watch.iter().map(|(_, pid)| cpu_seconds(pid)).collect();
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for plan in plans {
        let conn = ctx.sink.connect().await.expect("publish connection");
        tasks.push(tokio::task::spawn_local(publisher::run(
            plan,
            conn,
            stats.clone(),
        )));
    }
    let mut sent = Sent::default();
    let mut next_seqs = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (s, _) = task.await.expect("publisher ran");
        sent.published += s.published;
        sent.errors += s.errors;
        sent.late += s.late;
        next_seqs.extend(s.next_seqs);
    }
    // Let deliveries in flight arrive: until nothing is missing, or nothing arrived for 2 s.
    // The shards are asked less often than this process's own count is read.
    let poll = Duration::from_millis(if shards.is_empty() { 5 } else { 20 });
    let expected = stats.borrow().expected;
    let mut last_count = received(stats, &mut shards).await;
    let mut last_progress = tokio::time::Instant::now();
    while last_count < expected && last_progress.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(poll).await;
        let count = received(stats, &mut shards).await;
        if count != last_count {
            (last_count, last_progress) = (count, tokio::time::Instant::now());
        }
    }
    let after = Snapshot::with_generator(ctx.server_pid.as_deref(), &generator);
    for report in shards.reports().await.expect("the shard processes report") {
        stats
            .borrow_mut()
            .merge(&report)
            .expect("a shard's report reads");
    }
    let watched = ctx
        .watch
        .iter()
        .zip(watched_before)
        .map(|((name, pid), before)| (name.clone(), cpu_seconds(pid) - before))
        .collect();
    let writes_after = writes::counters(ctx.metrics).await;
    let (wall, server_cpu, own_cpu) = after.since(&before);
    // An overloaded server makes publishing and delivery take longer than planned: rates are
    // per second of what it really took (until the last delivery), never of the plan.
    let seconds = (last_progress - started).as_secs_f64().max(planned);
    let s = stats.borrow();
    let mut closes: Vec<(u16, u64)> = s.closes.iter().map(|(k, v)| (*k, *v)).collect();
    closes.sort();
    Window {
        label: label.to_string(),
        subscribers,
        rate,
        seconds,
        received: s.received,
        missing: s.missing(),
        gaps: s.gaps,
        duplicates: s.duplicates,
        reordered: s.reordered,
        sent,
        next_seqs,
        p50_us: s.latency.value_at_quantile(0.5),
        p99_us: s.latency.value_at_quantile(0.99),
        p999_us: s.latency.value_at_quantile(0.999),
        max_us: s.latency.max(),
        first_p50_us: s.to_first.value_at_quantile(0.5),
        first_p99_us: s.to_first.value_at_quantile(0.99),
        last_p50_us: s.to_last.value_at_quantile(0.5),
        last_p99_us: s.to_last.value_at_quantile(0.99),
        server_cpu_s: server_cpu,
        generator_cpu: own_cpu / wall,
        closes,
        frames_per_write: writes::per_write(writes_before, writes_after),
        watched,
    }
}

/// Deliveries counted in this window, by this process and its shards.
async fn received(stats: &Rc<RefCell<Stats>>, shards: &mut Shards) -> u64 {
    let own = stats.borrow().received;
    if shards.is_empty() {
        return own;
    }
    own + shards.received().await.expect("the shard processes count")
}

fn one_channel(
    channel: &str,
    rate: f64,
    secs: f64,
    pad: usize,
    subscribers: usize,
    first_seq: u64,
) -> Plan {
    Plan {
        channels: vec![PlanChannel {
            name: channel.to_string(),
            index: 0,
            first_seq,
        }],
        rate,
        duration: Duration::from_secs_f64(secs),
        pad,
        subscribers: subscribers as u32,
        track_last: true,
        phase: 0.0,
    }
}

/// A few seconds, small N: asserts correctness (no loss, duplicates or reordering), never timings.
pub async fn smoke(ctx: &Ctx, connections: usize, rate: f64, secs: f64) -> anyhow::Result<()> {
    let (stats, stop) = reading_fleet(ctx, connections, "smoke", "smoke").await?;
    let w = window(
        ctx,
        &stats,
        "smoke",
        connections,
        rate,
        vec![one_channel("smoke", rate, secs, 16, connections, 1)],
    )
    .await;
    w.print(&ctx.peer);
    stop.cancel();
    anyhow::ensure!(
        w.sent.published > 0 && w.received == w.sent.published * connections as u64,
        "not every publication arrived"
    );
    anyhow::ensure!(w.lossless(), "loss, duplicates or reordering: {w:?}");
    anyhow::ensure!(
        w.closes.is_empty(),
        "connections were closed: {:?}",
        w.closes
    );
    println!("smoke: 1 passed, 0 failed");
    Ok(())
}

/// S1: idle connections, each subscribed to a personal and a shared channel; memory by stage and idle CPU.
pub async fn s1(ctx: &Ctx, connections: usize, hold: f64) -> anyhow::Result<()> {
    let pid = ctx
        .server_pid
        .clone()
        .ok_or_else(|| anyhow::anyhow!("s1 needs --server-pid"))?;
    let ms = members(connections, |i| Member {
        user: format!("u{i}"),
        subs: vec![],
        channels: vec![format!("user:{i}"), "shared:1".into()],
        small_buffer: false,
    });
    let stage = |name: &str, base: (u64, u64)| {
        let (rss, slab) = (rss_bytes(&pid), slab_bytes());
        let per_rss = (rss as f64 - base.0 as f64) / connections as f64;
        let per_slab = (slab as f64 - base.1 as f64) / connections as f64;
        println!(
            "{} s1 {name}: server RSS {:.1} MiB ({:+.0} B/conn), kernel slab {:+.0} B/conn (both ends of each socket)",
            ctx.peer,
            rss as f64 / 1048576.0,
            per_rss,
            per_slab
        );
        (per_rss, per_slab)
    };
    let base = (rss_bytes(&pid), slab_bytes());
    println!(
        "{} s1 baseline: server RSS {:.1} MiB",
        ctx.peer,
        base.0 as f64 / 1048576.0
    );
    let target = ctx.target.clone();
    let items: Vec<(usize, Member)> = ms.iter().cloned().enumerate().collect();
    let mut conns: Vec<WsConn> = in_batches(items, SETUP_CONCURRENCY, move |(i, m)| {
        let target = target.clone();
        async move { target.upgrade(i, &m).await }
    })
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let upgraded = stage("upgraded (no token yet)", base);
    for (conn, m) in conns.iter_mut().zip(&ms) {
        ctx.target.authenticate(conn, m).await?;
    }
    let authenticated = stage("authenticated", base);
    for (conn, m) in conns.iter_mut().zip(&ms) {
        ctx.target.subscribe(conn, m).await?;
    }
    let subscribed = stage("subscribed to 2 channels", base);
    let stats = Rc::new(RefCell::new(Stats::default()));
    let stop = CancellationToken::new();
    spawn_readers(ctx, conns, &stats, &stop);
    let before = Snapshot::take(Some(&pid));
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let after = Snapshot::take(Some(&pid));
    let (wall, server_cpu, own_cpu) = after.since(&before);
    let held = stage("after holding", base);
    println!(
        "{} s1 idle: {connections} connections held {wall:.0} s: server CPU {:.2}% of a core, generator CPU {:.0}%",
        ctx.peer,
        server_cpu / wall * 100.0,
        own_cpu / wall * 100.0
    );
    let result = json!({
        "peer": ctx.peer, "scenario": "s1", "connections": connections, "hold_s": wall,
        "rss_per_conn": {"upgraded": upgraded.0, "authenticated": authenticated.0, "subscribed": subscribed.0, "held": held.0},
        "slab_per_conn_both_ends": {"upgraded": upgraded.1, "authenticated": authenticated.1, "subscribed": subscribed.1, "held": held.1},
        "idle_server_cpu_pct": server_cpu / wall * 100.0, "generator_cpu": own_cpu / wall,
    });
    println!("RESULT {result}");
    stop.cancel();
    Ok(())
}

/// S2: one channel; raise the rate until loss or p99 > 250 ms.
pub async fn s2(
    ctx: &Ctx,
    subscribers: usize,
    pad: usize,
    rates: &[f64],
    secs: f64,
) -> anyhow::Result<()> {
    let (stats, stop) = reading_fleet(ctx, subscribers, "u", "fan").await?;
    let mut seq = 1;
    let mut best: Option<Window> = None;
    for &rate in rates {
        let plan = one_channel("fan", rate, secs, pad, subscribers, seq);
        let w = window(
            ctx,
            &stats,
            &format!("s2 pad={pad}"),
            subscribers,
            rate,
            vec![plan],
        )
        .await;
        seq = w.next_seqs[0];
        w.print(&ctx.peer);
        let sustained = w.lossless()
            && w.closes.is_empty()
            && w.p99_us <= 250_000
            && w.sent.late * 100 <= w.sent.published;
        if w.generator_bound() {
            println!("{} s2: stopped: generator-bound", ctx.peer);
            break;
        }
        if !w.lossless() || !w.closes.is_empty() {
            println!("{} s2: stopped: loss or closes at {rate}/s", ctx.peer);
            break;
        }
        if sustained {
            best = Some(w);
        } else if w.p99_us > 2_000_000 {
            println!(
                "{} s2: stopped: overloaded at {rate}/s (p99 over 2 s)",
                ctx.peer
            );
            break;
        } else {
            // Past the latency limit: keep climbing, to show where throughput tops out.
            println!(
                "{} s2: not sustained at {rate}/s (p99 over 250 ms or sender late)",
                ctx.peer
            );
        }
    }
    match best {
        Some(w) => println!(
            "{} s2 best sustained: subs={subscribers} pad={pad}: {:.0} deliveries/s at {}/s, {:.3} CPU-s per million deliveries",
            ctx.peer,
            w.deliveries_per_sec(),
            w.rate,
            w.cpu_per_million()
        ),
        None => println!("{} s2: no rate was sustained", ctx.peer),
    }
    stop.cancel();
    Ok(())
}

/// S3: latency percentiles and time to the last subscriber at a fixed rate.
pub async fn s3(
    ctx: &Ctx,
    subscribers: usize,
    rate: f64,
    secs: f64,
    pad: usize,
) -> anyhow::Result<()> {
    let (stats, stop) = reading_fleet(ctx, subscribers, "u", "lat").await?;
    let w = window(
        ctx,
        &stats,
        "s3",
        subscribers,
        rate,
        vec![one_channel("lat", rate, secs, pad, subscribers, 1)],
    )
    .await;
    w.print(&ctx.peer);
    println!(
        "{} s3 subs={subscribers} rate={rate}/s: from the send to the first subscriber p50 {:.3} ms p99 {:.3} ms; from due to the last p50 {:.2} ms p99 {:.2} ms",
        ctx.peer,
        w.first_p50_us as f64 / 1000.0,
        w.first_p99_us as f64 / 1000.0,
        w.last_p50_us as f64 / 1000.0,
        w.last_p99_us as f64 / 1000.0
    );
    stop.cancel();
    Ok(())
}

/// S4: chat shape: personal channel + one room of `room_size`, churn, growing room publish rate.
/// How many publishing tasks (and connections) S4 spreads its rooms over.
const PUBLISHERS: usize = 50;

pub async fn s4(
    ctx: &Ctx,
    connections: usize,
    room_size: usize,
    churn: f64,
    rates: &[f64],
    secs: f64,
) -> anyhow::Result<()> {
    let rooms = connections / room_size;
    let member = move |i: usize| Member {
        user: format!("u{i}"),
        subs: vec![],
        channels: vec![format!("user:{i}"), format!("room:{}", i % rooms)],
        small_buffer: false,
    };
    let ms = members(connections, member);
    let conns = open_all(ctx, &ms).await?;
    let stats = Rc::new(RefCell::new(Stats::default()));
    let stop = CancellationToken::new();
    let mut readers: Vec<CancellationToken> = Vec::with_capacity(connections);
    for conn in conns {
        let token = stop.child_token();
        tokio::task::spawn_local(read(
            conn,
            ctx.target.protocol,
            stats.clone(),
            token.clone(),
        ));
        readers.push(token);
    }
    let readers = Rc::new(RefCell::new(readers));
    // Churn: every 1/churn s, one random connection goes away and a new one takes its place
    // (none when churn is 0).
    let churn_stop = stop.child_token();
    let churned = Rc::new(RefCell::new(0u64));
    if churn > 0.0 {
        let (readers, stats, target, churned, churn_stop, parent) = (
            readers.clone(),
            stats.clone(),
            ctx.target.clone(),
            churned.clone(),
            churn_stop.clone(),
            stop.clone(),
        );
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / churn));
            loop {
                tokio::select! {
                    _ = churn_stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let i = rand::random::<u64>() as usize % connections;
                readers.borrow()[i].cancel();
                match target.open(i, &member(i)).await {
                    Ok(conn) => {
                        let token = parent.child_token();
                        tokio::task::spawn_local(read(
                            conn,
                            target.protocol,
                            stats.clone(),
                            token.clone(),
                        ));
                        readers.borrow_mut()[i] = token;
                        *churned.borrow_mut() += 1;
                    }
                    Err(e) => eprintln!("s4 churn reconnect failed: {e}"),
                }
            }
        });
    }
    let mut seqs = vec![1u64; rooms];
    for &total in rates {
        // A few publishers serve every room in turn (one connection each: with 19,000 sockets
        // open, one publishing connection per room would exceed the descriptor limit).
        let plans = (0..PUBLISHERS)
            .map(|g| Plan {
                channels: (g..rooms)
                    .step_by(PUBLISHERS)
                    .map(|r| PlanChannel {
                        name: format!("room:{r}"),
                        index: r as u32,
                        first_seq: seqs[r],
                    })
                    .collect(),
                rate: total / PUBLISHERS as f64,
                duration: Duration::from_secs_f64(secs),
                pad: 64,
                subscribers: room_size as u32,
                track_last: false,
                phase: g as f64 / PUBLISHERS as f64,
            })
            .collect();
        let w = window(ctx, &stats, "s4", connections, total, plans).await;
        // Plans list their rooms as g, g+P, g+2P...: put the next sequence numbers back by room.
        let mut order = (0..PUBLISHERS).flat_map(|g| (g..rooms).step_by(PUBLISHERS));
        for next in &w.next_seqs {
            seqs[order.next().expect("one entry per room")] = *next;
        }
        w.print(&ctx.peer);
        println!(
            "{} s4: {} reconnects so far ({churn}/s)",
            ctx.peer,
            churned.borrow()
        );
        if w.generator_bound() || w.gaps > 0 || w.p99_us > 250_000 {
            println!("{} s4: stopped at {total} publications/s", ctx.peer);
            break;
        }
    }
    churn_stop.cancel();
    stop.cancel();
    Ok(())
}

/// S5: `slow_pct`% of subscribers stop reading; server memory and the others' latency,
/// compared with the same run without them, made before and again after (the second of two
/// identical runs on one server is often the slower: a single "without" first would credit
/// that to the slow consumers).
pub async fn s5(
    ctx: &Ctx,
    subscribers: usize,
    slow_pct: f64,
    rate: f64,
    secs: f64,
    pad: usize,
) -> anyhow::Result<()> {
    let pid = ctx
        .server_pid
        .clone()
        .ok_or_else(|| anyhow::anyhow!("s5 needs --server-pid"))?;
    let (mut others_p50, mut others_p99) = ([0.0; 3], [0.0; 3]);
    let mut generator_bound = false;
    for (phase, with_slow) in [false, true, false].into_iter().enumerate() {
        let slow = if with_slow {
            ((subscribers as f64) * slow_pct / 100.0).ceil() as usize
        } else {
            0
        };
        let channel = ["s5", "s5slow", "s5again"][phase];
        let ms = members(subscribers, |i| Member {
            user: format!("u{i}"),
            subs: vec![],
            channels: vec![channel.into()],
            small_buffer: i < slow,
        });
        let mut conns = open_all(ctx, &ms).await?;
        let stalled: Vec<WsConn> = conns.drain(..slow).collect();
        let stats = Rc::new(RefCell::new(Stats::default()));
        let stop = CancellationToken::new();
        spawn_readers(ctx, conns, &stats, &stop);
        let base = rss_bytes(&pid);
        let peak = Rc::new(RefCell::new(base));
        let sampler = {
            let (peak, pid, stop) = (peak.clone(), pid.clone(), stop.clone());
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let rss = rss_bytes(&pid);
                    let mut p = peak.borrow_mut();
                    *p = (*p).max(rss);
                }
            })
        };
        let label = match (phase, slow) {
            (0, _) => "s5 without slow consumers",
            (1, 1..) => "s5 with slow consumers",
            (1, 0) => "s5 without slow consumers, middle",
            _ => "s5 without slow consumers, again",
        };
        let plan = one_channel(channel, rate, secs, pad, subscribers - slow, 1);
        let w = window(ctx, &stats, label, subscribers, rate, vec![plan]).await;
        w.print(&ctx.peer);
        let growth = *peak.borrow() as f64 - base as f64;
        generator_bound |= w.generator_bound();
        others_p50[phase] = w.p50_us as f64 / 1000.0;
        others_p99[phase] = w.p99_us as f64 / 1000.0;
        println!(
            "{} {label}: {slow} stalled of {subscribers}; server RSS peak {:+.1} MiB over the start of the run; others p99 {:.2} ms",
            ctx.peer,
            growth / 1048576.0,
            w.p99_us as f64 / 1000.0
        );
        println!(
            "RESULT {}",
            json!({"peer": ctx.peer, "scenario": "s5", "phase": phase, "phase_label": label, "slow": slow, "rss_peak_growth_bytes": growth, "others_p99_ms": w.p99_us as f64 / 1000.0})
        );
        stop.cancel();
        let _ = sampler.await;
        drop(stalled);
    }
    let bound = if generator_bound {
        " (a phase was GENERATOR-BOUND: does not count)"
    } else {
        ""
    };
    for (what, ms) in [("p50", others_p50), ("p99", others_p99)] {
        let without = (ms[0] + ms[2]) / 2.0;
        println!(
            "{} s5: others {what} {:.2} ms with slow consumers, {:.2} ms without (the mean of {:.2} before and {:.2} after): {:+.0}%{bound}",
            ctx.peer,
            ms[1],
            without,
            ms[0],
            ms[2],
            (ms[1] / without - 1.0) * 100.0
        );
    }
    Ok(())
}
