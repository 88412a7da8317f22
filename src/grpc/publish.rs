//! Control.PublishStream: many publications over one stream. Each request is published in
//! turn and answered in order through a bounded queue, so a backend that does not read its
//! answers stops being read itself (HTTP/2 flow control does the rest): the stream holds at
//! most `ANSWERS` answers and one request at a time. A failed publication is an answer with
//! its status, never the end of the stream.
//!
//! Both Publish and PublishStream make each publication through [`one`]: with a
//! `traceparent` (the request's field, else the call's metadata) it is traced (`crate::trace`).

use std::pin::Pin;

use futures_util::{stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::broker::Published;
use crate::node::{Node, WithReceipt};
use crate::pb;
use crate::pb::publish_stream_response::Result as Answer;
use crate::trace;
use crate::wire::TraceParent;

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
    inherited: Option<TraceParent>,
    closing: CancellationToken,
) -> PublishStream {
    let (answers, out) = mpsc::channel(ANSWERS);
    let (end, ended) = oneshot::channel();
    tokio::spawn(async move {
        if let Some(status) = serve(node, inbound, inherited, answers, closing).await {
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
    inherited: Option<TraceParent>,
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
            result: Some(
                match publication(&node, request.publication, inherited).await {
                    Ok(published) => Answer::Published(published),
                    Err(status) => Answer::Error(pb::PublishError {
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    }),
                },
            ),
        };
        tokio::select! {
            sent = answers.send(answer) => if sent.is_err() { return None },
            // A backend that stopped reading does not hold the node's stop: this answer is
            // lost, and the docs say an unanswered publication may have been published.
            _ = closing.cancelled() => return Some(ApiError::ShuttingDown.into()),
        }
    }
}

async fn publication(
    node: &Node,
    publication: Option<pb::PublishRequest>,
    inherited: Option<TraceParent>,
) -> Result<pb::PublishResponse, Status> {
    let publication = publication.ok_or(ApiError::NoPublication)?;
    one(node, publication, inherited).await
}

/// One publication, in the caller's trace when it names one (its own `traceparent`, else
/// the call's metadata, `inherited`).
pub(super) async fn one(
    node: &Node,
    req: pb::PublishRequest,
    inherited: Option<TraceParent>,
) -> Result<pb::PublishResponse, Status> {
    let trace = match req.traceparent.as_str() {
        "" => inherited,
        text => Some(TraceParent::parse(text).map_err(ApiError::from)?),
    };
    let key = Some(req.idempotency_key.as_str()).filter(|k| !k.is_empty());
    let receipt = with_receipt(&req);
    let publish = node.publish(&req.channel, &req.data, key, receipt, trace.as_ref());
    let published = match &trace {
        Some(parent) => {
            publish
                .instrument(trace::publish(&req.channel, parent))
                .await
        }
        None => publish.await,
    }?;
    Ok(published_pb(published, trace.as_ref()))
}

/// The call's `traceparent` metadata (W3C Trace Context, as OpenTelemetry's gRPC
/// instrumentation sends it). An invalid one is ignored, as the W3C specification asks of a
/// header that proxies and meshes may set: the call goes on untraced (its answer's
/// `trace_id` is empty). The request's own `traceparent` field is checked strictly instead.
pub(super) fn traceparent(metadata: &MetadataMap) -> Option<TraceParent> {
    let value = metadata.get("traceparent")?;
    let parsed = value
        .to_str()
        .map_err(|_| crate::wire::traceparent::BadTraceParent::Shape)
        .and_then(TraceParent::parse);
    match parsed {
        Ok(parent) => Some(parent),
        Err(e) => {
            tracing::debug!("traceparent metadata ignored: {e}");
            None
        }
    }
}

/// What a PublishRequest asks of its delivery receipt.
fn with_receipt(req: &pb::PublishRequest) -> WithReceipt {
    match (req.receipt, req.receipt_timeout_ms) {
        (false, _) => WithReceipt::No,
        (true, 0) => WithReceipt::Default,
        (true, ms) => WithReceipt::Within(std::time::Duration::from_millis(u64::from(ms))),
    }
}

pub(super) fn published_pb(
    published: Published,
    trace: Option<&TraceParent>,
) -> pb::PublishResponse {
    pb::PublishResponse {
        offset: published.offset,
        epoch: published.epoch,
        delivered: published.delivered,
        // A replay was published by the first call, in that call's trace (if any).
        trace_id: trace
            .filter(|_| !published.replayed)
            .map(|t| t.trace_id.to_string())
            .unwrap_or_default(),
    }
}
