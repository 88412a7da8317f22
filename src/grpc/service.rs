//! The Control service: each RPC turns its request into one call of the node's API
//! (`crate::node`) and the result into its response; errors reach the wire through
//! `error::ApiError`.

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::events::RpcAnswer;
use crate::node::{Asker, Node, Target};
use crate::pb;
use crate::pb::control_server::Control;
use crate::wire::channel::Pattern;
use crate::wire::Position;

use super::error::ApiError;

pub struct ControlService {
    node: Node,
    /// Cancelled when the node stops: ends the publish streams.
    closing: CancellationToken,
}

impl ControlService {
    pub fn new(node: Node, closing: CancellationToken) -> ControlService {
        ControlService { node, closing }
    }
}

/// A request's target: a user's connections, or one connection.
fn target(target: Option<pb::Target>) -> Result<Target, ApiError> {
    match target.and_then(|t| t.target) {
        Some(pb::target::Target::User(user)) if !user.is_empty() => Ok(Target::User(user)),
        Some(pb::target::Target::Client(client)) if !client.is_empty() => {
            Ok(Target::Client(client))
        }
        _ => Err(ApiError::EmptyTarget),
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Control for ControlService {
    type EventsStream = super::events::EventsStream;
    type PublishStreamStream = super::publish::PublishStream;

    #[tracing::instrument(skip_all)]
    async fn events(
        &self,
        request: Request<Streaming<pb::EventsRequest>>,
    ) -> Reply<Self::EventsStream> {
        let stream = super::events::open(self.node.events.clone(), request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(rpc_id = %request.get_ref().rpc_id))]
    async fn reply(&self, request: Request<pb::ReplyRequest>) -> Reply<pb::ReplyResponse> {
        let req = request.into_inner();
        let answer = match req.result {
            Some(pb::reply_request::Result::Data(data)) => {
                self.node.check_data(&data)?;
                RpcAnswer::Data(data)
            }
            Some(pb::reply_request::Result::Error(e)) => {
                // Bounded like data: the client's reply frame must fit its queue.
                let max = self.node.config.max_publication_size;
                if e.message.len() > max {
                    let size = e.message.len();
                    return Err(ApiError::MessageTooLong { size, max }.into());
                }
                RpcAnswer::Error {
                    code: e.code,
                    message: e.message,
                }
            }
            None => return Err(ApiError::NoResult.into()),
        };
        if !self.node.events.reply(&req.rpc_id, answer) {
            return Err(ApiError::UnknownRpc(req.rpc_id).into());
        }
        Ok(Response::new(pb::ReplyResponse {}))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        let inherited = super::publish::traceparent(request.metadata());
        let published = super::publish::one(&self.node, request.into_inner(), inherited).await?;
        Ok(Response::new(published))
    }

    #[tracing::instrument(skip_all)]
    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Reply<Self::PublishStreamStream> {
        let inherited = super::publish::traceparent(request.metadata());
        let stream = super::publish::open(
            self.node.clone(),
            request.into_inner(),
            inherited,
            self.closing.clone(),
        );
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all)]
    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Reply<pb::BroadcastResponse> {
        let req = request.into_inner();
        let results = self.node.broadcast(&req.channels, &req.data).await?;
        Ok(Response::new(pb::BroadcastResponse {
            results: results
                .into_iter()
                .map(|p| super::publish::published_pb(p, None))
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Reply<pb::SubscribeResponse> {
        let req = request.into_inner();
        Node::check_channel(&req.channel)?;
        let target = target(req.target)?;
        let done = self.node.subscribe_target(&target, &req.channel).await?;
        Ok(Response::new(pb::SubscribeResponse {
            subscribed: done.subscribed,
            already_subscribed: done.already_subscribed,
            limit_exceeded: done.limit_exceeded,
        }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> Reply<pb::UnsubscribeResponse> {
        let req = request.into_inner();
        Node::check_channel(&req.channel)?;
        let target = target(req.target)?;
        let unsubscribed = self.node.unsubscribe_target(&target, &req.channel).await?;
        Ok(Response::new(pb::UnsubscribeResponse { unsubscribed }))
    }

    #[tracing::instrument(skip_all)]
    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Reply<pb::DisconnectResponse> {
        let req = request.into_inner();
        let target = target(req.target)?;
        let disconnected = self.node.disconnect(&target, req.code, &req.reason).await?;
        Ok(Response::new(pb::DisconnectResponse { disconnected }))
    }

    #[tracing::instrument(skip_all)]
    async fn send(&self, request: Request<pb::SendRequest>) -> Reply<pb::SendResponse> {
        let req = request.into_inner();
        let target = target(req.target)?;
        let delivered = self.node.send(&target, &req.data).await?;
        Ok(Response::new(pb::SendResponse { delivered }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn presence(&self, request: Request<pb::PresenceRequest>) -> Reply<pb::PresenceResponse> {
        let req = request.into_inner();
        let clients = self.node.presence(Asker::Backend, &req.channel).await?;
        let clients = clients
            .into_iter()
            .map(|c| pb::ClientInfo {
                client: c.client,
                user: c.user,
                info: c
                    .info
                    .map(|i| i.get().as_bytes().to_vec())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::PresenceResponse { clients }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn presence_stats(
        &self,
        request: Request<pb::PresenceStatsRequest>,
    ) -> Reply<pb::PresenceStatsResponse> {
        let req = request.into_inner();
        let (clients, users) = self
            .node
            .presence_stats(Asker::Backend, &req.channel)
            .await?;
        Ok(Response::new(pb::PresenceStatsResponse {
            num_clients: clients as u32,
            num_users: users as u32,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn receipt(&self, request: Request<pb::ReceiptRequest>) -> Reply<pb::ReceiptResponse> {
        let req = request.into_inner();
        let Some(receipt) = self.node.receipt(&req.channel, req.offset).await? else {
            let missing = ApiError::NoReceipt {
                channel: req.channel,
                offset: req.offset,
            };
            return Err(missing.into());
        };
        Ok(Response::new(pb::ReceiptResponse {
            delivered: receipt.delivered,
            acknowledged: receipt.acknowledged,
            missing_users: receipt.missing,
            missing_more: receipt.missing_more,
            complete: receipt.complete,
            trace_id: receipt.trace_id.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn channels(&self, request: Request<pb::ChannelsRequest>) -> Reply<pb::ChannelsResponse> {
        let req = request.into_inner();
        let pattern = match req.pattern.as_str() {
            "" => None,
            text => Some(Pattern::parse(text).map_err(|error| ApiError::Pattern {
                pattern: text.to_string(),
                error,
            })?),
        };
        let channels = self
            .node
            .channels(pattern.as_ref())
            .await?
            .into_iter()
            .map(|(channel, subscribers)| pb::ChannelInfo {
                channel,
                subscribers: subscribers as u32,
            })
            .collect();
        Ok(Response::new(pb::ChannelsResponse { channels }))
    }

    #[tracing::instrument(skip_all)]
    async fn info(&self, _request: Request<pb::InfoRequest>) -> Reply<pb::InfoResponse> {
        let info = self.node.info();
        let nodes = self
            .node
            .cluster_info()
            .await?
            .into_iter()
            .map(|n| pb::NodeInfo {
                node_id: n.node_id,
                uptime_seconds: n.uptime_seconds,
                connections: n.connections as u32,
                users: n.users as u32,
                channels: n.channels as u32,
                subscriptions: n.subscriptions as u32,
            })
            .collect();
        Ok(Response::new(pb::InfoResponse {
            nodes,
            node_id: info.node_id,
            version: info.version.to_string(),
            uptime_seconds: info.uptime_seconds,
            connections: info.connections as u32,
            users: info.users as u32,
            channels: info.channels as u32,
            subscriptions: info.subscriptions as u32,
        }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn history(&self, request: Request<pb::HistoryRequest>) -> Reply<pb::HistoryResponse> {
        let req = request.into_inner();
        let since = req.since.map(|p| Position {
            offset: p.offset,
            epoch: p.epoch.into(),
        });
        let (publications, position) = self
            .node
            .history(
                Asker::Backend,
                &req.channel,
                since.as_ref(),
                req.limit as usize,
                req.reverse,
            )
            .await?;
        Ok(Response::new(pb::HistoryResponse {
            publications: publications
                .into_iter()
                .map(|p| pb::Publication {
                    offset: p.offset,
                    data: p.data.to_vec(),
                })
                .collect(),
            offset: position.offset,
            epoch: position.epoch.to_string(),
        }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn history_remove(
        &self,
        request: Request<pb::HistoryRemoveRequest>,
    ) -> Reply<pb::HistoryRemoveResponse> {
        let req = request.into_inner();
        self.node.remove_history(&req.channel).await?;
        Ok(Response::new(pb::HistoryRemoveResponse {}))
    }
}
