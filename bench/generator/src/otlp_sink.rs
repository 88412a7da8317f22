//! A stand-in OTLP collector: takes every span export and counts the spans, so that the
//! server's span export has a real, cheap receiver in the tracing benchmark.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves on `listen` until killed, printing the spans received so far every 5 s.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let count = Arc::new(AtomicU64::new(0));
    let shown = count.clone();
    tokio::task::spawn_local(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let now = shown.load(Ordering::Relaxed);
            if now != last {
                eprintln!("otlp-sink: {now} spans");
                last = now;
            }
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Counter(count)))
        .serve(listen)
        .await?;
    Ok(())
}
