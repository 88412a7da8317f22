//! A client's `rpc`: handed to a backend through the event stream, answered by a task of
//! its own so that the connection goes on reading while it waits (at most rpc_timeout).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::events::RpcAnswer;
use crate::node::{Node, NodeError};
use crate::outbox::Outbox;
use crate::wire::{ErrorCode, ServerMessage};
use crate::ws::error::CommandError;

/// Longest rpc method name.
const MAX_METHOD: usize = 256;

/// One rpc command.
pub(crate) struct Call<'a> {
    /// The command's id, echoed by the reply.
    pub id: u64,
    pub client: &'a str,
    pub user: &'a str,
    pub method: &'a str,
    pub data: &'a [u8],
}

/// Sends the rpc to a backend and spawns the wait for its answer, which is queued to
/// `outbox` as the command's reply. `in_flight` counts the connection's waiting rpcs; `conn`
/// is cancelled when the connection ends.
pub(crate) fn start(
    node: &Node,
    call: Call<'_>,
    outbox: Arc<Outbox>,
    in_flight: Arc<AtomicUsize>,
    conn: CancellationToken,
) -> Result<(), CommandError> {
    if call.method.is_empty() || call.method.len() > MAX_METHOD {
        return Err(CommandError::BadRequest(format!(
            "method must be 1 to {MAX_METHOD} bytes"
        )));
    }
    let max = node.config.max_publication_size;
    if call.data.len() > max {
        let size = call.data.len();
        return Err(NodeError::TooLarge { size, max }.into());
    }
    let max = node.config.max_rpc_in_flight;
    if in_flight.load(Relaxed) >= max {
        return Err(CommandError::RpcInFlight(max));
    }
    let events = node.events.clone();
    let metrics = node.metrics.clone();
    let (rpc_id, answer) = events
        .rpc(call.client, call.user, call.method, call.data)
        .map_err(|e| {
            metrics.record_rpc("no_backend");
            CommandError::NoBackend(e.to_string())
        })?;
    in_flight.fetch_add(1, Relaxed);
    let (id, timeout) = (call.id, node.config.rpc_timeout);
    tokio::spawn(async move {
        let answer = tokio::select! {
            answer = tokio::time::timeout(timeout, answer) => answer,
            _ = conn.cancelled() => {
                events.forget_rpc(&rpc_id);
                return;
            }
        };
        events.forget_rpc(&rpc_id);
        in_flight.fetch_sub(1, Relaxed);
        let unavailable = |message: &'static str| {
            metrics.record_error(ErrorCode::Unavailable);
            ServerMessage::Error {
                id,
                code: ErrorCode::Unavailable,
                message,
            }
            .frame()
        };
        let reply = match answer {
            Ok(Ok(RpcAnswer::Data(data))) => {
                metrics.record_rpc("ok");
                ServerMessage::RpcData { id, data: &data }.frame()
            }
            Ok(Ok(RpcAnswer::Error { code, message })) => {
                metrics.record_rpc("error");
                metrics.record_error(ErrorCode::RpcError);
                ServerMessage::RpcError {
                    id,
                    code,
                    message: &message,
                }
                .frame()
            }
            Ok(Ok(RpcAnswer::Gone) | Err(_)) => {
                metrics.record_rpc("backend_gone");
                unavailable("the backend went away before answering")
            }
            Err(_) => {
                metrics.record_rpc("timeout");
                unavailable("no answer within rpc_timeout")
            }
        };
        outbox.push(reply);
    });
    Ok(())
}
