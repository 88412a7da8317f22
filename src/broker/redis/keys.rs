//! The Redis names of a channel's state and of the cluster's. Each channel key has the
//! channel in a hash tag (`{...}`), so that all of one channel's keys live in one Redis
//! Cluster slot. On a Redis Cluster the keys of the nodes and of the event groups, which
//! `reap.lua` and `events.lua` touch together, share the tag `{<prefix>}`.

/// Names under one prefix.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
    /// What the nodes' and event groups' keys start with: the prefix, and on a cluster its
    /// hash tag too.
    shared: String,
}

impl Keys {
    pub fn new(prefix: &str, cluster: bool) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            shared: if cluster {
                format!("{prefix}:{{{prefix}}}")
            } else {
                prefix.to_string()
            },
        }
    }

    /// The start of the nodes' and event groups' keys (`events.lua` builds names on it).
    pub fn shared(&self) -> &str {
        &self.shared
    }

    /// The position: a hash of epoch `e` and top offset `o`.
    pub fn meta(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:meta", self.prefix)
    }

    /// The kept publications: a stream whose entry ids are `<offset>-0`.
    pub fn stream(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:stream", self.prefix)
    }

    /// A publish idempotency key and the result it gave first.
    pub fn seen(&self, channel: &str, key: &str) -> String {
        format!("{}:{{{channel}}}:seen:{key}", self.prefix)
    }

    /// Presence: client id → its user and info.
    pub fn presence(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:presence", self.prefix)
    }

    /// Presence expiries: client id → when it leaves unless refreshed (ms since the epoch).
    pub fn presence_expiry(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:presence-exp", self.prefix)
    }

    /// The pub/sub topic of a channel.
    pub fn topic(&self, channel: &str) -> String {
        format!("{}:topic:{{{channel}}}", self.prefix)
    }

    /// The channel a topic is for.
    pub fn channel_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":topic:{")?
            .strip_suffix('}')
    }

    /// The live nodes: node id → when it expires unless it beats again (ms since the epoch).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.shared)
    }

    /// A node's connections: client id → user (for the node that reports them ended if
    /// that node dies).
    pub fn connections(&self, node: &str) -> String {
        format!("{}:connections:{node}", self.shared)
    }

    /// Orders to every node. (On a cluster the topics of the nodes are published through
    /// the primary of their shared tag, like the nodes' keys: one primary that the node
    /// depends on rather than several.)
    pub fn control(&self) -> String {
        format!("{}:control", self.shared)
    }

    /// Answers to the orders of `node`.
    pub fn reply(&self, node: &str) -> String {
        format!("{}:reply:{node}", self.shared)
    }

    /// The cluster's event groups: name → the kinds it wants (`events.lua`).
    pub fn event_groups(&self) -> String {
        format!("{}:events", self.shared)
    }

    /// A key of one event group, named as `events.lua` names it: `alive`, `stream`, `seq`,
    /// `lost`, `cursor` or `lease`.
    pub fn event_group(&self, group: &str, part: &str) -> String {
        format!("{}:events:{group}:{part}", self.shared)
    }

    /// The topic on which a node checks that its pub/sub connection carries messages.
    pub fn canary(&self, node: &str, feed: usize) -> String {
        format!("{}:canary:{node}:{feed}", self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_names_its_channel() {
        let keys = Keys::new("sc", false);
        assert_eq!(keys.topic("chat:a"), "sc:topic:{chat:a}");
        assert_eq!(
            keys.channel_of(&keys.topic("chat:lobby")),
            Some("chat:lobby")
        );
        assert_eq!(keys.channel_of("sc:canary:n:0"), None);
        assert_eq!(keys.channel_of("other:topic:{x}"), None);
    }

    #[test]
    fn on_a_cluster_the_shared_keys_have_one_tag() {
        let keys = Keys::new("sc", true);
        assert_eq!(keys.nodes(), "sc:{sc}:nodes");
        assert_eq!(keys.connections("n1"), "sc:{sc}:connections:n1");
        assert_eq!(keys.event_group("g", "stream"), "sc:{sc}:events:g:stream");
        assert_eq!(keys.canary("n1", 0), "sc:{sc}:canary:n1:0");
        assert_eq!(keys.meta("chat:a"), "sc:{chat:a}:meta");
        assert_eq!(Keys::new("sc", false).nodes(), "sc:nodes");
    }
}
