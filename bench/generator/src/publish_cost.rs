//! Publish cost: what the server spends on a publication nobody receives, one unary Publish
//! each or over PublishStream (`--publish-stream`), at rising rates. With no subscriber there
//! is no fan-out, so the figure is the control API's and the engine's own share of S4's
//! cost per publication.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::probe::Snapshot;
use crate::publisher::{self, Plan, PlanChannel};
use crate::scenario::Ctx;
use crate::stats::Stats;
use crate::writes;

pub async fn publish_cost(
    ctx: &Ctx,
    publishers: usize,
    channels: usize,
    rates: &[f64],
    secs: f64,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        publishers > 0 && channels >= publishers,
        "need channels >= publishers > 0"
    );
    let stats = Rc::new(RefCell::new(Stats::default()));
    for &total in rates {
        let plans: Vec<Plan> = (0..publishers)
            .map(|g| Plan {
                channels: (g..channels)
                    .step_by(publishers)
                    .map(|c| PlanChannel {
                        name: format!("cost:{c}"),
                        index: c as u32,
                        first_seq: 1,
                    })
                    .collect(),
                rate: total / publishers as f64,
                duration: Duration::from_secs_f64(secs),
                pad: 64,
                subscribers: 0,
                track_last: false,
                phase: g as f64 / publishers as f64,
            })
            .collect();
        let counted_before = publications(ctx).await;
        let before = Snapshot::take(ctx.server_pid.as_deref());
        let mut tasks = Vec::new();
        for plan in plans {
            let conn = ctx.sink.connect().await?;
            tasks.push(tokio::task::spawn_local(publisher::run(
                plan,
                conn,
                stats.clone(),
            )));
        }
        let (mut published, mut errors, mut late) = (0u64, 0u64, 0u64);
        for task in tasks {
            let (sent, conn) = task.await?;
            // Dropping the connection half-closes a stream (its last answers are still owed);
            // a batch publisher first sends what it still holds.
            conn.finish().await;
            published += sent.published;
            errors += sent.errors;
            late += sent.late;
        }
        // A stream's publications are counted by the node as it takes them: wait (at most
        // 5 s) until it has counted all of them, so the CPU reading covers the same work.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut counted = publications(ctx)
            .await
            .zip(counted_before)
            .map(|(a, b)| a - b);
        while counted.is_some_and(|c| c < published) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            counted = publications(ctx)
                .await
                .zip(counted_before)
                .map(|(a, b)| a - b);
        }
        let after = Snapshot::take(ctx.server_pid.as_deref());
        let (wall, server_cpu, own_cpu) = after.since(&before);
        let achieved = published as f64 / wall;
        let per_call_us = server_cpu * 1e6 / published.max(1) as f64;
        let generator_bound = own_cpu / wall > 0.9;
        println!(
            "{} publish-cost rate={total}/s: {published} published ({achieved:.0}/s, {errors} errors, {late} late), node counted {}, server {per_call_us:.1} CPU-µs per publication ({:.0}% of a core), generator CPU {:.0}%{}",
            ctx.peer,
            counted.map_or("?".to_string(), |c| c.to_string()),
            server_cpu / wall * 100.0,
            own_cpu / wall * 100.0,
            if generator_bound { " (GENERATOR-BOUND: figure does not count)" } else { "" },
        );
        println!(
            "RESULT {}",
            serde_json::json!({
                "label": "publish-cost",
                "peer": ctx.peer,
                "rate": total,
                "published": published,
                "errors": errors,
                "late": late,
                "counted": counted,
                "seconds": wall,
                "server_cpu_us_per_publication": per_call_us,
                "server_core_share": server_cpu / wall,
                "generator_cpu": own_cpu / wall,
                "generator_bound": generator_bound,
            })
        );
        if errors > 0 || generator_bound || late * 100 > published {
            println!(
                "{} publish-cost: stopped at {total} publications/s",
                ctx.peer
            );
            break;
        }
    }
    Ok(())
}

/// `sidecast_publications_total` so far, or None when the server does not expose it.
async fn publications(ctx: &Ctx) -> Option<u64> {
    writes::value(
        &writes::scrape(ctx.metrics).await?,
        "sidecast_publications_total",
    )
}
