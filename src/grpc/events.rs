//! Control.Events on the wire: the join handshake, the acknowledgement reader, and the
//! response stream that leaves the group when the backend goes away. The delivery rules live
//! in `crate::events`; this file only moves messages between tonic and them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::events::{
    Delivery, EventKind, Events, EventsError, Join, MemberId, Receivers, ToMember, What,
};
use crate::pb;
use crate::pb::events_request::Request;

use super::error::ApiError;

/// How long a new stream may take to send its join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

pub type EventsStream = Pin<Box<dyn Stream<Item = Result<pb::EventsResponse, Status>> + Send>>;

/// Reads the join, adds the member, and returns its response stream; acknowledgements are
/// read by a task of their own until either side ends.
pub async fn open(
    events: Events,
    mut inbound: Streaming<pb::EventsRequest>,
) -> Result<EventsStream, ApiError> {
    let first = tokio::time::timeout(JOIN_TIMEOUT, inbound.message())
        .await
        .map_err(|_| EventsError::JoinFirst)?
        .map_err(|status| ApiError::Stream(status.message().to_string()))?;
    let join = match first.and_then(|r| r.request) {
        Some(Request::Join(join)) => join_from(join)?,
        _ => return Err(EventsError::JoinFirst.into()),
    };
    let (member, receivers) = events.join(join)?;
    let stop = CancellationToken::new();
    tokio::spawn(read_acks(events.clone(), member, inbound, stop.clone()));
    Ok(Box::pin(MemberStream::new(events, member, receivers, stop)))
}

async fn read_acks(
    events: Events,
    member: MemberId,
    mut inbound: Streaming<pb::EventsRequest>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(pb::EventsRequest {
                request: Some(Request::Ack(ack)),
            })) => events.ack(member, &ack.seqs),
            Ok(Some(pb::EventsRequest {
                request: Some(Request::Join(_)),
            })) => {
                events.evict(member, EventsError::JoinTwice);
                break;
            }
            // An empty request (a newer client's field we do not know): ignored.
            Ok(Some(pb::EventsRequest { request: None })) => {}
            Ok(None) | Err(_) => break,
        }
    }
    events.leave(member);
}

/// The member's responses: events first, then rpcs. Once the member is removed from its
/// group it yields the reason (if any) and ends, whatever is still queued; dropping it (the
/// backend went away) leaves the group.
struct MemberStream {
    /// The `joined` response: always the first, even when the member is removed before the
    /// stream is first polled (a backend that half-closes right after its join).
    joined: Option<pb::EventsResponse>,
    receivers: Receivers,
    events: Events,
    member: MemberId,
    stop: CancellationToken,
    ended: bool,
}

impl MemberStream {
    fn new(
        events: Events,
        member: MemberId,
        mut receivers: Receivers,
        stop: CancellationToken,
    ) -> MemberStream {
        let joined = receivers.events.try_recv().ok().map(response);
        debug_assert!(
            matches!(
                joined,
                Some(pb::EventsResponse {
                    response: Some(pb::events_response::Response::Joined(_))
                })
            ),
            "Events::join queues `joined` first"
        );
        MemberStream {
            joined,
            receivers,
            events,
            member,
            stop,
            ended: false,
        }
    }
}

impl Stream for MemberStream {
    type Item = Result<pb::EventsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(joined) = self.joined.take() {
            return Poll::Ready(Some(Ok(joined)));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(reason) = self.receivers.signal.gone() {
            self.ended = true;
            return Poll::Ready(reason.map(|e| Err(ApiError::from(e).into())));
        }
        // Removal drops the senders, which wakes this stream to see the signal.
        match self.receivers.events.poll_recv(cx) {
            Poll::Ready(Some(message)) => return Poll::Ready(Some(Ok(response(message)))),
            Poll::Ready(None) => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        self.receivers
            .rpcs
            .poll_recv(cx)
            .map(|rpc| rpc.map(|delivery| Ok(response(ToMember::Event(delivery)))))
    }
}

impl Drop for MemberStream {
    fn drop(&mut self) {
        self.stop.cancel();
        self.events.leave(self.member);
    }
}

const MAX_GROUP_NAME: usize = 128;

/// A join request, checked.
fn join_from(join: pb::Join) -> Result<Join, EventsError> {
    let bad = |m: &str| EventsError::BadJoin(m.to_string());
    if join.group.is_empty() || join.group.len() > MAX_GROUP_NAME {
        return Err(bad("group must be 1 to 128 bytes"));
    }
    let mut kinds = 0;
    for k in &join.kinds {
        let kind = match pb::EventKind::try_from(*k) {
            Ok(pb::EventKind::Connect) => EventKind::Connect,
            Ok(pb::EventKind::Disconnect) => EventKind::Disconnect,
            Ok(pb::EventKind::Subscribe) => EventKind::Subscribe,
            Ok(pb::EventKind::Unsubscribe) => EventKind::Unsubscribe,
            Ok(pb::EventKind::Publish) => EventKind::Publish,
            Ok(pb::EventKind::Rpc) => EventKind::Rpc,
            Ok(pb::EventKind::Unspecified) | Err(_) => {
                return Err(EventsError::BadJoin(format!("unknown event kind {k}")))
            }
        };
        kinds |= kind.bit();
    }
    if kinds == 0 {
        return Err(bad("kinds must name at least one event kind"));
    }
    if !join.rpc_methods.is_empty() && kinds & EventKind::Rpc.bit() == 0 {
        return Err(bad("rpc_methods needs EVENT_KIND_RPC in kinds"));
    }
    Ok(Join {
        group: join.group,
        kinds,
        rpc_methods: join.rpc_methods,
        window: join.window as usize,
    })
}

/// A member's message on the wire.
fn response(message: ToMember) -> pb::EventsResponse {
    use pb::events_response::Response;
    let response = match message {
        ToMember::Joined(joined) => Response::Joined(pb::Joined {
            member: joined.member.to_string(),
            resumed: joined.resumed,
            window: joined.window as u32,
            buffered: joined.buffered,
            node_id: joined.node_id,
        }),
        ToMember::Event(delivery) => Response::Event(event(&delivery)),
    };
    pb::EventsResponse {
        response: Some(response),
    }
}

fn event(delivery: &Delivery) -> pb::Event {
    use pb::event::Kind;
    let body = &delivery.body;
    let kind = match body.what.clone() {
        What::Connect { meta, info } => Kind::Connect(pb::ConnectEvent { meta, info }),
        What::Disconnect { code, reason } => Kind::Disconnect(pb::DisconnectEvent {
            code: u32::from(code),
            reason,
        }),
        What::Subscribe {
            channel,
            server_side,
        } => Kind::Subscribe(pb::SubscribeEvent {
            channel,
            server_side,
        }),
        What::Unsubscribe { channel, code } => {
            Kind::Unsubscribe(pb::UnsubscribeEvent { channel, code })
        }
        What::Publish {
            channel,
            data,
            offset,
            epoch,
        } => Kind::Publish(pb::PublishEvent {
            channel,
            data,
            offset,
            epoch,
        }),
        What::Rpc {
            rpc_id,
            method,
            data,
        } => Kind::Rpc(pb::RpcEvent {
            rpc_id,
            method,
            data,
        }),
        What::Lost {
            first_seq,
            last_seq,
        } => Kind::Lost(pb::LostEvent {
            first_seq,
            last_seq,
        }),
    };
    pb::Event {
        seq: delivery.seq,
        client: body.client.to_string(),
        user: body.user.to_string(),
        time_ms: body.time_ms,
        redelivered: delivery.redelivered,
        kind: Some(kind),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_stream::StreamExt;

    use super::*;
    use crate::config::Config;

    /// The race behind a stream that ended OK without `joined`: the backend half-closes right
    /// after its join, and the member leaves before its response stream is first polled.
    #[tokio::test]
    async fn joined_comes_first_even_when_the_member_has_already_left() {
        let events = Events::new(&Config::default(), Arc::from("node"));
        let join = Join {
            group: "g".into(),
            kinds: EventKind::Connect.bit(),
            rpc_methods: Vec::new(),
            window: 0,
        };
        let (member, receivers) = events.join(join).unwrap();
        let mut stream =
            MemberStream::new(events.clone(), member, receivers, CancellationToken::new());
        events.leave(member);
        let first = stream.next().await.expect("a response").unwrap();
        assert!(matches!(
            first.response,
            Some(pb::events_response::Response::Joined(_))
        ));
        assert!(stream.next().await.is_none(), "then the stream ends OK");
    }
}
