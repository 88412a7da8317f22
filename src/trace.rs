//! The spans of a traced publication, and their export.
//!
//! A publication is traced when its Publish carries a W3C `traceparent`. Its hops are spans
//! of target `sidecast::trace`, children of the backend's span:
//!
//! - `publish`: the gRPC call, from the request to the answer;
//! - `engine.publish`: the engine's part (`engine` = memory or redis): for Redis, the
//!   script's round trip;
//! - `fanout`: queuing the encoded frame to the channel's subscribers on one node (on
//!   Redis, each node that delivers it has its own, child of `engine.publish` on the
//!   publishing node);
//! - `writes`: writing the queued frames to the sockets, until the last of them is written
//!   or handed to its connection's task (`route`).
//!
//! The traceparent travels with the publication (in the Redis envelope, with the span id
//! of `engine.publish` when spans are exported, else as it came), so the trace id reaches
//! every node's `pub` push and receipt whether or not this node exports anything.
//!
//! Untraced publications make no span at all. With `otlp_endpoint` set, spans of sampled
//! traces (the traceparent's flag) are sent in batches over OTLP/gRPC; the exporter sees only
//! this target, and the log output never does.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId, TraceState,
    TracerProvider,
};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, Sampler,
    SdkTracerProvider,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::wire::{TraceId, TraceParent};

/// The target of every span here: what the exporter takes and the log output leaves out.
pub const TARGET: &str = "sidecast::trace";

/// The gRPC call of a traced Publish, child of the backend's span.
pub fn publish(channel: &str, parent: &TraceParent) -> Span {
    let span = tracing::info_span!(
        target: "sidecast::trace",
        "publish",
        otel.kind = "server",
        channel = %channel,
        trace_id = %parent.trace_id,
    );
    adopt(&span, parent);
    span
}

/// The engine's part of a publication, child of the current span.
pub fn engine(engine: &'static str, channel: &str) -> Span {
    tracing::info_span!(target: "sidecast::trace", "engine.publish", engine, channel = %channel)
}

/// Queuing a publication to a node's subscribers, child of the span `parent` names (the
/// engine's, on this node or the one that published it).
pub fn fanout(channel: &str, offset: Option<u64>, parent: &TraceParent) -> Span {
    let span = tracing::info_span!(
        target: "sidecast::trace",
        "fanout",
        channel = %channel,
        offset,
        subscribers = tracing::field::Empty,
    );
    adopt(&span, parent);
    span
}

/// Writing a fan-out's frames, child of the current span; `sockets` and `route` are
/// recorded when the writing starts.
pub fn writes() -> Span {
    tracing::info_span!(
        target: "sidecast::trace",
        "writes",
        sockets = tracing::field::Empty,
        route = tracing::field::Empty,
    )
}

/// The traceparent to hand on from inside `span`: its own context when spans are exported
/// (the next hop's spans are then its children), else `parent` as it came.
pub fn handed_on(span: &Span, parent: &TraceParent) -> TraceParent {
    let cx = span.context();
    let context = cx.span().span_context().clone();
    if !context.is_valid() {
        return *parent;
    }
    TraceParent {
        trace_id: TraceId(context.trace_id().to_bytes()),
        parent_id: context.span_id().to_bytes(),
        flags: context.trace_flags().to_u8(),
    }
}

/// Makes `span` a child of a span of another process.
fn adopt(span: &Span, parent: &TraceParent) {
    let remote = SpanContext::new(
        OtelTraceId::from_bytes(parent.trace_id.0),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    // Without an exporter there is no layer to take it: nothing to do.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The running export of spans to an OTLP collector.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `endpoint` (OTLP/gRPC) as service `sidecast`. Must
    /// be called inside the node's runtime: the batches are sent from a task of it, every
    /// `batch_delay` or 512 spans, each tried once: a batch the collector does not take is
    /// dropped (the SDK logs it), and at most 2,048 spans wait meanwhile.
    pub fn start<S>(
        endpoint: &str,
        batch_delay: std::time::Duration,
    ) -> Result<(Exporter, impl Layer<S>), String>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| format!("otlp_endpoint {endpoint:?}: {e}"))?;
        let batches = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(batch_delay)
                    .build(),
            )
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("sidecast")
            .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            // Only the backend's traces, as it sampled them: a span here never starts one.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sidecast");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter_fn(|meta| meta.target() == TARGET));
        Ok((Exporter { provider }, layer))
    }

    /// Sends what is still batched, waiting at most `within` (a collector that does not
    /// answer must not hold the process's exit); call from outside the runtime's tasks,
    /// with the runtime still running.
    pub fn stop(self, within: std::time::Duration) {
        let (done, finished) = std::sync::mpsc::channel();
        let provider = self.provider;
        std::thread::spawn(move || {
            let _ = done.send(provider.shutdown());
        });
        match finished.recv_timeout(within) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("span export did not finish: {e}"),
            Err(_) => tracing::warn!(
                ?within,
                "span export did not finish in time: the rest is dropped"
            ),
        }
    }
}
