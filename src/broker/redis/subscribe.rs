//! A subscription that sees no gap (rule 4) across nodes: the channel's topic is subscribed
//! (and confirmed) first, then the stream is read, then the subscriber attaches at the
//! frontier, under the channel's entry lock, so that each publication is either in what it
//! recovered (offsets up to the frontier) or delivered to it live (after), never both and
//! never neither.

use std::time::Instant;

use crate::wire::message::UnsubReason;
use crate::wire::{Attach, Position, Publication, Recovery};

use super::table::Hold;
use super::{BrokerError, Inner, Read};

/// What an attempt to attach did.
enum Attached<R> {
    Done(R),
    /// Subscribe (or read) again: the feed reconnected, or the client is ahead of this node.
    Again,
    /// The hub is at this offset, past the read.
    Behind(u64),
}

/// How long a subscribe waits between attempts while the frontier and the stream disagree
/// (publications on their way through the topic).
const RETRY: std::time::Duration = std::time::Duration::from_millis(2);

impl Inner {
    pub(super) async fn subscribe<R>(
        &self,
        channel: &str,
        since: Option<&Position>,
        budget: usize,
        attach: impl FnOnce(Attach) -> R,
    ) -> Result<R, BrokerError> {
        let hold = self.table.hold(channel, self.feed_of(channel));
        let history = self.options(channel).has_history();
        let deadline = Instant::now() + self.config.redis_timeout;
        let max = self.config.max_recovery;
        let mut attach = Some(attach);
        loop {
            let generation = self.ensure_subscribed(&hold).await?;
            #[cfg(test)]
            super::sweep_race::at(&self.node, super::sweep_race::Point::BeforeRead).await;
            let mut read = if history {
                let count = if since.is_some() { max + 1 } else { 0 };
                let from = since.map_or(0, |s| s.offset as i64);
                Some(self.read(channel, 'f', from, count).await?)
            } else {
                None
            };
            loop {
                match self.attach(&hold, generation, read.as_ref(), since, budget, &mut attach) {
                    Attached::Done(result) => return Ok(result),
                    Attached::Again => break,
                    Attached::Behind(frontier) => {
                        // The hub is past what was read (a busy channel): read only what
                        // lies between, rather than everything again.
                        let read = read.as_mut().expect("a frontier only with history");
                        let top = read.position.offset;
                        let count = if since.is_some() {
                            (frontier - top) as usize
                        } else {
                            0
                        };
                        let more = self.read(channel, 'f', top as i64, count).await?;
                        if more.position.epoch != read.position.epoch {
                            break;
                        }
                        // The read now covers up to the frontier (the stream may be further
                        // on: those arrive through the topic).
                        read.entries.extend(more.entries);
                        read.position.offset = frontier;
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            self.wait(deadline, channel).await?;
        }
    }

    /// Attaches the subscriber at the frontier, under the entry lock; or says why not yet:
    /// the feed reconnected or the client is ahead of this node (try again), or the hub is
    /// past the read (read up to the frontier).
    fn attach<R, F: FnOnce(Attach) -> R>(
        &self,
        hold: &Hold,
        generation: u64,
        read: Option<&Read>,
        since: Option<&Position>,
        budget: usize,
        attach: &mut Option<F>,
    ) -> Attached<R> {
        let channel: &str = &hold.name;
        let feed = &self.feeds[hold.lock().feed];
        let mut entry = hold.lock();
        if feed.generation() != Some(generation) || entry.subscribed_on != generation {
            // The feed reconnected meanwhile: subscribe on the new connection.
            return Attached::Again;
        }
        let Some(read) = read else {
            let attach = attach.take().expect("attached once");
            return Attached::Done(attach(Attach {
                position: None,
                recovery: since.map(|_| Recovery::Impossible),
                receipts: false,
            }));
        };
        let mut flush = self.hub.flush();
        let at = match &entry.frontier {
            Some((epoch, top)) if **epoch == *read.position.epoch => {
                if *top > read.position.offset {
                    // Past the read: the subscriber would miss what is between.
                    return Attached::Behind(*top);
                }
                *top
            }
            Some(_) => {
                // The stream restarted under the subscribers here.
                self.hub
                    .unsubscribe_all_into(channel, UnsubReason::Resubscribe, &mut flush);
                entry.frontier = Some((read.position.epoch.clone(), read.position.offset));
                read.position.offset
            }
            None => {
                entry.frontier = Some((read.position.epoch.clone(), read.position.offset));
                read.position.offset
            }
        };
        // A client that saw publications this node has not delivered yet waits for them.
        let behind = since.is_some_and(|s| {
            *s.epoch == *read.position.epoch && s.offset > at && s.offset <= read.position.offset
        });
        let result = if behind {
            Attached::Again
        } else {
            let recovery = since.map(|s| recover(s, read, at, self.config.max_recovery, budget));
            let attach = attach.take().expect("attached once");
            Attached::Done(attach(Attach {
                position: Some(Position {
                    offset: at,
                    epoch: read.position.epoch.clone(),
                }),
                recovery,
                receipts: false,
            }))
        };
        drop(entry);
        flush.run();
        result
    }

    async fn wait(&self, deadline: Instant, channel: &str) -> Result<(), BrokerError> {
        if Instant::now() >= deadline {
            return Err(self
                .link(channel)
                .unavailable("the channel's publications did not arrive in time"));
        }
        tokio::time::sleep(RETRY).await;
        Ok(())
    }
}

/// Every publication after `since` up to offset `at`, if all are kept and within the
/// limits; all or nothing, like the memory engine's.
fn recover(since: &Position, read: &Read, at: u64, max: usize, budget: usize) -> Recovery {
    if since.epoch != read.position.epoch || since.offset > at {
        return Recovery::Impossible;
    }
    let missed = at - since.offset;
    if missed == 0 {
        return Recovery::Complete(Vec::new());
    }
    if missed > max as u64 {
        return Recovery::Impossible;
    }
    let wanted: Vec<Publication> = read
        .entries
        .iter()
        .filter(|p| p.offset > since.offset && p.offset <= at)
        .cloned()
        .collect();
    let contiguous = wanted.first().is_some_and(|p| p.offset == since.offset + 1)
        && wanted.len() as u64 == missed;
    if !contiguous || wanted.iter().map(Publication::reply_size).sum::<usize>() > budget {
        return Recovery::Impossible;
    }
    Recovery::Complete(wanted)
}
