//! Black-box tests: a real node on loopback, real WebSocket and gRPC clients.
//! One test binary (one link) with a module per area.

mod auth;
mod backends;
mod bad_input;
mod bench_smoke;
mod binary;
mod cluster;
mod cluster_events;
mod cluster_faults;
mod coalesce;
mod control;
mod cookie;
mod events;
mod faults;
mod history;
mod jose;
mod limits;
mod ops;
mod publish_stream;
mod pubsub;
mod receipts;
mod redis_cluster;
mod slow_consumers;
mod soak;
mod sse;
mod stops;
mod support;
mod tls;
mod trace;
