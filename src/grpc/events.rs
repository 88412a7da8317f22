//! Control.Events on the wire: the join handshake, the acknowledgement reader, and the
//! response stream that leaves the group when the backend goes away. The delivery rules live
//! in `crate::events`; this file only moves messages between tonic and them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::events::{Events, EventsError, Join, MemberId, Receivers};
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
        Some(Request::Join(join)) => Join::from_request(join)?,
        _ => return Err(EventsError::JoinFirst.into()),
    };
    let (member, receivers) = events.join(join)?;
    let stop = CancellationToken::new();
    tokio::spawn(read_acks(events.clone(), member, inbound, stop.clone()));
    Ok(Box::pin(MemberStream {
        receivers,
        events,
        member,
        stop,
        ended: false,
    }))
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
    receivers: Receivers,
    events: Events,
    member: MemberId,
    stop: CancellationToken,
    ended: bool,
}

impl Stream for MemberStream {
    type Item = Result<pb::EventsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(reason) = self.receivers.signal.gone() {
            self.ended = true;
            return Poll::Ready(reason.map(|e| Err(ApiError::from(e).into())));
        }
        // Removal drops the senders, which wakes this stream to see the signal.
        match self.receivers.events.poll_recv(cx) {
            Poll::Ready(Some(response)) => return Poll::Ready(Some(Ok(response))),
            Poll::Ready(None) => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        self.receivers
            .rpcs
            .poll_recv(cx)
            .map(|response| response.map(Ok))
    }
}

impl Drop for MemberStream {
    fn drop(&mut self) {
        self.stop.cancel();
        self.events.leave(self.member);
    }
}
