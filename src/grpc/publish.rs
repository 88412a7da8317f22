//! Control.PublishStream: many publications over one stream. Each request is published in
//! turn and answered in order through a bounded queue, so a backend that does not read its
//! answers stops being read itself (HTTP/2 flow control does the rest): the stream holds at
//! most `ANSWERS` answers and one request at a time. A failed publication is an answer with
//! its status, never the end of the stream.

use std::pin::Pin;

use tokio::sync::mpsc;
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
/// stops, between two requests.
pub fn open(
    node: Node,
    inbound: Streaming<pb::PublishStreamRequest>,
    closing: CancellationToken,
) -> PublishStream {
    let (answers, out) = mpsc::channel(ANSWERS);
    tokio::spawn(serve(node, inbound, answers, closing));
    Box::pin(ReceiverStream::new(out))
}

type Answers = mpsc::Sender<Result<pb::PublishStreamResponse, Status>>;

async fn serve(
    node: Node,
    mut inbound: Streaming<pb::PublishStreamRequest>,
    answers: Answers,
    closing: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = closing.cancelled() => {
                let _ = answers.send(Err(ApiError::ShuttingDown.into())).await;
                return;
            }
            // The backend went away: nobody to answer.
            _ = answers.closed() => return,
            next = inbound.message() => next,
        };
        let request = match next {
            Ok(Some(request)) => request,
            // Half-closed: everything sent was answered; the stream ends OK.
            Ok(None) => return,
            Err(status) => {
                let _ = answers.send(Err(status)).await;
                return;
            }
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
        if answers.send(Ok(answer)).await.is_err() {
            return;
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
    let published = node
        .publish(&publication.channel, &publication.data, key)
        .await?;
    Ok(super::service::published_pb(published))
}
