//! The fixed state of one connection, measured with `size_of`: what
//! `examples/memory_breakdown.rs` prints next to its heap measurements, so that the bytes of
//! an idle connection can be attributed to the parts that hold them.

use std::mem::{size_of, size_of_val};

use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::outbox::Outbox;
use crate::ws::session;
use crate::ws::writer::{Liveness, Writer};

/// (part, bytes) for one connection's fixed state. The futures are measured unstarted, which
/// is their full size: a future is as large as its largest suspended state.
#[doc(hidden)]
pub fn connection_state_sizes(node: &Node) -> Vec<(&'static str, usize)> {
    let token = CancellationToken::new();
    let mut request = hyper::Request::builder()
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(())
        .expect("a valid request");
    let (_, upgrade) = fastwebsockets::upgrade::upgrade(&mut request).expect("an upgrade request");
    let ticket = node
        .admission
        .admit(
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::time::Instant::now(),
        )
        .expect("a place for the measurement");
    let session = session::run(
        upgrade,
        node.clone(),
        ticket,
        None,
        token.clone(),
        token.clone(),
    );
    let writer = Writer {
        io: tokio::io::sink(),
        outbox: std::sync::Arc::new(Outbox::new(1)),
        live: std::sync::Arc::default(),
        config: node.config.clone(),
        metrics: node.metrics.clone(),
        conn: token.clone(),
        shutdown: token,
    }
    .run();
    vec![
        (
            "session task future (reader and session state)",
            size_of_val(&session),
        ),
        (
            "writer task future (with W = Sink; the socket half adds a pointer)",
            size_of_val(&writer),
        ),
        ("outbox (queue, lock, wake-up)", size_of::<Outbox>()),
        ("liveness atomics", size_of::<Liveness>()),
    ]
}
