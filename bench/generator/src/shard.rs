//! More connections than one process may hold (~20,000 files here): with `--processes P`,
//! the fleet of a one-channel scenario is split over this process and P-1 shard processes
//! (this same binary, subcommand `shard`). A shard opens its share of the connections, reads
//! them like the main process does, and answers one line per command on its stdin:
//! `reset` (a new window), `count` (deliveries so far) and `report` (the window's figures,
//! merged by the main process into its own: `Stats::merge`). The main process alone
//! publishes and knows what each publication should reach.

use std::cell::RefCell;
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use crate::fleet::Target;
use crate::stats::Stats;

/// Opening a share of 20,000 connections takes seconds; this only bounds a broken run.
const PATIENCE: Duration = Duration::from_secs(300);

/// Which connections a shard holds: users `{prefix}{first + i}`, i < count, subscribed to
/// `channel`; connection index `first + i` (so addresses and sources spread as in one process).
#[derive(Debug, Clone)]
pub struct Share {
    pub first: usize,
    pub count: usize,
    pub prefix: String,
    pub channel: String,
}

/// Splits `n` connections over `processes`: the main process's share first.
pub fn split(n: usize, processes: usize, prefix: &str, channel: &str) -> Vec<Share> {
    let processes = processes.max(1);
    let mut first = 0;
    (0..processes)
        .map(|p| {
            let count = n / processes + usize::from(p < n % processes);
            let share = Share {
                first,
                count,
                prefix: prefix.to_string(),
                channel: channel.to_string(),
            };
            first += count;
            share
        })
        .collect()
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Proc {
    async fn ask(&mut self, command: &str) -> anyhow::Result<String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        self.answer().await
    }

    async fn answer(&mut self) -> anyhow::Result<String> {
        match tokio::time::timeout(PATIENCE, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => anyhow::bail!("a shard process exited"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => anyhow::bail!("a shard process did not answer within {PATIENCE:?}"),
        }
    }
}

/// The shard processes of this run; empty with one process.
#[derive(Default)]
pub struct Shards {
    procs: Vec<Proc>,
}

impl Shards {
    /// Starts one process per share, each opening its connections; returns once all have.
    pub async fn start(target: &Target, shares: &[Share]) -> anyhow::Result<Shards> {
        let exe = std::env::current_exe()?;
        let ws: Vec<String> = target.ws.iter().map(|a| a.to_string()).collect();
        let mut procs = Vec::new();
        for share in shares {
            let mut child = Command::new(&exe)
                .args(["--ws", &ws.join(","), "--path", &target.path])
                .args(["--secret", &target.secret, "--protocol"])
                .arg(target.protocol.name())
                .arg("--sources")
                .arg(target.sources.to_string())
                .args(["shard", "--first", &share.first.to_string()])
                .args([
                    "--count",
                    &share.count.to_string(),
                    "--prefix",
                    &share.prefix,
                ])
                .args(["--channel", &share.channel])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().expect("piped");
            let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            procs.push(Proc {
                child,
                stdin,
                lines,
            });
        }
        for proc in &mut procs {
            let ready = proc.answer().await?;
            anyhow::ensure!(ready == "ready", "a shard failed to open: {ready}");
        }
        Ok(Shards { procs })
    }

    /// The shards' pids, for their CPU time (comma-separated, as `probe::cpu_seconds` reads).
    pub fn pids(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter_map(|p| p.child.id())
            .map(|id| id.to_string())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// A new window in every shard.
    pub async fn reset(&mut self) -> anyhow::Result<()> {
        for proc in &mut self.procs {
            proc.ask("reset").await?;
        }
        Ok(())
    }

    /// Deliveries the shards have counted in this window.
    pub async fn received(&mut self) -> anyhow::Result<u64> {
        let mut total = 0;
        for proc in &mut self.procs {
            total += proc.ask("count").await?.parse::<u64>()?;
        }
        Ok(total)
    }

    /// Every shard's figures for this window (`Stats::merge` adds them up).
    pub async fn reports(&mut self) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut reports = Vec::new();
        for proc in &mut self.procs {
            reports.push(serde_json::from_str(&proc.ask("report").await?)?);
        }
        Ok(reports)
    }
}

/// The shard process: opens its share, says `ready`, then answers the main process until
/// its stdin closes.
pub async fn serve(target: &Target, share: Share) -> anyhow::Result<()> {
    let member = |i: usize| crate::fleet::Member {
        user: format!("{}{i}", share.prefix),
        subs: vec![],
        channels: vec![share.channel.clone()],
        small_buffer: false,
    };
    let stats = Rc::new(RefCell::new(Stats::for_shard()));
    let stop = CancellationToken::new();
    let items: Vec<usize> = (share.first..share.first + share.count).collect();
    let opened = crate::fleet::in_batches(items, crate::scenario::SETUP_CONCURRENCY, |i| {
        let target = target.clone();
        let member = member(i);
        async move { target.open(i, &member).await }
    })
    .await;
    match opened.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(conns) => {
            for conn in conns {
                tokio::task::spawn_local(crate::fleet::read(
                    conn,
                    target.protocol,
                    stats.clone(),
                    stop.clone(),
                ));
            }
            println!("ready");
        }
        Err(e) => {
            println!("opening connections: {e}");
            return Ok(());
        }
    }
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(command) = commands.next_line().await? {
        let answer = match command.as_str() {
            "reset" => {
                stats.borrow_mut().reset();
                "ok".to_string()
            }
            "count" => stats.borrow().received.to_string(),
            "report" => stats.borrow().report().to_string(),
            other => format!("unknown command {other:?}"),
        };
        println!("{answer}");
    }
    stop.cancel();
    Ok(())
}
