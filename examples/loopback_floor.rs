//! The loopback floor: what this machine charges for the kernel work that sidecast's hot path
//! cannot avoid, measured without sidecast, with the same placement as `bench/run` (the
//! sending thread on core 0, the receiving thread on core 1).
//!
//! ```sh
//! cargo run --release --example loopback_floor -- fanout 1000 100    # S2's shape: 1,000 sockets, 100 rounds/s
//! cargo run --release --example loopback_floor -- fanout 1000 100 --uring
//! cargo run --release --example loopback_floor -- fanout 10000 10    # S3's shape: time to the last of 10k
//! cargo run --release --example loopback_floor -- pingpong 300 100   # one round trip every 100 ms
//! ```
//!
//! `fanout` writes one frame to each of N connected loopback TCP sockets per round, RATE
//! rounds a second, with plain non-blocking `write(2)` calls (or, with `--uring`, one io_uring
//! submission of N `send`s). The receiver, a second process (as the generator is; one process
//! may not hold 20,000 descriptors here), reads them with edge-triggered epoll, as tokio does.
//! It prints the writes per second, core 0's busy time per write (both TCP ends, since loopback
//! processes the receiving end on the sender's core) and, per round, the time from its start
//! until the receiver had the first and the last of its N frames. Nothing else runs: no
//! WebSocket framing, no queue, no runtime. A server cannot write single frames for less.
//!
//! `pingpong` times a 16-byte round trip between two blocking threads on the two cores, every
//! INTERVAL ms: the floor under any publish-to-receive latency, which crosses the cores at
//! least twice (the publisher's call to the server, the server's frame to the subscriber).
//!
//! Core 0's busy time is read from `/proc/stat`, so it counts anything else running there:
//! run it on an otherwise idle machine.
#![allow(unsafe_code)] // sched_setaffinity, epoll and io_uring through libc: a measuring tool

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// One frame to each of N sockets per round, RATE rounds a second.
    Fanout {
        sockets: usize,
        rate: u64,
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Bytes per frame (at least 16: the round and its start time).
        #[arg(long, default_value_t = 64)]
        len: usize,
        /// Submit each round's writes through io_uring instead of one write(2) each.
        #[arg(long)]
        uring: bool,
        /// TCP congestion control for the sending sockets (TCP_CONGESTION), e.g. reno; the
        /// system's default otherwise.
        #[arg(long)]
        congestion: Option<String>,
    },
    /// COUNT round trips of 16 bytes, one every INTERVAL_MS.
    Pingpong { count: usize, interval_ms: u64 },
    /// The receiving end of `fanout`, started by it.
    #[command(hide = true)]
    Receive {
        addr: std::net::SocketAddr,
        sockets: usize,
        len: usize,
        warmup: u64,
    },
}

const SENDER_CORE: usize = 0;
const RECEIVER_CORE: usize = 1;
/// Rounds in flight that the receiver can tell apart (far more than ever lag behind).
const ROUND_SLOTS: usize = 4096;

fn main() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match Args::parse().what {
        What::Fanout {
            sockets,
            rate,
            seconds,
            len,
            uring,
            congestion,
        } => fanout(sockets, rate, seconds, len.max(16), uring, congestion),
        What::Pingpong { count, interval_ms } => pingpong(count, interval_ms),
        What::Receive {
            addr,
            sockets,
            len,
            warmup,
        } => receive(addr, sockets, len, warmup),
    }
}

fn pin(core: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call only reads it.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    assert!(ok, "cannot pin a thread to core {core}");
}

/// (busy, total) jiffies of one core, from /proc/stat.
fn core_jiffies(core: usize) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let prefix = format!("cpu{core} ");
    let line = stat.lines().find(|l| l.starts_with(&prefix)).expect("core");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().expect("jiffies"))
        .collect();
    let total: u64 = v.iter().take(8).sum();
    (total - v[3] - v[4], total)
}

fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
}

fn set_congestion(socket: &TcpStream, algorithm: &str) {
    // SAFETY: setsockopt reads `len` bytes of the name.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            algorithm.as_ptr().cast(),
            algorithm.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_CONGESTION {algorithm}: {}",
        std::io::Error::last_os_error()
    );
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between the two processes.
fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn fanout(n: usize, rate: u64, seconds: u64, len: usize, uring: bool, cc: Option<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let warmup = rate.div_ceil(2); // rounds of the first half second are not counted
    let mut receiver = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["receive", &addr.to_string(), &n.to_string()])
        .args([len.to_string(), warmup.to_string()])
        .spawn()
        .expect("start the receiver");
    let senders: Vec<TcpStream> = (0..n)
        .map(|_| {
            let (sender, _) = listener.accept().expect("accept");
            sender.set_nodelay(true).expect("nodelay");
            sender.set_nonblocking(true).expect("nonblocking");
            if let Some(cc) = &cc {
                set_congestion(&sender, cc);
            }
            sender
        })
        .collect();
    pin(SENDER_CORE);
    let t0 = Instant::now();
    let mut ring = uring.then(|| io_uring::IoUring::new(4096).expect("io_uring"));
    let mut frame = vec![0x82u8; len];
    let (mut writes, mut short) = (0u64, 0u64);
    let mut rounds = 0u64;
    let mut window = None;
    while t0.elapsed() < Duration::from_secs(seconds) {
        let due = t0 + Duration::from_nanos(rounds * 1_000_000_000 / rate.max(1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if rounds == warmup {
            window = Some((Instant::now(), core_jiffies(SENDER_CORE), writes));
        }
        frame[..8].copy_from_slice(&rounds.to_le_bytes());
        frame[8..16].copy_from_slice(&monotonic_nanos().to_le_bytes());
        let (w, s) = match ring.as_mut() {
            None => write_round(&senders, &frame),
            Some(ring) => submit_round(ring, &senders, &frame),
        };
        writes += w;
        short += s;
        rounds += 1;
    }
    let (start, jiffies, writes_before) = window.expect("run longer than half a second");
    let elapsed = start.elapsed().as_secs_f64();
    let busy = busy_share(jiffies, core_jiffies(SENDER_CORE));
    let counted = writes - writes_before;
    let counted_rounds = rounds - warmup;
    // Each round stands for 1/rate of a second: the last one's writes end before its time is
    // up, so a sender that keeps up is credited with its rounds' time, not less.
    let rate_window = elapsed.max(counted_rounds as f64 / rate.max(1) as f64);
    drop(senders); // the receiver reads to the end of every socket, then reports
    let how = if uring { "io_uring" } else { "write(2)" };
    let how = format!(
        "{how}, congestion control {}",
        cc.as_deref().unwrap_or("default")
    );
    println!(
        "fanout {how}: {n} sockets x {rate} rounds/s, {len} B frames, {seconds} s: {counted_rounds} rounds \
         counted, {:.0} writes/s, core 0 busy {:.1}% = {:.2} us per write (both TCP ends), refused writes {short}",
        counted as f64 / rate_window,
        busy * 100.0,
        busy * elapsed * 1e6 / counted.max(1) as f64,
    );
    assert!(
        receiver.wait().expect("receiver").success(),
        "receiver failed"
    );
}

/// One frame to every socket with write(2); (frames written, frames refused).
fn write_round(senders: &[TcpStream], frame: &[u8]) -> (u64, u64) {
    let mut written = 0;
    for mut socket in senders {
        match socket.write(frame) {
            Ok(k) => written += whole(k, frame.len()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    (written, senders.len() as u64 - written)
}

/// 1 for a frame written whole. A part of a frame would leave the receiver reading the rest
/// of the stream at the wrong offsets: the run stops instead (offer fewer rounds).
fn whole(written: usize, len: usize) -> u64 {
    assert_eq!(written, len, "a frame written in part: the socket is full");
    1
}

/// One frame to every socket through io_uring, up to the ring's size per submission.
fn submit_round(ring: &mut io_uring::IoUring, senders: &[TcpStream], frame: &[u8]) -> (u64, u64) {
    let mut written = 0;
    for chunk in senders.chunks(ring.params().sq_entries() as usize) {
        for socket in chunk {
            let send = io_uring::opcode::Send::new(
                io_uring::types::Fd(socket.as_raw_fd()),
                frame.as_ptr(),
                frame.len() as u32,
            )
            .flags(libc::MSG_DONTWAIT)
            .build();
            // SAFETY: `frame` outlives the submission: every entry completes before we return.
            unsafe { ring.submission().push(&send).expect("ring has room") };
        }
        ring.submit_and_wait(chunk.len()).expect("io_uring_enter");
        for completion in ring.completion() {
            match completion.result() {
                k if k >= 0 => written += whole(k as usize, frame.len()),
                e if -e == libc::EAGAIN => {}
                e => panic!("send: {}", std::io::Error::from_raw_os_error(-e)),
            }
        }
    }
    (written, senders.len() as u64 - written)
}

#[derive(Clone, Copy, Default)]
struct Round {
    id: u64,
    arrived: usize,
}

/// Connects `n` sockets to the sender and reads them to their end; reports the time to the
/// first and to the last frame of each complete round from round `warmup` on.
fn receive(addr: std::net::SocketAddr, n: usize, len: usize, warmup: u64) {
    pin(RECEIVER_CORE);
    let receivers: Vec<TcpStream> = (0..n)
        .map(|_| {
            let socket = TcpStream::connect(addr).expect("connect");
            socket.set_nonblocking(true).expect("nonblocking");
            socket
        })
        .collect();
    // SAFETY: plain epoll calls on descriptors this thread owns for its whole life.
    let epoll = unsafe { libc::epoll_create1(0) };
    assert!(epoll >= 0, "epoll_create1");
    for (i, socket) in receivers.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: registers a descriptor that outlives the epoll instance; the event is copied.
        let rc =
            unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, socket.as_raw_fd(), &mut event) };
        assert_eq!(rc, 0, "epoll_ctl");
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut rounds = vec![Round::default(); ROUND_SLOTS];
    let (mut first, mut last) = (Vec::new(), Vec::new());
    let (mut frames, mut lost_rounds) = (0u64, 0u64);
    let receiver_busy = core_jiffies(RECEIVER_CORE);
    let receiving = std::time::Instant::now();
    let (mut open, mut ended) = (n, vec![false; n]);
    while open > 0 {
        // SAFETY: the kernel writes at most 1024 events into a buffer of 1024.
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 1024, 100) };
        for event in &events[..ready.max(0) as usize] {
            let i = event.u64 as usize;
            let mut socket = &receivers[i];
            loop {
                let k = match socket.read(&mut buf) {
                    Ok(0) => {
                        open -= usize::from(!std::mem::replace(&mut ended[i], true));
                        break;
                    }
                    Ok(k) => k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                };
                let now = monotonic_nanos();
                pending[i].extend_from_slice(&buf[..k]);
                let whole = pending[i].len() / len * len;
                for f in pending[i][..whole].chunks_exact(len) {
                    frames += 1;
                    let id = u64::from_le_bytes(f[..8].try_into().expect("8 bytes"));
                    let started = u64::from_le_bytes(f[8..16].try_into().expect("8 bytes"));
                    if id < warmup {
                        continue;
                    }
                    let slot = &mut rounds[id as usize % ROUND_SLOTS];
                    if slot.id != id || slot.arrived == 0 {
                        if slot.arrived != 0 && slot.arrived < n {
                            lost_rounds += 1; // an older round never completed
                        }
                        *slot = Round { id, arrived: 0 };
                        first.push(now.saturating_sub(started));
                    }
                    slot.arrived += 1;
                    if slot.arrived == n {
                        last.push(now.saturating_sub(started));
                    }
                }
                pending[i].drain(..whole);
            }
        }
    }
    let busy = busy_share(receiver_busy, core_jiffies(RECEIVER_CORE));
    // What reading one frame costs the receiving core: the floor of a load generator's own
    // cost per delivery (sidecast-bench reads each subscriber's frames the same way).
    let per_frame_us = busy * receiving.elapsed().as_secs_f64() * 1e6 / frames.max(1) as f64;
    // SAFETY: closes the epoll descriptor this function created, once.
    unsafe { libc::close(epoll) };
    // Rounds that some socket never delivered whole (the sender prints how many it counted).
    lost_rounds += rounds
        .iter()
        .filter(|r| r.arrived != 0 && r.arrived < n)
        .count() as u64;
    println!(
        "receiver: {frames} frames, core 1 busy {:.1}% = {per_frame_us:.2} us per frame read; per round ({} complete, \
         {lost_rounds} incomplete): time to the first frame {}, to the last frame {}",
        busy * 100.0,
        last.len(),
        quantiles(&mut first),
        quantiles(&mut last),
    );
}

fn quantiles(nanos: &mut [u64]) -> String {
    if nanos.is_empty() {
        return "none".into();
    }
    nanos.sort_unstable();
    let q = |p: f64| nanos[((nanos.len() as f64 * p) as usize).min(nanos.len() - 1)] as f64 / 1e3;
    format!(
        "p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        q(0.5),
        q(0.99),
        nanos[nanos.len() - 1] as f64 / 1e3
    )
}

fn pingpong(count: usize, interval_ms: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        pin(SENDER_CORE);
        let (mut socket, _) = listener.accept().expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while let Ok(k @ 1..) = socket.read(&mut buf) {
            socket.write_all(&buf[..k]).expect("echo");
        }
    });
    pin(RECEIVER_CORE);
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let mut rtts = Vec::with_capacity(count);
    let mut buf = [0u8; 16];
    let t0 = Instant::now();
    for i in 0..count {
        let due = t0 + Duration::from_millis(i as u64 * interval_ms);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent = Instant::now();
        socket.write_all(&buf).expect("ping");
        socket.read_exact(&mut buf).expect("pong");
        rtts.push(sent.elapsed().as_nanos() as u64);
    }
    drop(socket);
    echo.join().expect("echo thread");
    println!(
        "pingpong: {count} round trips of 16 B, one every {interval_ms} ms, core 1 <-> core 0: {}",
        quantiles(&mut rtts)
    );
}
