//! Publishes one JSON payload to a channel through the control API: the smallest backend.
//!
//!     cargo run --release --example publish -- chat:lobby '{"text":"hello"}'
//!
//! GRPC_URL overrides the address (default http://127.0.0.1:50051) and
//! API_KEY, when set, is sent as `authorization: Bearer <key>`.

use sidecast::pb::control_client::ControlClient;
use sidecast::pb::PublishRequest;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(channel), Some(data)) = (args.next(), args.next()) else {
        eprintln!("usage: publish CHANNEL JSON");
        std::process::exit(2);
    };
    let url = std::env::var("GRPC_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut client = ControlClient::connect(url).await?;
    let mut request = tonic::Request::new(PublishRequest {
        channel,
        data: data.into_bytes(),
        idempotency_key: String::new(),
        ..Default::default()
    });
    if let Ok(key) = std::env::var("API_KEY") {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    let reply = client.publish(request).await?.into_inner();
    println!("delivered to {} connection(s)", reply.delivered);
    Ok(())
}
