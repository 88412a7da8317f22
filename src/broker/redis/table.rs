//! The channels this node holds a Redis subscription for, and for each the frontier: the
//! last publication handed to the hub. Publications reach the hub from two places (the
//! topic, and the node's own publish returning), so the frontier is what keeps each one
//! delivered once and in offset order, and what sees a gap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// One channel's state on this node.
pub struct Entry {
    /// The pub/sub connection (feed) its topic is subscribed on.
    pub feed: usize,
    /// The feed's generation whose SUBSCRIBE was confirmed (0: none yet).
    pub subscribed_on: u64,
    /// Subscribes in progress: the entry is not dropped while any is.
    pub users: usize,
    /// Epoch and offset of the last publication given to the hub; None until the first one
    /// came through the topic (or a subscriber attached), and again after a gap.
    pub frontier: Option<(Arc<str>, u64)>,
    /// The last publication handed to the hub and how many connections it was queued to,
    /// for the publish that made it when its echo came first.
    pub last: (u64, u32),
}

/// What to do with a publication that arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next one: hand it to the hub (the frontier moved).
    Deliver,
    /// Already delivered, or nobody here waits for it.
    Skip,
    /// Publications are missing before it, or the stream restarted: the subscribers here
    /// must resubscribe to recover.
    Gap,
}

impl Entry {
    /// A publication from the channel's topic. The first one since the topic was
    /// subscribed (or since a gap) starts the frontier: a subscriber attaching later then
    /// sees that the hub is past what it read, and reads again.
    pub fn arrive(&mut self, epoch: &str, offset: u64) -> Step {
        if self.frontier.is_none() {
            self.frontier = Some((Arc::from(epoch), offset));
            return Step::Deliver;
        }
        self.next(epoch, offset)
    }

    /// This node's own publication, when its publish returns: delivered now if it is the
    /// next one, else left to the topic. Never starts the frontier (the topic may not be
    /// subscribed yet).
    pub fn published(&mut self, epoch: &str, offset: u64) -> Step {
        if self.frontier.is_none() {
            return Step::Skip;
        }
        self.next(epoch, offset)
    }

    fn next(&mut self, epoch: &str, offset: u64) -> Step {
        let Some((current, top)) = &self.frontier else {
            return Step::Skip;
        };
        if **current != *epoch {
            return Step::Gap;
        }
        if offset <= *top {
            return Step::Skip;
        }
        if offset > top + 1 {
            return Step::Gap;
        }
        let current = current.clone();
        self.frontier = Some((current, offset));
        Step::Deliver
    }
}

#[derive(Default)]
pub struct Table {
    entries: Mutex<HashMap<Arc<str>, Arc<Mutex<Entry>>>>,
}

/// A subscribe in progress: keeps its entry in the table until dropped.
pub struct Hold {
    pub name: Arc<str>,
    pub entry: Arc<Mutex<Entry>>,
}

impl Hold {
    pub fn lock(&self) -> MutexGuard<'_, Entry> {
        self.entry.lock().expect("entry lock")
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.lock().users -= 1;
    }
}

impl Table {
    /// The channel's entry, made on first use on `feed`, held by a subscribe.
    pub fn hold(&self, name: &str, feed: usize) -> Hold {
        let mut entries = self.entries.lock().expect("table lock");
        let (name, entry) = match entries.get_key_value(name) {
            Some((k, e)) => (k.clone(), e.clone()),
            None => {
                let name: Arc<str> = Arc::from(name);
                let entry = Arc::new(Mutex::new(Entry {
                    feed,
                    subscribed_on: 0,
                    users: 0,
                    frontier: None,
                    last: (0, 0),
                }));
                entries.insert(name.clone(), entry.clone());
                (name, entry)
            }
        };
        entry.lock().expect("entry lock").users += 1;
        Hold { name, entry }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Mutex<Entry>>> {
        self.entries.lock().expect("table lock").get(name).cloned()
    }

    /// Every channel on `feed`.
    pub fn on_feed(&self, feed: usize) -> Vec<(Arc<str>, Arc<Mutex<Entry>>)> {
        self.entries
            .lock()
            .expect("table lock")
            .iter()
            .filter(|(_, e)| e.lock().expect("entry lock").feed == feed)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Drops the entries of `feed` that `unused` says nobody here needs (no subscribe in
    /// progress); returns their names, to unsubscribe.
    pub fn drop_unused(&self, feed: usize, unused: impl Fn(&str) -> bool) -> Vec<Arc<str>> {
        let mut dropped = Vec::new();
        self.entries
            .lock()
            .expect("table lock")
            .retain(|name, entry| {
                let entry = entry.lock().expect("entry lock");
                let keep = entry.feed != feed || entry.users > 0 || !unused(name);
                if !keep {
                    dropped.push(name.clone());
                }
                keep
            });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_delivers_each_offset_once_in_order_and_sees_gaps() {
        let mut e = Entry {
            feed: 0,
            subscribed_on: 1,
            users: 0,
            frontier: None,
            last: (0, 0),
        };
        assert_eq!(
            e.published("a", 1),
            Step::Skip,
            "a publish never starts the frontier"
        );
        assert_eq!(
            e.arrive("a", 1),
            Step::Deliver,
            "the topic's first one does"
        );
        assert_eq!(e.frontier, Some((Arc::from("a"), 1)));
        e.frontier = Some((Arc::from("a"), 3));
        assert_eq!(e.arrive("a", 3), Step::Skip);
        assert_eq!(e.arrive("a", 4), Step::Deliver);
        assert_eq!(e.arrive("a", 4), Step::Skip, "once");
        assert_eq!(e.arrive("a", 6), Step::Gap, "5 is missing");
        assert_eq!(e.arrive("b", 5), Step::Gap, "a new epoch");
        assert_eq!(e.frontier, Some((Arc::from("a"), 4)));
    }
}
