//! The admin listener: liveness and readiness for probes, and Prometheus metrics.
//!
//! `GET /healthz` answers 200 while the process serves. `GET /readyz` answers 200 while the
//! node accepts connections and its engine serves (for Redis: reachable, and publications
//! come back through it), and 503 once it drains or while the engine does not, so a load balancer stops sending new
//! clients before the WebSockets are closed. `GET /metrics` is the Prometheus text format
//! (docs/operations.md names every metric).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Gauges;
use crate::node::Node;

/// Whether this node takes new work.
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }
}

pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    node: Node,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (health, node) = (health.clone(), node.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (health, node) = (health.clone(), node.clone());
                async move { Ok::<_, Infallible>(route(&req, &health, &node)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn route<B>(req: &Request<B>, health: &Health, node: &Node) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".to_string()),
        (&Method::GET, "/readyz") if !health.is_ready() => {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        (&Method::GET, "/readyz") if !node.engine_ready() => {
            (StatusCode::SERVICE_UNAVAILABLE, "engine not ready\n".into())
        }
        (&Method::GET, "/readyz") => (StatusCode::OK, "ready\n".into()),
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(metrics(health, node))));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            return response;
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn metrics(health: &Health, node: &Node) -> String {
    let counts = node.info();
    let events = node.events.stats();
    node.metrics.render(&Gauges {
        connections: counts.connections,
        users: counts.users,
        channels: counts.channels,
        subscriptions: counts.subscriptions,
        event_groups: events.groups,
        event_members: events.members,
        events_buffered: events.buffered,
        events_delivered: events.delivered,
        events_lost: events.lost,
        uptime_seconds: counts.uptime_seconds,
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        ready: health.is_ready(),
        engine_ready: node.engine_ready(),
    })
}
