//! The outbox through its public face: bounds, order, direct writes, the close.

use super::*;

/// Drains into memory (a writer that takes everything at once).
fn drain(outbox: &Outbox) -> (Vec<u8>, Drained) {
    let mut out = Vec::new();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match outbox.poll_drain(&mut cx, &mut out) {
        Poll::Ready(Ok(drained)) => (out, drained),
        other => panic!("a Vec takes everything: {other:?}"),
    }
}

#[test]
fn bounded_in_bytes() {
    let outbox = Outbox::new(10);
    assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
    assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
    assert_eq!(outbox.held(), 10);
    assert!(outbox.has_work());
    assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Overflow);
    assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Closed);
    let (out, drained) = drain(&outbox);
    assert_eq!(
        out,
        &crate::wire::frame::close(4004, "slow consumer")[..],
        "queued frames are dropped on overflow, the close is sent"
    );
    assert_eq!(
        drained,
        Drained {
            done: true,
            close_sent: true
        }
    );
    assert!(!outbox.has_work(), "the close is sent once");
    assert_eq!(drain(&outbox).0, b"");
}

/// A connected pair whose server side is known writable to tokio.
pub(super) async fn pair() -> (Arc<TcpStream>, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    server.writable().await.unwrap();
    (Arc::new(server), client)
}

#[tokio::test]
async fn idle_sockets_are_written_directly_and_in_order() {
    use tokio::io::AsyncReadExt;
    let (server, mut client) = pair().await;
    let metrics = Arc::new(Metrics::default());
    let outbox = Outbox::direct(64 << 20, server.clone(), metrics.clone());
    assert_eq!(outbox.push(Bytes::from_static(b"one ")), Push::Written);
    assert_eq!(
        outbox.push_later(Bytes::from_static(b"two ")),
        Push::Deferred
    );
    assert_eq!(
        outbox.push_later(Bytes::from_static(b"three ")),
        Push::Queued,
        "already waiting for a flush"
    );
    outbox.flush();
    assert_eq!(outbox.held(), 0);
    let mut got = vec![0; 14];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one two three ");
    assert_eq!(metrics.messages_sent.get(), 3);
    assert_eq!(metrics.socket_writes.get(), 2);

    // A client that does not read fills the socket: what it does not take stays queued,
    // whole frames and the rest of a partly written one, in order.
    let mut pushed = Vec::new();
    let mut i = 0u32;
    loop {
        let frame = Bytes::from(vec![(i % 251) as u8; 65_536 + i as usize]);
        pushed.extend_from_slice(&frame);
        i += 1;
        if outbox.push(frame) == Push::Queued {
            break;
        }
    }
    assert!(outbox.held() > 0);
    assert_eq!(outbox.push(Bytes::from_static(b"end")), Push::Queued);
    pushed.extend_from_slice(b"end");
    let expected = pushed.len();
    let reader = tokio::spawn(async move {
        let mut got = vec![0; expected];
        client.read_exact(&mut got).await.unwrap();
        got
    });
    while outbox.held() > 0 {
        server.writable().await.unwrap();
        outbox.flush();
    }
    assert!(reader.await.unwrap() == pushed, "every byte, in order");
}

#[tokio::test]
async fn overflow_keeps_the_rest_of_a_partly_written_frame() {
    let (server, _client) = pair().await;
    let limit = 256 << 10;
    let outbox = Outbox::direct(limit, server, Arc::new(Metrics::default()));
    // The client never reads: the socket fills, and some frame is written only in part,
    // or not at all.
    let mut last = 0;
    for i in 0..10_000u32 {
        last = 100_000 + i as usize;
        if outbox.push(Bytes::from(vec![1; last])) == Push::Queued {
            break;
        }
    }
    let held = outbox.held();
    assert!(held > 0 && held <= last);
    let partly_written = held < last;
    assert_eq!(
        outbox.push(Bytes::from(vec![2; limit])),
        Push::Overflow,
        "over the bound"
    );
    assert_eq!(outbox.ended().code, close::SLOW_CONSUMER);
    let frames = outbox.queued();
    if partly_written {
        assert_eq!(
            frames.len(),
            1,
            "the started frame is finished before the close"
        );
        assert_eq!(frames[0].len(), held);
    } else {
        assert!(frames.is_empty(), "whole frames are dropped");
    }
}

#[test]
fn close_follows_queued_frames_and_first_wins() {
    let outbox = Outbox::new(100);
    outbox.push(Bytes::from_static(b"a"));
    assert!(outbox.schedule_close(Close::new(4006, "bye")));
    assert!(!outbox.schedule_close(Close::new(1001, "later")));
    let mut expected = b"a".to_vec();
    expected.extend_from_slice(&crate::wire::frame::close(4006, "bye"));
    assert_eq!(drain(&outbox).0, expected);
}

proptest::proptest! {
    /// Whatever is pushed, the queue never holds more than its bound, gives back what it
    /// accepted in order, and an overflow ends in the slow-consumer close alone.
    #[test]
    fn the_queue_keeps_its_bound_and_its_order(
        frames in proptest::collection::vec(1usize..3000, 1..80),
        limit in 100usize..40_000,
    ) {
        let outbox = Outbox::new(limit);
        let mut accepted = Vec::new();
        let mut overflowed = false;
        for (i, len) in frames.into_iter().enumerate() {
            let frame = Bytes::from(vec![(i % 251) as u8; len]);
            match outbox.push(frame.clone()) {
                Push::Queued => accepted.extend_from_slice(&frame),
                Push::Overflow => {
                    overflowed = true;
                    break;
                }
                other => proptest::prop_assert!(false, "{other:?}"),
            }
            proptest::prop_assert!(outbox.held() <= limit);
        }
        let (out, drained) = drain(&outbox);
        if overflowed {
            proptest::prop_assert_eq!(&out[..], &crate::wire::frame::close(4004, "slow consumer")[..]);
            proptest::prop_assert!(drained.close_sent);
        } else {
            proptest::prop_assert_eq!(out, accepted);
        }
    }
}

fn tag(channel: &str, offset: u64, key: Option<&str>) -> Arc<Tag> {
    Arc::new(Tag {
        channel: Arc::from(channel),
        offset,
        key: key.map(|k| Box::from(k.as_bytes())),
    })
}

fn lost_frame(channel: &str, count: u64, offsets: Option<(u64, u64)>) -> Bytes {
    ServerMessage::Lost {
        channel,
        count,
        offsets,
    }
    .frame()
}

#[test]
fn a_full_queue_drops_its_oldest_tagged_publications_and_says_which() {
    let outbox = Outbox::new(300);
    let frame = |n: u8| Bytes::from(vec![n; 50]);
    assert_eq!(
        outbox.push(frame(0)),
        Push::Queued,
        "a reply: never dropped"
    );
    for offset in 1..=5 {
        let pushed = outbox.push_publication(frame(offset as u8), Some(&tag("a", offset, None)));
        assert_eq!(pushed, Push::Queued);
    }
    // 300 bytes queued: the next one makes room by dropping offsets 1 to 3 (two would not
    // leave room for the lost push, which takes their place, behind the reply).
    let pushed = outbox.push_publication(frame(6), Some(&tag("a", 6, None)));
    assert_eq!(pushed, Push::Queued);
    let queued = outbox.queued();
    assert_eq!(queued[0], frame(0));
    assert_eq!(queued[1], lost_frame("a", 3, Some((1, 3))));
    assert_eq!(&queued[2..], &[frame(4), frame(5), frame(6)]);
    assert!(outbox.held() <= 300);
    assert!(!outbox.is_closing());
}

#[test]
fn without_droppable_publications_a_full_queue_still_closes() {
    let outbox = Outbox::new(100);
    assert_eq!(outbox.push(Bytes::from(vec![1; 60])), Push::Queued);
    let pushed = outbox.push_publication(Bytes::from(vec![2; 60]), Some(&tag("a", 0, None)));
    assert_eq!(
        pushed,
        Push::Overflow,
        "the reply cannot go and the new one is too big"
    );
    assert!(outbox.is_closing());
}

#[test]
fn a_newer_publication_replaces_a_queued_one_with_the_same_key() {
    let outbox = Outbox::new(1 << 20);
    let frame = |n: u8| Bytes::from(vec![n; 10]);
    outbox.push_publication(frame(1), Some(&tag("c", 1, Some("\"ann\""))));
    outbox.push_publication(frame(2), Some(&tag("c", 2, Some("\"bob\""))));
    outbox.push_publication(frame(3), Some(&tag("d", 3, Some("\"ann\""))));
    outbox.push_publication(frame(4), Some(&tag("c", 4, Some("\"ann\""))));
    outbox.push_publication(frame(5), Some(&tag("c", 5, None)));
    outbox.push_publication(frame(6), Some(&tag("c", 6, None)));
    assert_eq!(
        outbox.queued(),
        [frame(2), frame(3), frame(4), frame(5), frame(6)],
        "ann's first cursor on c replaced; another channel's and keyless ones kept"
    );
    assert_eq!(outbox.held(), 50);
}
