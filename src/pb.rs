//! The generated control API (package `sidecast.v1`, proto/sidecast/v1/control.proto): used
//! by the edges (`grpc`) only, never by the core.

tonic::include_proto!("sidecast.v1");
