//! Event groups across the cluster (`events_scope = "cluster"`): a backend on any node
//! receives every node's events for its group, once per group.
//!
//! - **Writing.** Every node appends its connections' events (queued by `events::relay`)
//!   to the stream of each registered group that wants them, with `events.lua`: the group's
//!   counter numbers them, so `seq` is the cluster's, and the stream is the group's bounded
//!   buffer (`events_buffer` events; `lost` ranges as on one node). One writer per node,
//!   in order, so each client's events keep their order.
//! - **Groups.** Each node registers the groups with members on it (the registry hash, and
//!   an `alive` key refreshed every second that expires `events_group_ttl` after the last
//!   member anywhere left; then `events.lua` forgets the group and its stream).
//! - **Delivering.** One node at a time delivers a group's stream: the one holding its
//!   lease (`lease.lua`, renewed every second, expiring after `redis_presence_ttl`), among
//!   the nodes where members are joined. It reads the stream from its start (what is there
//!   is unacknowledged) into its local group, which hands events to members by the usual
//!   rules; their acknowledgements delete the entries. A node that stops holding the lease
//!   (its members left, it died, it lost Redis) leaves the stream as it is, so the next
//!   holder hands out again what was unacknowledged, marked redelivered when an earlier
//!   holder had read it (the `cursor` key).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::event_entry;
use super::link::{Backoff, Conn};
use super::{BrokerError, Inner};
use crate::events::{Acked, Body, RelayEnds};

/// Most events one script appends, and one read takes.
const BATCH: usize = 256;
/// How often groups are registered and leases renewed.
const TEND_INTERVAL: Duration = Duration::from_secs(1);
/// How long one read of a group's stream waits for new entries.
const BLOCK: Duration = Duration::from_secs(1);
/// How often a full local group is checked for room.
const FULL_WAIT: Duration = Duration::from_millis(50);

/// A group whose stream this node delivers.
struct Reader {
    stop: CancellationToken,
    /// When its lease was last renewed.
    renewed: Instant,
}

impl Inner {
    /// Starts the writer, the acknowledger and the groups' tending.
    pub(super) fn start_events(self: &Arc<Self>, ends: RelayEnds, stop: &CancellationToken) {
        let RelayEnds {
            outgoing,
            acks,
            changed,
        } = ends;
        let (inner, token) = (self.clone(), stop.clone());
        tokio::spawn(async move { inner.write_events(outgoing, token).await });
        let (inner, token) = (self.clone(), stop.clone());
        tokio::spawn(async move { inner.forget_acked(acks, token).await });
        let (inner, token) = (self.clone(), stop.clone());
        tokio::spawn(async move { inner.tend_groups(changed, token).await });
    }

    /// Appends this node's events, in order. A batch Redis did not answer is sent again as it
    /// was (the same events and drop counts, under the same number), and the script skips a
    /// number it already applied: a call that timed out but ran is not applied twice.
    async fn write_events(&self, mut outgoing: mpsc::Receiver<Arc<Body>>, stop: CancellationToken) {
        let events = self.hub.events();
        let mut batch = Vec::with_capacity(BATCH);
        let mut dropped = [0; 5];
        let mut id = 0u64;
        let mut backoff = Backoff::new();
        loop {
            if batch.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = outgoing.recv_many(&mut batch, BATCH) => if n == 0 { return },
                }
                dropped = events.relay_take_dropped();
                id += 1;
            }
            match self.append_events(id, &batch, dropped).await {
                Ok(()) => {
                    events.relay_appended(batch.len());
                    batch.clear();
                    backoff.reset();
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "events not written to Redis; retrying");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                }
            }
        }
    }

    async fn append_events(
        &self,
        id: u64,
        batch: &[Arc<Body>],
        dropped: [u64; 5],
    ) -> Result<(), BrokerError> {
        let mut invocation = self.scripts.events.prepare_invoke();
        invocation
            .key(self.keys.event_groups())
            .arg("append")
            .arg(self.keys.shared())
            .arg(self.config.events_buffer)
            .arg(self.now_ms())
            .arg(&*self.node)
            .arg(id);
        for count in dropped {
            invocation.arg(count);
        }
        for body in batch {
            let fields = event_entry::encode(body);
            invocation
                .arg(body.what.kind().map_or(0, |k| k.bit()))
                .arg(fields.len());
            for (name, value) in fields {
                invocation.arg(name).arg(value);
            }
        }
        self.links[0]
            .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Deletes acknowledged events from their streams (a `lost` entry follows when that made
    /// room for it); retried until Redis takes them.
    async fn forget_acked(
        &self,
        mut acks: mpsc::UnboundedReceiver<Acked>,
        stop: CancellationToken,
    ) {
        let mut pending: HashMap<String, Vec<u64>> = HashMap::new();
        let mut backoff = Backoff::new();
        loop {
            if pending.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    acked = acks.recv() => match acked {
                        Some(a) => pending.entry(a.group).or_default().extend(a.seqs),
                        None => return,
                    },
                }
            }
            while let Ok(a) = acks.try_recv() {
                pending.entry(a.group).or_default().extend(a.seqs);
            }
            let mut failed = false;
            for (group, seqs) in std::mem::take(&mut pending) {
                if failed {
                    pending.insert(group, seqs);
                    continue;
                }
                if let Err(e) = self.ack_events(&group, &seqs).await {
                    tracing::warn!(error = %e, %group, "acknowledgements not written to Redis; retrying");
                    failed = true;
                    pending.insert(group, seqs);
                }
            }
            if failed {
                if !backoff.wait(&stop).await {
                    return;
                }
            } else {
                backoff.reset();
            }
        }
    }

    async fn ack_events(&self, group: &str, seqs: &[u64]) -> Result<(), BrokerError> {
        for chunk in seqs.chunks(BATCH) {
            let mut invocation = self.scripts.events.prepare_invoke();
            invocation
                .key(self.keys.event_groups())
                .arg("ack")
                .arg(self.keys.shared())
                .arg(self.config.events_buffer)
                .arg(self.now_ms())
                .arg(group)
                .arg(chunk);
            self.links[0]
                .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await })
                .await?;
        }
        Ok(())
    }

    /// Every second (and when local members come or go): registers the groups joined here
    /// and holds their leases, delivering the streams of those it holds.
    async fn tend_groups(self: Arc<Self>, changed: Arc<Notify>, stop: CancellationToken) {
        let mut readers: HashMap<String, Reader> = HashMap::new();
        let mut tick = tokio::time::interval(TEND_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                _ = changed.notified() => {}
            }
            if let Err(e) = self.tend(&mut readers, &stop).await {
                tracing::debug!(error = %e, "event groups not tended");
            }
            // Unrenewed for half its time, the lease may soon be another node's: stop first.
            let limit = self.config.redis_presence_ttl / 2;
            readers.retain(|group, reader| {
                let keep = reader.renewed.elapsed() < limit;
                if !keep {
                    tracing::warn!(%group, "event group lease not renewed: another node may deliver it");
                    self.stop_reading(group, reader);
                }
                keep
            });
        }
        for (group, reader) in readers.drain() {
            self.stop_reading(&group, &reader);
            let _ = self.lease(&group, "release").await;
        }
    }

    async fn tend(
        self: &Arc<Self>,
        readers: &mut HashMap<String, Reader>,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let events = self.hub.events();
        let joined: Vec<(String, u32)> = events
            .relay_groups()
            .into_iter()
            .filter(|g| g.has_members)
            .map(|g| (g.name, g.kinds))
            .collect();
        if !joined.is_empty() {
            let registry = self.keys.event_groups();
            let ttl = self.config.events_group_ttl.as_millis() as u64;
            let alive: Vec<(String, String, u32)> = joined
                .iter()
                .map(|(name, kinds)| (name.clone(), self.keys.event_group(name, "alive"), *kinds))
                .collect();
            self.links[0]
                .call(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for (name, key, kinds) in &alive {
                        pipe.hset(&registry, name, kinds).ignore();
                        pipe.cmd("SET").arg(key).arg(1).arg("PX").arg(ttl).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                })
                .await?;
        }

        for (group, _) in &joined {
            let held = self.lease(group, "hold").await?;
            match (held, readers.get_mut(group)) {
                (0, Some(_)) => {
                    let reader = readers.remove(group).expect("present");
                    tracing::warn!(%group, "another node holds the event group's lease now");
                    self.stop_reading(group, &reader);
                }
                (0, None) => {}
                (_, Some(reader)) => reader.renewed = Instant::now(),
                (_, None) => {
                    tracing::info!(%group, "this node delivers the event group's stream");
                    let token = stop.child_token();
                    let (inner, name, reading) = (self.clone(), group.clone(), token.clone());
                    tokio::spawn(async move { inner.read_group(name, reading).await });
                    readers.insert(
                        group.clone(),
                        Reader {
                            stop: token,
                            renewed: Instant::now(),
                        },
                    );
                }
            }
        }
        let left: Vec<String> = readers
            .keys()
            .filter(|g| !joined.iter().any(|(name, _)| name == *g))
            .cloned()
            .collect();
        for group in left {
            let reader = readers.remove(&group).expect("present");
            self.stop_reading(&group, &reader);
            self.lease(&group, "release").await?;
        }
        Ok(())
    }

    fn stop_reading(&self, group: &str, reader: &Reader) {
        reader.stop.cancel();
        self.hub.events().relay_release(group);
    }

    /// Runs `lease.lua`: 2 taken, 1 renewed, 0 another node's (or released).
    async fn lease(&self, group: &str, op: &str) -> Result<i64, BrokerError> {
        let mut invocation = self.scripts.lease.prepare_invoke();
        invocation
            .key(self.keys.event_group(group, "lease"))
            .arg(op)
            .arg(&*self.node)
            .arg(self.config.redis_presence_ttl.as_millis() as u64);
        self.links[0]
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }

    /// Delivers a group's stream to its members here, from its first entry, until `stop`.
    /// Blocking reads use a connection of their own, whose every reply has a deadline.
    async fn read_group(&self, group: String, stop: CancellationToken) {
        let events = self.hub.events();
        let mut conn: Option<Conn> = None;
        let mut cursor: Option<u64> = None;
        let mut last = 0;
        let mut backoff = Backoff::new();
        loop {
            let Some(room) = events.relay_room(&group) else {
                return;
            };
            if room == 0 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(FULL_WAIT) => continue,
                }
            }
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                read = self.read_step(&mut conn, &group, &mut cursor, last, room) => read,
            };
            match read {
                Ok(None) => {
                    tracing::warn!(%group, "the event group's numbering restarted (Redis lost its data): delivering it anew");
                    events.relay_release(&group);
                    (last, cursor) = (0, None);
                }
                Ok(Some((entries, top))) => {
                    backoff.reset();
                    last = last.max(top);
                    if entries.is_empty() {
                        continue;
                    }
                    if stop.is_cancelled() || !events.relay_deliver(&group, entries) {
                        return;
                    }
                }
                Err(e) => {
                    conn = None;
                    tracing::warn!(%group, error = %e, "event group stream not read; retrying");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// One read of up to `room` entries after `last`, and the highest id read; the cursor
    /// moves past them first, so that a later holder marks them redelivered. None when Redis
    /// lost the group (its cursor is gone), whose numbering then starts again from 1.
    async fn read_step(
        &self,
        conn: &mut Option<Conn>,
        group: &str,
        cursor: &mut Option<u64>,
        last: u64,
        room: usize,
    ) -> redis::RedisResult<Option<(Vec<(u64, Arc<Body>, bool)>, u64)>> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(
                self.links[0]
                    .connect(self.config.redis_timeout + BLOCK)
                    .await?,
            ),
        };
        let cursor_key = self.keys.event_group(group, "cursor");
        let stored = c.get::<_, Option<u64>>(&cursor_key).await?;
        let cursor = match cursor {
            // The cursor outlives every entry read: without it, Redis lost the group.
            Some(n) if *n > 0 && stored.is_none() => return Ok(None),
            Some(n) => n,
            None => cursor.insert(stored.unwrap_or(0)),
        };
        let stream = self.keys.event_group(group, "stream");
        let options = StreamReadOptions::default()
            .count(room.min(BATCH))
            .block(BLOCK.as_millis() as usize);
        let reply: Option<StreamReadReply> = c
            .xread_options(&[&stream], &[format!("{last}-0")], &options)
            .await?;
        let mut entries = Vec::new();
        let mut strange = Vec::new();
        let mut top = 0;
        for id in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            let seq: Option<u64> = id.id.split_once('-').and_then(|(s, _)| s.parse().ok());
            top = top.max(seq.unwrap_or(0));
            match event_entry::decode(&id) {
                Some((seq, body)) => entries.push((seq, Arc::new(body), seq <= *cursor)),
                None => {
                    tracing::warn!(%group, id = %id.id, "an entry of the event stream is not an event; deleted");
                    strange.extend(seq);
                }
            }
        }
        if !strange.is_empty() {
            let _ = self.ack_events(group, &strange).await;
        }
        if top > *cursor {
            let () = c.set(&cursor_key, top).await?;
            *cursor = top;
        }
        Ok(Some((entries, top)))
    }
}
