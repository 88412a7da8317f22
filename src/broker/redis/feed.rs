//! The pub/sub connections: each carries the topics of some channels and its own canary.
//! A supervisor task per feed connects (with backoff), resubscribes every topic of the feed,
//! then tells the subscribers here to resubscribe (what was published while the connection
//! was down is only in the streams), reads, and pings within `redis_timeout` so that a
//! half-open connection is replaced instead of waited on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::envelope::{self, Envelope};
use super::link::{Backoff, PING_INTERVAL};
use super::table::{Hold, Step};
use super::{BrokerError, Inner, UNUSED_SWEEP};
use crate::outbox::Flush;
use crate::wire::message::{Membership, UnsubReason};
use crate::wire::{ServerMessage, TraceParent};

/// Most messages handed to the hub before one flush.
const BATCH: usize = 64;

pub struct Feed {
    pub shard: usize,
    sink: Mutex<Option<PubSubSink>>,
    /// Bumped at each connection; 0 before the first.
    generation: AtomicU64,
    /// Orders this feed's SUBSCRIBE and UNSUBSCRIBE commands.
    pub commands: tokio::sync::Mutex<()>,
    canary: Mutex<Option<Instant>>,
}

impl Feed {
    pub fn new(shard: usize) -> Feed {
        Feed {
            shard,
            sink: Mutex::new(None),
            generation: AtomicU64::new(0),
            commands: tokio::sync::Mutex::new(()),
            canary: Mutex::new(None),
        }
    }

    /// The current connection's generation, or None while it is down.
    pub fn generation(&self) -> Option<u64> {
        let sink = self.sink.lock().expect("feed lock");
        sink.as_ref()
            .map(|_| self.generation.load(Ordering::Acquire))
    }

    /// Whether the canary came back within `fresh`.
    pub fn carries(&self, fresh: Duration) -> bool {
        self.generation().is_some()
            && self
                .canary
                .lock()
                .expect("feed lock")
                .is_some_and(|seen| seen.elapsed() < fresh)
    }

    fn sink(&self) -> Option<PubSubSink> {
        self.sink.lock().expect("feed lock").clone()
    }
}

impl Inner {
    /// Makes sure the channel's topic is subscribed on its feed's current connection;
    /// returns that connection's generation.
    pub(super) async fn ensure_subscribed(&self, hold: &Hold) -> Result<u64, BrokerError> {
        let index = hold.lock().feed;
        let feed = &self.feeds[index];
        let link = &self.links[feed.shard];
        let Ok(_order) =
            tokio::time::timeout(self.config.redis_timeout, feed.commands.lock()).await
        else {
            return Err(link.unavailable("pub/sub connection busy"));
        };
        let Some(generation) = feed.generation() else {
            return Err(link.unavailable("pub/sub connection down"));
        };
        if hold.lock().subscribed_on == generation {
            return Ok(generation);
        }
        let mut sink = feed
            .sink()
            .ok_or_else(|| link.unavailable("pub/sub connection down"))?;
        let topic = self.keys.topic(&hold.name);
        match tokio::time::timeout(self.config.redis_timeout, sink.subscribe(topic)).await {
            Ok(Ok(())) => {
                hold.lock().subscribed_on = generation;
                Ok(generation)
            }
            Ok(Err(e)) => Err(link.unavailable(e)),
            Err(_) => Err(link.unavailable("SUBSCRIBE not confirmed in time")),
        }
    }

    /// Keeps feed `index` connected until `stop`.
    pub(super) async fn run_feed(&self, index: usize, stop: CancellationToken) {
        let feed = &self.feeds[index];
        let link = &self.links[feed.shard];
        let canary = self.keys.canary(&self.node, index);
        let timeout = self.config.redis_timeout;
        let mut backoff = Backoff::new();
        let mut attempt = index;
        loop {
            let client = link.pubsub_client(attempt);
            attempt += 1;
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                c = tokio::time::timeout(timeout, client.get_async_pubsub()) => c,
            };
            let pubsub = match connected {
                Ok(Ok(pubsub)) => pubsub,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    tracing::debug!(address = %link.address, %error, "pub/sub connection failed");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            let ready = {
                let _order = feed.commands.lock().await;
                let mut topics = vec![canary.clone()];
                if index == 0 {
                    // The cluster's orders, and the answers to this node's.
                    topics.push(self.keys.control());
                    topics.push(self.keys.reply(&self.node));
                }
                let channels = self.table.on_feed(index);
                topics.extend(channels.iter().map(|(name, _)| self.keys.topic(name)));
                let mut subscribed = true;
                for chunk in topics.chunks(500) {
                    let done = tokio::time::timeout(timeout, sink.subscribe(chunk)).await;
                    if !matches!(done, Ok(Ok(()))) {
                        subscribed = false;
                        break;
                    }
                }
                if subscribed {
                    let generation = feed.generation.fetch_add(1, Ordering::AcqRel) + 1;
                    *feed.sink.lock().expect("feed lock") = Some(sink.clone());
                    // What was published while this feed was down is only in the streams.
                    for (name, entry) in channels {
                        let mut flush = self.hub.flush();
                        let mut entry = entry.lock().expect("entry lock");
                        entry.subscribed_on = generation;
                        entry.frontier = None;
                        if generation > 1 {
                            self.hub.unsubscribe_all_into(
                                &name,
                                UnsubReason::Resubscribe,
                                &mut flush,
                            );
                        }
                        drop(entry);
                        flush.run();
                    }
                }
                subscribed
            };
            if ready {
                backoff.reset();
                tracing::debug!(address = %link.address, feed = index, "pub/sub connected");
                // The first canary (and heartbeat) at once, so that readiness does not
                // wait for a tick.
                if index == 0 {
                    let _ = self.heartbeat().await;
                }
                let _ = link.publish(canary.clone(), b"1".to_vec()).await;
                let mut ping = tokio::time::interval(PING_INTERVAL);
                let mut sweep = tokio::time::interval(UNUSED_SWEEP);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        message = stream.next() => match message {
                            Some(message) => {
                                let mut flush = self.hub.flush();
                                self.on_message(index, &canary, &message, &mut flush);
                                // What has already arrived goes out in the same flush, so a
                                // socket that gets several publications is written once.
                                for _ in 1..BATCH {
                                    match stream.next().now_or_never() {
                                        Some(Some(message)) => {
                                            self.on_message(index, &canary, &message, &mut flush)
                                        }
                                        _ => break,
                                    }
                                }
                                flush.run();
                            }
                            None => break,
                        },
                        _ = ping.tick() => {
                            let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                tracing::warn!(address = %link.address, "pub/sub connection stopped answering; replacing it");
                                break;
                            }
                        }
                        _ = sweep.tick() => {
                            self.unsubscribe_unused(index, &canary, &mut sink, &mut stream).await;
                            #[cfg(test)]
                            super::sweep_race::at(&self.node, super::sweep_race::Point::AfterSweep).await;
                        }
                    }
                }
            }
            *feed.sink.lock().expect("feed lock") = None;
            if !ready {
                // The connection came up but its SUBSCRIBEs failed: not straight back.
                if !backoff.wait(&stop).await {
                    return;
                }
            }
        }
    }

    /// Drops the topics of `index` that no subscriber here needs any more. Skipped while a
    /// subscribe holds the feed's commands: the reader never waits on them.
    async fn unsubscribe_unused(
        &self,
        index: usize,
        canary: &str,
        sink: &mut PubSubSink,
        stream: &mut PubSubStream,
    ) {
        let feed = &self.feeds[index];
        let Ok(_order) = feed.commands.try_lock() else {
            return;
        };
        let unused = self
            .table
            .drop_unused(index, |name| !self.hub.has_subscribers(name));
        if unused.is_empty() {
            return;
        }
        let topics: Vec<String> = unused.iter().map(|n| self.keys.topic(n)).collect();
        #[cfg(test)]
        super::sweep_race::at(&self.node, super::sweep_race::Point::BeforeUnsubscribe).await;
        // A failure leaves topics subscribed; the connection is replaced on its next failed
        // ping anyway.
        let _ = tokio::time::timeout(self.config.redis_timeout, sink.unsubscribe(topics)).await;
        // What the dropped topics carried before the UNSUBSCRIBE took effect is already in
        // the stream: handled now, before a new subscribe of the same channel can start
        // (the commands are still held), and those of the dropped topics thrown away, so
        // that they can never start a new entry's frontier.
        let mut flush = self.hub.flush();
        while let Some(Some(message)) = stream.next().now_or_never() {
            let dropped = self
                .keys
                .channel_of(message.get_channel_name())
                .is_some_and(|c| unused.iter().any(|u| **u == *c));
            if !dropped {
                self.on_message(index, canary, &message, &mut flush);
            }
        }
        flush.run();
    }

    fn on_message(&self, index: usize, canary: &str, message: &redis::Msg, flush: &mut Flush) {
        let topic = message.get_channel_name();
        if topic == canary {
            *self.feeds[index].canary.lock().expect("feed lock") = Some(Instant::now());
            return;
        }
        let Some(channel) = self.keys.channel_of(topic) else {
            if index == 0 && topic == self.keys.control() {
                self.on_order(message.get_payload_bytes());
            } else if index == 0 && topic == self.keys.reply(&self.node) {
                self.on_answer(message.get_payload_bytes());
            }
            return;
        };
        match envelope::decode(message.get_payload_bytes()) {
            Some(Envelope::Publication {
                offset,
                epoch,
                data,
                receipt,
                trace,
            }) => self.arrived(channel, offset, epoch, data, (receipt, trace), flush),
            Some(Envelope::Membership(member)) => {
                if *member.node == *self.node || !self.options(channel).join_leave {
                    return;
                }
                let kind = if member.joined {
                    Membership::Join
                } else {
                    Membership::Leave
                };
                let frame = ServerMessage::JoinLeave {
                    kind,
                    channel,
                    client: &member.client,
                    user: &member.user,
                    info: member.info.as_deref(),
                }
                .frame();
                flush.extend(self.hub.relay(channel, &frame));
            }
            None => tracing::warn!(%topic, "undecodable message on a channel topic"),
        }
    }

    /// A publication from the topic: to the hub through the frontier; the sockets to write
    /// join `flush`, which runs once the entry's lock is released.
    fn arrived(
        &self,
        channel: &str,
        offset: u64,
        epoch: &str,
        data: &[u8],
        (receipt, trace): (Option<std::time::Duration>, Option<TraceParent>),
        flush: &mut Flush,
    ) {
        let trace = trace.as_ref();
        let Some(entry) = self.table.get(channel) else {
            return;
        };
        let mut entry = entry.lock().expect("entry lock");
        if offset == 0 {
            // Without history there are no offsets to order or recover: as it comes.
            flush.extend(self.hub.deliver(channel, data, None, None, trace).1);
            return;
        }
        match entry.arrive(epoch, offset) {
            Step::Deliver => {
                let (counts, delivered) =
                    self.hub
                        .deliver(channel, data, Some(offset), receipt, trace);
                entry.last = (offset, counts.queued);
                flush.extend(delivered);
            }
            Step::Skip => {}
            Step::Gap => {
                tracing::warn!(%channel, offset, "publications missing: subscribers resubscribe");
                entry.frontier = None;
                self.hub
                    .unsubscribe_all_into(channel, UnsubReason::Resubscribe, flush);
            }
        }
    }
}
