//! The Control service: each RPC validates its request, then acts through the broker
//! (publications) or the hub (server-side subscriptions, disconnects, messages, queries).

use tonic::{Request, Response, Status, Streaming};

use crate::channel::{self, Pattern};
use crate::events::RpcAnswer;
use crate::hub::{HubError, Target};
use crate::node::Node;
use crate::pb;
use crate::pb::control_server::Control;
use crate::ws::close::{self, Close};
use crate::ws::{frame, protocol};

use super::error::ApiError;

/// Longest Publish idempotency_key: keys are remembered for idempotency_window.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Largest History page: under tonic's default 4 MiB message limit on the client side.
const MAX_HISTORY_PAGE: usize = 3 << 20;

pub struct ControlService {
    node: Node,
}

impl ControlService {
    pub fn new(node: Node) -> ControlService {
        ControlService { node }
    }

    fn channel(name: &str) -> Result<(), ApiError> {
        channel::validate(name).map_err(|error| ApiError::Channel {
            channel: name.to_string(),
            error,
        })
    }

    fn data(&self, data: &[u8]) -> Result<(), ApiError> {
        let max = self.node.config.max_publication_size;
        if data.len() > max {
            return Err(ApiError::TooLarge {
                size: data.len(),
                max,
            });
        }
        protocol::validate_json(data).map_err(ApiError::Json)
    }

    fn target(target: Option<pb::Target>) -> Result<Target, ApiError> {
        match target.and_then(|t| t.target) {
            Some(pb::target::Target::User(user)) if !user.is_empty() => Ok(Target::User(user)),
            Some(pb::target::Target::Client(client)) if !client.is_empty() => {
                Ok(Target::Client(client))
            }
            _ => Err(ApiError::EmptyTarget),
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Control for ControlService {
    type EventsStream = super::events::EventsStream;

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
                self.data(&data)?;
                RpcAnswer::Data(data)
            }
            Some(pb::reply_request::Result::Error(e)) => RpcAnswer::Error {
                code: e.code,
                message: e.message,
            },
            None => return Err(ApiError::NoResult.into()),
        };
        if !self.node.events.reply(&req.rpc_id, answer) {
            return Err(ApiError::UnknownRpc(req.rpc_id).into());
        }
        Ok(Response::new(pb::ReplyResponse {}))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        let req = request.into_inner();
        Self::channel(&req.channel)?;
        self.data(&req.data)?;
        if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::KeyTooLong(MAX_IDEMPOTENCY_KEY).into());
        }
        let key = Some(req.idempotency_key.as_str()).filter(|k| !k.is_empty());
        let published = self
            .node
            .broker
            .publish(&req.channel, &req.data, key)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::PublishResponse {
            offset: published.offset,
            epoch: published.epoch,
            delivered: published.delivered,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Reply<pb::BroadcastResponse> {
        let req = request.into_inner();
        if req.channels.is_empty() {
            return Err(ApiError::NoChannels.into());
        }
        for channel in &req.channels {
            Self::channel(channel)?;
        }
        self.data(&req.data)?;
        let mut results = Vec::with_capacity(req.channels.len());
        for channel in &req.channels {
            let published = self
                .node
                .broker
                .publish(channel, &req.data, None)
                .await
                .map_err(ApiError::from)?;
            results.push(pb::PublishResponse {
                offset: published.offset,
                epoch: published.epoch,
                delivered: published.delivered,
            });
        }
        Ok(Response::new(pb::BroadcastResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Reply<pb::SubscribeResponse> {
        let req = request.into_inner();
        Self::channel(&req.channel)?;
        let target = Self::target(req.target)?;
        let mut out = pb::SubscribeResponse::default();
        for (id, _) in self.node.hub.connections(&target) {
            let hub = &self.node.hub;
            let subscribed = self.node.broker.subscribe(&req.channel, None, 0, |attach| {
                let first = frame::text(&protocol::encode_sub(&req.channel, &attach));
                hub.subscribe(&id, &req.channel, crate::hub::Origin::Server, first)
            });
            match subscribed {
                Ok(flush) => {
                    flush.run();
                    out.subscribed += 1
                }
                Err(HubError::AlreadySubscribed) => out.already_subscribed += 1,
                Err(HubError::TooManySubscriptions(_) | HubError::ChannelFull(_)) => {
                    out.limit_exceeded += 1
                }
                // The connection ended meanwhile.
                Err(HubError::UnknownClient) => {}
            }
        }
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> Reply<pb::UnsubscribeResponse> {
        let req = request.into_inner();
        Self::channel(&req.channel)?;
        let target = Self::target(req.target)?;
        let mut unsubscribed = 0;
        for (id, _) in self.node.hub.connections(&target) {
            if self
                .node
                .hub
                .unsubscribe(&id, &req.channel, Some(protocol::UnsubReason::Backend))
            {
                unsubscribed += 1;
            }
        }
        Ok(Response::new(pb::UnsubscribeResponse { unsubscribed }))
    }

    #[tracing::instrument(skip_all)]
    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Reply<pb::DisconnectResponse> {
        let req = request.into_inner();
        let target = Self::target(req.target)?;
        let code = match req.code {
            0 => close::BACKEND_RECONNECT,
            code if close::is_backend_code(code) => code as u16,
            code => return Err(ApiError::Code(code).into()),
        };
        let reason = if req.reason.is_empty() {
            "disconnected by the backend"
        } else {
            &req.reason
        };
        let mut disconnected = 0;
        for (_, outbox) in self.node.hub.connections(&target) {
            if outbox.close(Close::new(code, reason)) {
                disconnected += 1;
            }
        }
        Ok(Response::new(pb::DisconnectResponse { disconnected }))
    }

    #[tracing::instrument(skip_all)]
    async fn send(&self, request: Request<pb::SendRequest>) -> Reply<pb::SendResponse> {
        let req = request.into_inner();
        let target = Self::target(req.target)?;
        self.data(&req.data)?;
        let message = frame::text(&protocol::encode_message(&req.data));
        let mut delivered = 0;
        for (_, outbox) in self.node.hub.connections(&target) {
            if outbox.push(message.clone()).accepted() {
                delivered += 1;
            }
        }
        Ok(Response::new(pb::SendResponse { delivered }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn presence(&self, request: Request<pb::PresenceRequest>) -> Reply<pb::PresenceResponse> {
        let req = request.into_inner();
        Self::channel(&req.channel)?;
        let members = self
            .node
            .hub
            .presence(&req.channel)
            .ok_or_else(|| ApiError::PresenceDisabled(req.channel.clone()))?;
        let clients = members
            .into_iter()
            .map(|m| pb::ClientInfo {
                client: m.client,
                user: m.user,
                info: m
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
        Self::channel(&req.channel)?;
        let (clients, users) = self
            .node
            .hub
            .presence_stats(&req.channel)
            .ok_or_else(|| ApiError::PresenceDisabled(req.channel.clone()))?;
        Ok(Response::new(pb::PresenceStatsResponse {
            num_clients: clients as u32,
            num_users: users as u32,
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
            .hub
            .channels(pattern.as_ref())
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
        let counts = self.node.hub.counts();
        Ok(Response::new(pb::InfoResponse {
            node_id: self.node.id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.node.started.elapsed().as_secs(),
            connections: counts.connections as u32,
            users: counts.users as u32,
            channels: counts.channels as u32,
            subscriptions: counts.subscriptions as u32,
        }))
    }

    #[tracing::instrument(skip_all, fields(channel = %request.get_ref().channel))]
    async fn history(&self, request: Request<pb::HistoryRequest>) -> Reply<pb::HistoryResponse> {
        let req = request.into_inner();
        Self::channel(&req.channel)?;
        let max = self.node.config.max_recovery;
        if req.limit as usize > max {
            return Err(ApiError::Limit(max).into());
        }
        let since = req.since.as_ref().map(|p| p.offset);
        let (entries, position) = self
            .node
            .broker
            .history(&req.channel, since, req.limit as usize, req.reverse)
            .ok_or_else(|| ApiError::HistoryDisabled(req.channel.clone()))?;
        if let Some(since) = req.since.as_ref().filter(|s| !s.epoch.is_empty()) {
            if *since.epoch != *position.epoch {
                return Err(ApiError::EpochChanged(req.channel).into());
            }
        }
        let size: usize = entries
            .iter()
            .map(|e| e.data.len() + crate::broker::ENTRY_OVERHEAD)
            .sum();
        if size > MAX_HISTORY_PAGE {
            return Err(ApiError::PageTooLarge(MAX_HISTORY_PAGE).into());
        }
        Ok(Response::new(pb::HistoryResponse {
            publications: entries
                .into_iter()
                .map(|e| pb::Publication {
                    offset: e.offset,
                    data: e.data.to_vec(),
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
        Self::channel(&req.channel)?;
        if !self.node.broker.remove_history(&req.channel) {
            return Err(ApiError::HistoryDisabled(req.channel).into());
        }
        Ok(Response::new(pb::HistoryRemoveResponse {}))
    }
}
