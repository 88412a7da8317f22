//! The control API listener: the tonic server for `sidecast.v1.Control`.
//!
//! `lib::run` calls [`serve`]; requests go through the API-key check, then to
//! `service::ControlService`; errors reach the wire only through `error::ApiError`. The same
//! listener serves gRPC health checking (grpc.health.v1, open) and server reflection (v1 and
//! v1alpha, behind the API key), so grpcurl, grpcui and health probes work without the proto.

mod conn;
mod counted;
mod error;
mod events;
mod publish;
mod service;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::node::Node;
use crate::pb::control_server::ControlServer;

pub use error::ApiError;
use service::ControlService;

/// The encoded descriptors of proto/, served by reflection.
const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sidecast_descriptor");

/// gRPC health (grpc.health.v1): SERVING for "" and `sidecast.v1.Control` while the node
/// serves, NOT_SERVING once it drains.
#[derive(Clone)]
pub struct GrpcHealth {
    reporter: HealthReporter,
}

impl GrpcHealth {
    fn new(reporter: HealthReporter) -> GrpcHealth {
        GrpcHealth { reporter }
    }

    /// The node is draining: health checks answer NOT_SERVING.
    pub async fn set_draining(&self) {
        for name in ["", CONTROL] {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }

    /// Ends the health Watch streams, which would otherwise keep the server from stopping.
    pub async fn close(&mut self) {
        for name in ["", CONTROL] {
            self.reporter.clear_service_status(name).await;
        }
    }
}

const CONTROL: &str = "sidecast.v1.Control";

/// Binds the health service; `serve` then runs the listener with it.
pub async fn health() -> (GrpcHealth, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(CONTROL, ServingStatus::Serving)
        .await;
    (GrpcHealth::new(reporter), service)
}

/// Serves until `stop` is cancelled, letting calls in flight finish; `streams_closing`,
/// cancelled before it, ends the publish streams (which would otherwise keep going). The
/// control service and reflection need the API key when one is configured; health checks
/// never do, so that probes work without it.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    node: Node,
    health: HealthServer<impl Health>,
    streams_closing: CancellationToken,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let key: Option<std::sync::Arc<str>> = node.config.api_key.as_ref().map(|k| k.expose().into());
    let check = api_key_check(key);
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the build's descriptors are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the build's descriptors are valid");
    // Dead peers of established connections are found by HTTP/2 pings; silent new ones by
    // `conn` (no call within header_read_timeout).
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(node.config.grpc_keepalive_interval))
        .http2_keepalive_timeout(Some(node.config.grpc_keepalive_timeout));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let limits = (
        node.config.max_control_connections,
        node.config.header_read_timeout,
    );
    builder
        .layer(conn::MarkLayer)
        .layer(counted::CountLayer {
            metrics: node.metrics.clone(),
        })
        .add_service(health)
        .add_service(InterceptedService::new(reflection_v1, check.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, check.clone()))
        .add_service(ControlServer::with_interceptor(
            ControlService::new(node, streams_closing),
            check,
        ))
        .serve_with_incoming_shutdown(
            accept(listener, limits, stop.clone()),
            stop.cancelled_owned(),
        )
        .await
}

/// Accepts connections for tonic, backing off when accept fails (for example out of file
/// descriptors) instead of spinning: tonic itself retries at once. Past
/// `max_control_connections` a new connection is closed at once.
fn accept(
    listener: TcpListener,
    (max, first_call): (usize, Duration),
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<conn::ControlConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let open = conn::Open::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(conn) = conn::ControlConn::accept(stream, &open, max, first_call)
                    else {
                        tracing::warn!(%peer, "control connection refused: max_control_connections");
                        continue;
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The API key check: `authorization: Bearer <key>` when a key is configured.
fn api_key_check(
    key: Option<std::sync::Arc<str>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| -> Result<Request<()>, Status> {
        let Some(key) = &key else { return Ok(request) };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), key.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong API key (authorization: Bearer <key>)",
            ))
        }
    }
}

/// Compares without an early exit, so the key cannot be guessed byte by byte from timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
