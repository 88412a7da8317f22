//! What a backend asks of every node of a cluster: Send, Disconnect, Subscribe and
//! Unsubscribe reach a user's (or a client's) connections wherever they are, and Channels
//! and Info answer for every node. The node that took the call acts on its own connections,
//! gives the same order to the others through the engine ([`Broker::ask`]), and adds up
//! their answers; each node carries out the others' orders in [`Node::serve_orders`]. A
//! node alone (the memory engine) has no one to ask.
//!
//! [`Broker::ask`]: crate::broker::Broker::ask

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::{Node, NodeError, Subscribed, Target};
use crate::hub::Receipt;
use crate::wire::channel::Pattern;

/// An order to the other nodes, as JSON between them.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Order {
    /// `data` is JSON text (a raw value cannot sit in an internally tagged enum).
    Send {
        target: Target,
        data: String,
    },
    Disconnect {
        target: Target,
        code: u16,
        reason: String,
    },
    Subscribe {
        target: Target,
        channel: String,
    },
    Unsubscribe {
        target: Target,
        channel: String,
    },
    Channels {
        pattern: Option<String>,
    },
    Receipt {
        channel: String,
        offset: u64,
    },
    Info,
}

/// A node's answer to an order.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Count(u32),
    Subscribed(u32, u32, u32),
    Channels(Vec<(String, usize)>),
    Info(NodeCounts),
    Receipt(Option<Receipt>),
    /// The order could not be carried out there.
    Failed(String),
}

/// One node's counts, for Control.Info.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeCounts {
    pub node_id: String,
    pub uptime_seconds: u64,
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
    pub subscriptions: usize,
}

fn encode<T: Serialize>(value: &T) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(value).expect("encodes")).expect("JSON")
}

impl Node {
    /// The other nodes' answers to `order`.
    async fn ask(&self, order: &Order) -> Result<Vec<Answer>, NodeError> {
        let answers = self.broker.ask(encode(order)).await?;
        Ok(answers
            .iter()
            .filter_map(|a| match serde_json::from_str::<Answer>(a.get()) {
                Ok(Answer::Failed(error)) => {
                    tracing::warn!(%error, "an order failed on another node");
                    None
                }
                Ok(answer) => Some(answer),
                Err(_) => None,
            })
            .collect())
    }

    /// Adds up the counts of the other nodes' answers.
    async fn ask_count(&self, order: &Order) -> Result<u32, NodeError> {
        Ok(self
            .ask(order)
            .await?
            .iter()
            .map(|a| match a {
                Answer::Count(n) => *n,
                _ => 0,
            })
            .sum())
    }

    /// Control.Send: a `message` push to every connection of the target, on every node;
    /// how many took it.
    pub async fn send(&self, target: &Target, data: &[u8]) -> Result<u32, NodeError> {
        let local = self.send_local(target, data)?;
        let data = std::str::from_utf8(data).expect("checked JSON is UTF-8");
        let order = Order::Send {
            target: target.clone(),
            data: data.to_string(),
        };
        Ok(local + self.ask_count(&order).await?)
    }

    /// Control.Disconnect on every node: how many connections were not closing already.
    pub async fn disconnect(
        &self,
        target: &Target,
        code: u32,
        reason: &str,
    ) -> Result<u32, NodeError> {
        let (code, local) = self.disconnect_local(target, code, reason)?;
        let order = Order::Disconnect {
            target: target.clone(),
            code,
            reason: reason.to_string(),
        };
        Ok(local + self.ask_count(&order).await?)
    }

    /// Control.Subscribe on every node.
    pub async fn subscribe_target(
        &self,
        target: &Target,
        channel: &str,
    ) -> Result<Subscribed, NodeError> {
        let mut out = self.subscribe_target_local(target, channel).await?;
        let order = Order::Subscribe {
            target: target.clone(),
            channel: channel.to_string(),
        };
        for answer in self.ask(&order).await? {
            if let Answer::Subscribed(s, a, l) = answer {
                out.subscribed += s;
                out.already_subscribed += a;
                out.limit_exceeded += l;
            }
        }
        Ok(out)
    }

    /// Control.Unsubscribe on every node.
    pub async fn unsubscribe_target(
        &self,
        target: &Target,
        channel: &str,
    ) -> Result<u32, NodeError> {
        let local = self.unsubscribe_target_local(target, channel)?;
        let order = Order::Unsubscribe {
            target: target.clone(),
            channel: channel.to_string(),
        };
        Ok(local + self.ask_count(&order).await?)
    }

    /// Channels with subscribers on every node, matching `pattern`, with their subscribers
    /// added up.
    pub async fn channels(
        &self,
        pattern: Option<&Pattern>,
    ) -> Result<Vec<(String, usize)>, NodeError> {
        let mut all: std::collections::BTreeMap<String, usize> =
            self.local_channels(pattern).into_iter().collect();
        let order = Order::Channels {
            pattern: pattern.map(|p| p.to_string()),
        };
        for answer in self.ask(&order).await? {
            if let Answer::Channels(channels) = answer {
                for (name, n) in channels {
                    *all.entry(name).or_default() += n;
                }
            }
        }
        Ok(all.into_iter().collect())
    }

    /// A publication's delivery receipt, added up over the nodes that tallied it; None
    /// when none did (never published, expired, or forgotten).
    pub async fn receipt(&self, channel: &str, offset: u64) -> Result<Option<Receipt>, NodeError> {
        Node::check_channel(channel)?;
        if !self.config.channel_options(channel).receipts {
            return Err(NodeError::ReceiptsDisabled(channel.to_string()));
        }
        let mut receipt = self.hub.receipt(channel, offset);
        let order = Order::Receipt {
            channel: channel.to_string(),
            offset,
        };
        for answer in self.ask(&order).await? {
            if let Answer::Receipt(Some(other)) = answer {
                match receipt.as_mut() {
                    Some(receipt) => receipt.merge(other),
                    None => receipt = Some(other),
                }
            }
        }
        Ok(receipt)
    }

    /// Every live node's counts, this node's first.
    pub async fn cluster_info(&self) -> Result<Vec<NodeCounts>, NodeError> {
        let mut nodes = vec![self.counts()];
        for answer in self.ask(&Order::Info).await? {
            if let Answer::Info(counts) = answer {
                nodes.push(counts);
            }
        }
        Ok(nodes)
    }

    fn counts(&self) -> NodeCounts {
        let info = self.info();
        NodeCounts {
            node_id: info.node_id,
            uptime_seconds: info.uptime_seconds,
            connections: info.connections,
            users: info.users,
            channels: info.channels,
            subscriptions: info.subscriptions,
        }
    }

    /// Carries out the other nodes' orders, in the order they came, until `stop`.
    pub async fn serve_orders(&self, stop: CancellationToken) {
        let Some(mut orders) = self.broker.orders() else {
            return;
        };
        loop {
            let order = tokio::select! {
                _ = stop.cancelled() => return,
                order = orders.recv() => match order {
                    Some(order) => order,
                    None => return,
                },
            };
            let answer = match serde_json::from_str::<Order>(order.body.get()) {
                Ok(o) => self.carry_out(o).await,
                Err(e) => Answer::Failed(format!("unknown order: {e}")),
            };
            if let Err(e) = self.broker.answer(order, encode(&answer)).await {
                tracing::warn!(error = %e, "answer to another node not sent");
            }
        }
    }

    async fn carry_out(&self, order: Order) -> Answer {
        let done = match order {
            Order::Send { target, data } => {
                self.send_local(&target, data.as_bytes()).map(Answer::Count)
            }
            Order::Disconnect {
                target,
                code,
                reason,
            } => self
                .disconnect_local(&target, u32::from(code), &reason)
                .map(|(_, n)| Answer::Count(n)),
            Order::Subscribe { target, channel } => self
                .subscribe_target_local(&target, &channel)
                .await
                .map(|s| Answer::Subscribed(s.subscribed, s.already_subscribed, s.limit_exceeded)),
            Order::Unsubscribe { target, channel } => self
                .unsubscribe_target_local(&target, &channel)
                .map(Answer::Count),
            Order::Channels { pattern } => {
                let pattern = pattern.and_then(|p| Pattern::parse(&p).ok());
                Ok(Answer::Channels(self.local_channels(pattern.as_ref())))
            }
            Order::Receipt { channel, offset } => {
                Ok(Answer::Receipt(self.hub.receipt(&channel, offset)))
            }
            Order::Info => Ok(Answer::Info(self.counts())),
        };
        done.unwrap_or_else(|e| Answer::Failed(e.to_string()))
    }
}
