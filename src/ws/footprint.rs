//! The fixed state of one connection, measured with `size_of`: what
//! `examples/memory_breakdown.rs` prints next to its heap measurements, so that the bytes of
//! an idle connection can be attributed to the parts that hold them.

use std::mem::size_of;

use crate::node::Node;
use crate::outbox::Outbox;
use crate::ws::clock::Liveness;
use crate::ws::connection::Connection;
use crate::ws::socket::{TcpRead, TcpWrite};

/// (part, bytes) for one connection's fixed state on plain TCP. The futures' sizes are
/// those of their types (a future is as large as its largest suspended state), read from the
/// functions' signatures, so nothing has to be connected to measure them.
#[doc(hidden)]
pub fn connection_state_sizes(_node: &Node) -> Vec<(&'static str, usize)> {
    vec![
        (
            "connection state (handler, reader, writing side, admission ticket)",
            size_of::<Connection<TcpRead, TcpWrite>>(),
        ),
        (
            "its task's future besides that state (waiting for a frame)",
            returned_size(Connection::<TcpRead, TcpWrite>::run),
        ),
        ("outbox (queue, lock, wake-up)", size_of::<Outbox>()),
        ("liveness (inside the handler)", size_of::<Liveness>()),
    ]
}

/// The size of what `f` returns (here: an async fn's future).
fn returned_size<A, R>(_f: fn(A) -> R) -> usize {
    size_of::<R>()
}
