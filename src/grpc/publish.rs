//! Control.PublishStream: many publications over one stream. Each request is published in
//! turn and answered in order through a bounded queue, so a backend that does not read its
//! answers stops being read itself (HTTP/2 flow control does the rest): the stream holds at
//! most `ANSWERS` answers and one request at a time. A failed publication is an answer with
//! its status, never the end of the stream.

use std::pin::Pin;

use futures_util::{stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::node::Node;
use crate::pb;
use crate::pb::publish_stream_response::Result as Answer;

use super::error::ApiError;

/// Answers queued for a backend that reads them slower than it publishes.
const ANSWERS: usize = 256;

pub type PublishStream =
    Pin<Box<dyn Stream<Item = Result<pb::PublishStreamResponse, Status>> + Send>>;

/// Starts answering the stream's requests; `closing` ends it (UNAVAILABLE) when the node
/// stops, between two requests or while an answer waits for room.
pub fn open(
    node: Node,
    inbound: Streaming<pb::PublishStreamRequest>,
    closing: CancellationToken,
) -> PublishStream {
    let (answers, out) = mpsc::channel(ANSWERS);
    let (end, ended) = oneshot::channel();
    tokio::spawn(async move {
        if let Some(status) = serve(node, inbound, answers, closing).await {
            let _ = end.send(status);
        }
    });
    // The status comes after every queued answer, whether or not the queue had room for it.
    let status = stream::once(ended).filter_map(|end| async move { end.ok().map(Err) });
    Box::pin(ReceiverStream::new(out).map(Ok).chain(status))
}

/// Answers requests until the stream ends; returns the status it ends with, `None` for OK
/// (the backend half-closed and every request was answered, or it went away).
async fn serve(
    node: Node,
    mut inbound: Streaming<pb::PublishStreamRequest>,
    answers: mpsc::Sender<pb::PublishStreamResponse>,
    closing: CancellationToken,
) -> Option<Status> {
    loop {
        let next = tokio::select! {
            biased;
            _ = closing.cancelled() => return Some(ApiError::ShuttingDown.into()),
            // The backend went away: nobody to answer.
            _ = answers.closed() => return None,
            next = inbound.message() => next,
        };
        let request = match next {
            Ok(Some(request)) => request,
            Ok(None) => return None,
            // Among others, a request over the decoding limit (OUT_OF_RANGE).
            Err(status) => return Some(status),
        };
        let answer = pb::PublishStreamResponse {
            id: request.id,
            result: Some(match publish(&node, request.publication).await {
                Ok(published) => Answer::Published(published),
                Err(status) => Answer::Error(pb::PublishError {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                }),
            }),
        };
        tokio::select! {
            sent = answers.send(answer) => if sent.is_err() { return None },
            // A backend that stopped reading does not hold the node's stop: this answer is
            // lost, and the docs say an unanswered publication may have been published.
            _ = closing.cancelled() => return Some(ApiError::ShuttingDown.into()),
        }
    }
}

/// One publication, as the unary Publish makes it.
async fn publish(
    node: &Node,
    publication: Option<pb::PublishRequest>,
) -> Result<pb::PublishResponse, Status> {
    let publication = publication.ok_or(ApiError::NoPublication)?;
    let key = Some(publication.idempotency_key.as_str()).filter(|k| !k.is_empty());
    let receipt = super::service::with_receipt(&publication);
    let published = node
        .publish(&publication.channel, &publication.data, key, receipt)
        .await?;
    Ok(super::service::published_pb(published))
}
