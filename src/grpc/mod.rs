//! The control API listener: the tonic server for `sidecast.v1.Control`.
//!
//! `lib::run` calls [`serve`]; requests go through the API-key check, then to
//! `service::ControlService`; errors reach the wire only through `error::ApiError`.

mod error;
mod events;
mod service;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::node::Node;
use crate::pb::control_server::ControlServer;

pub use error::ApiError;
use service::ControlService;

/// Serves until `stop` is cancelled, letting calls in flight finish.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let key: Option<std::sync::Arc<str>> = node.config.api_key.as_ref().map(|k| k.expose().into());
    let check = move |request: Request<()>| -> Result<Request<()>, Status> {
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
    };
    tonic::transport::Server::builder()
        .add_service(ControlServer::with_interceptor(
            ControlService::new(node),
            check,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await
}

/// Compares without an early exit, so the key cannot be guessed byte by byte from timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
