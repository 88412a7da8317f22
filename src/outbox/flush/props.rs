//! Property tests of how a flush is written: the route chosen from the number of sockets,
//! whether the node is behind and whether there is a runtime keeps each route's promise;
//! and whichever route is taken, every socket gets every frame queued to it once, in order.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tokio::io::AsyncReadExt;

use super::*;
use crate::metrics::Metrics;
use crate::outbox::tests::pair;
use crate::outbox::Push;

proptest! {
    /// The route takes nothing but its inputs (no state), so it is a function of them by
    /// construction; what matters is what each route promises.
    #[test]
    fn the_route_keeps_its_promises(
        sockets in 0usize..100_000,
        behind: bool,
        in_runtime: bool,
    ) {
        let route = Flush::route(sockets, behind, in_runtime);
        if !in_runtime {
            // Nothing to spawn on: written here.
            prop_assert_eq!(route, Route::Inline);
        } else if sockets <= Flush::INLINE {
            // A small fan-out waits neither for a task switch nor for a turn.
            prop_assert_eq!(route, Route::Inline);
        } else if behind {
            // Behind, a larger one waits for the flushing task's next turn.
            prop_assert_eq!(route, Route::Queued);
        } else {
            prop_assert_eq!(route, Route::Task);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_route_writes_every_frame_once_in_order(
        sockets in 1usize..3 * Flush::INLINE,
        rounds in proptest::collection::vec((any::<bool>(), 1usize..300), 1..5),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(written_in_order(sockets, rounds))?;
    }
}

/// Queues one frame per round to every socket, each round's deferred sockets flushed
/// behind or not; then lets the flushing task run, plays the connections' tasks (write when
/// woken) until nothing is held, and reads what each socket got.
async fn written_in_order(sockets: usize, rounds: Vec<(bool, usize)>) -> Result<(), TestCaseError> {
    let pacing = Arc::new(Pacing::new(Duration::from_millis(1)));
    let mut pairs = Vec::new();
    for _ in 0..sockets {
        let (server, client) = pair().await;
        let outbox = Arc::new(Outbox::direct(
            1 << 20,
            server,
            Arc::new(Metrics::default()),
        ));
        pairs.push((outbox, client, Vec::new()));
    }
    for (round, (behind, len)) in rounds.iter().enumerate() {
        let mut flush = Flush::new(pacing.clone());
        for (i, (outbox, _, expected)) in pairs.iter_mut().enumerate() {
            let frame: Vec<u8> = (0..*len).map(|j| (round * 31 + i * 7 + j) as u8).collect();
            expected.extend_from_slice(&frame);
            match outbox.push_later(Bytes::from(frame)) {
                Push::Deferred => flush.add(outbox),
                Push::Queued | Push::Written => {}
                other => prop_assert!(false, "{other:?}"),
            }
        }
        flush.run_as(*behind);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    while pairs.iter().any(|(outbox, _, _)| outbox.held() > 0) {
        prop_assert!(
            tokio::time::Instant::now() < deadline,
            "frames left unwritten"
        );
        for (outbox, _, _) in &pairs {
            if outbox.poll_wait(&mut cx) == Poll::Ready(()) {
                outbox.flush();
            }
        }
        tokio::task::yield_now().await;
    }
    for (_, client, expected) in &mut pairs {
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .map_err(|_| TestCaseError::fail("bytes missing"))?
            .unwrap();
        prop_assert_eq!(&got, expected);
        let mut more = [0u8; 1];
        prop_assert!(
            client.try_read(&mut more).is_err(),
            "bytes beyond the frames"
        );
    }
    Ok(())
}
