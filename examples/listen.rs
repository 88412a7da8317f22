//! A minimal WebSocket client: connects with a token, subscribes to a channel and prints
//! every message it receives, answering heartbeats.
//!
//!     cargo run --release --example listen -- "$TOKEN" chat:lobby
//!
//! WS_URL overrides the address (default ws://127.0.0.1:8080/ws).

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(token), Some(channel)) = (args.next(), args.next()) else {
        eprintln!("usage: listen TOKEN CHANNEL");
        std::process::exit(2);
    };
    let url = std::env::var("WS_URL").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let connect = serde_json::json!({"id": 1, "op": "connect", "token": token});
    ws.send(Message::text(connect.to_string())).await?;
    let subscribe = serde_json::json!({"id": 2, "op": "subscribe", "channel": channel});
    ws.send(Message::text(subscribe.to_string())).await?;
    while let Some(message) = ws.next().await {
        match message? {
            Message::Text(text) => {
                println!("{text}");
                if text.as_str() == r#"{"type":"ping"}"# {
                    ws.send(Message::text(r#"{"op":"pong"}"#)).await?;
                }
            }
            Message::Close(frame) => {
                println!("closed: {frame:?}");
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
