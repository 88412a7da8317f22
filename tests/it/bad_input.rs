//! Bad input on the socket and backpressure: each kind gets its documented answer, and the
//! other clients are not disturbed.

use serde_json::json;
use sidecast::pb;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, TestServer};

fn text_fragment(payload: &[u8], first: bool, fin: bool) -> Message {
    let opcode = if first {
        OpCode::Data(Data::Text)
    } else {
        OpCode::Data(Data::Continue)
    };
    Message::Frame(Frame::message(payload.to_vec(), opcode, fin))
}

#[tokio::test]
async fn unanswerable_frames_close_4500_and_others_carry_on() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.user("by", json!({})).await;
    let cases: Vec<(Message, u16, &str)> = vec![
        (
            Message::binary(vec![1, 2, 3]),
            4500,
            "binary frames are not supported",
        ),
        (Message::text("not json"), 4500, "expected a JSON object"),
        (Message::text("[1,2]"), 4500, "expected a JSON object"),
        (Message::text(r#"{"op":"ping"}"#), 4500, "missing id"),
        (
            Message::text(r#"{"id":"7","op":"ping"}"#),
            4500,
            "id must be a non-negative integer",
        ),
    ];
    for (message, code, reason) in cases {
        let mut client = server.user("bad", json!({})).await;
        client.send_raw(message).await;
        assert_eq!(client.closed().await, (code, reason.to_string()));
    }
    assert_eq!(
        bystander.request(json!({"id": 2, "op": "ping"})).await["result"],
        json!({})
    );
}

#[tokio::test]
async fn oversize_frames_and_fragmented_messages_close_1009() {
    let server = TestServer::start(&[("max_message_size", "1024")]).await;
    let mut big = server.user("big", json!({})).await;
    let padding = "x".repeat(1100);
    big.send(json!({"id": 2, "op": "ping", "pad": padding}))
        .await;
    assert_eq!(big.closed().await, (1009, "message too big".into()));

    // Small frames that add up past the limit: fastwebsockets alone would not notice.
    let mut frag = server.user("frag", json!({})).await;
    frag.send_raw(text_fragment(
        br#"{"id":2,"op":"ping","pad":""#,
        true,
        false,
    ))
    .await;
    for _ in 0..20 {
        frag.send_raw(text_fragment(&[b'x'; 100], false, false))
            .await;
    }
    assert_eq!(frag.closed().await, (1009, "message too big".into()));

    // Within the limit, a fragmented command is reassembled and answered.
    let mut ok = server.user("ok", json!({})).await;
    ok.send_raw(text_fragment(br#"{"id":3,"#, true, false))
        .await;
    ok.send_raw(text_fragment(br#""op":"#, false, false)).await;
    ok.send_raw(text_fragment(br#""ping"}"#, false, true)).await;
    assert_eq!(ok.recv().await, json!({"id": 3, "result": {}}));
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let server = TestServer::start(&[]).await;
    let mut client = server.user("u", json!({})).await;
    client
        .send_raw(Message::Frame(Frame::message(
            vec![b'{', 0xff, b'}'],
            OpCode::Data(Data::Text),
            true,
        )))
        .await;
    assert_eq!(client.closed().await.0, 1007);
    let mut split = server.user("u", json!({})).await;
    split
        .send_raw(text_fragment(&[b'"', 0xc3], true, false))
        .await;
    split
        .send_raw(text_fragment(&[0x28, b'"'], false, true))
        .await;
    assert_eq!(split.closed().await, (1007, "invalid UTF-8".into()));
}

// About time: the heartbeat is a clock.
#[tokio::test]
async fn heartbeat_closes_silent_clients_4007() {
    let server = TestServer::start(&[("ping_interval", "300ms"), ("pong_timeout", "300ms")]).await;
    let mut silent = server.user("s", json!({})).await;
    let mut alive = server.user("a", json!({})).await;
    assert_eq!(silent.recv_any().await, json!({"type": "ping"}));
    for _ in 0..3 {
        assert_eq!(alive.recv_any().await, json!({"type": "ping"}));
        alive.send(json!({"op": "pong"})).await;
    }
    assert_eq!(
        silent.closed().await,
        (4007, "no pong within pong_timeout".into())
    );
    assert_eq!(
        alive.request(json!({"id": 2, "op": "ping"})).await["result"],
        json!({})
    );
}

#[tokio::test]
async fn slow_consumer_is_closed_4004_while_a_fast_one_gets_everything() {
    const TOTAL: u64 = 1500;
    const BATCH: u64 = 25;
    let server = TestServer::start(&[
        ("max_queue_bytes", "131072"),
        ("max_publication_size", "16384"),
    ])
    .await;
    let mut grpc = server.grpc().await;
    let mut fast = server.user("fast", json!({"channels": ["firehose"]})).await;
    fast.subscribe(2, "firehose").await;
    let mut slow = server
        .user_small_buffer("slow", json!({"channels": ["firehose"]}))
        .await;
    slow.subscribe(2, "firehose").await;

    let (progress, mut seen) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for n in 0..TOTAL {
            let m = fast.recv().await;
            assert_eq!(
                m["data"]["n"], n,
                "fast subscriber sees every publication in order"
            );
            progress.send_replace(n + 1);
        }
    });
    let pad = "p".repeat(8000);
    for batch in 0..TOTAL / BATCH {
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            let data = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
            grpc.publish(pb::PublishRequest {
                channel: "firehose".into(),
                data: data.into_bytes(),
                idempotency_key: String::new(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // Wait for the fast reader, so that only the slow one falls behind.
        seen.wait_for(|n| *n >= (batch + 1) * BATCH).await.unwrap();
    }
    reader.await.unwrap();
    let (messages, code) = slow.drain_until_close().await;
    assert_eq!(code, 4004);
    assert!(
        (messages.len() as u64) < TOTAL,
        "the slow consumer fell behind"
    );
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            m["data"]["n"], i as u64,
            "what it got is an in-order prefix"
        );
    }
}

#[tokio::test]
async fn a_write_that_does_not_finish_drops_the_socket() {
    let server = TestServer::start(&[
        ("max_queue_bytes", "67108864"),
        ("max_publication_size", "65536"),
        ("write_timeout", "300ms"),
    ])
    .await;
    let stuck = stuck_behind_200_publications(&server).await;
    server.until_no_connections().await;
    drop(stuck); // held open until then: the write timeout, not a close, ended it
}

/// The slow consumer's 4004 is scheduled, but the socket never takes it: the write timeout
/// drops the socket without a Close, and that is what the disconnect event and the metric
/// report (1006 "write timed out …"), not a close the client never saw.
#[tokio::test]
async fn a_close_that_could_not_be_written_is_reported_as_1006() {
    let server = TestServer::start(&[
        ("max_queue_bytes", "262144"),
        ("max_publication_size", "65536"),
        ("write_timeout", "300ms"),
    ])
    .await;
    let mut ends =
        crate::events::Member::join(&server, "ends", &[pb::EventKind::Disconnect], 0).await;
    let stuck = stuck_behind_200_publications(&server).await;
    let event = ends.next().await;
    let Some(pb::event::Kind::Disconnect(ended)) = event.kind else {
        panic!("{event:?}");
    };
    assert_eq!(
        (ended.code, ended.reason.as_str()),
        (
            1006,
            "write timed out before its close 4004 could be written"
        )
    );
    let (_, metrics) = crate::support::http_get(server.admin, "/metrics").await;
    let count = |code: &str| {
        crate::support::sample(
            &metrics,
            &format!("sidecast_disconnects_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(
        (count("1006"), count("4004")),
        (Some(1.0), None),
        "{metrics}"
    );
    assert_eq!(
        crate::support::sample(&metrics, "sidecast_slow_consumer_closes_total"),
        Some(1.0),
        "still counted as a slow consumer"
    );
    drop(stuck);
}

/// A subscriber that never reads, and 200 publications of 60 KB to it: most of them wait in
/// its queue.
async fn stuck_behind_200_publications(server: &TestServer) -> Client {
    let mut grpc = server.grpc().await;
    let mut stuck = server
        .user_small_buffer("stuck", json!({"channels": ["big"]}))
        .await;
    stuck.subscribe(2, "big").await;
    let data = format!("\"{}\"", "z".repeat(60_000));
    for _ in 0..200 {
        grpc.publish(crate::support::publish("big", &data))
            .await
            .unwrap();
    }
    stuck
}

/// Publishes 16 KB to a client that never reads until the node counts it as a slow
/// consumer; returns how many publications that took.
async fn publications_until_a_stalled_client_overflows(socket_send_buffer: &str) -> usize {
    let server = TestServer::start(&[
        ("max_queue_bytes", "65536"),
        ("max_publication_size", "16384"),
        ("socket_send_buffer", socket_send_buffer),
    ])
    .await;
    let mut grpc = server.grpc().await;
    let mut stalled = server
        .user_small_buffer("stalled", json!({"channels": ["feed"]}))
        .await;
    stalled.subscribe(2, "feed").await;
    let data = format!("\"{}\"", "s".repeat(16_000));
    for n in 1..=400 {
        grpc.publish(crate::support::publish("feed", &data))
            .await
            .unwrap();
        let (_, metrics) = crate::support::http_get(server.admin, "/metrics").await;
        if crate::support::sample(&metrics, "sidecast_slow_consumer_closes_total") == Some(1.0) {
            return n;
        }
    }
    panic!("400 publications of 16 KB and the stalled client has not overflowed");
}

/// The queue's bound is max_queue_bytes, to the frame: what was pushed to a client that
/// never reads, less what its socket took (both read from /metrics), fits the bound before
/// the last publication and exceeds it with that one. A bound twice as large fails this.
#[tokio::test]
async fn the_queue_overflows_exactly_past_max_queue_bytes() {
    const MAX: f64 = 65536.0;
    let server = TestServer::start(&[
        ("max_queue_bytes", "65536"),
        ("max_publication_size", "16384"),
        ("socket_send_buffer", "16384"),
    ])
    .await;
    let mut grpc = server.grpc().await;
    let mut stalled = server
        .user_small_buffer("stalled", json!({"channels": ["feed"]}))
        .await;
    stalled.subscribe(2, "feed").await;
    let metric = |name: &'static str| async move {
        let (_, metrics) = crate::support::http_get(server.admin, "/metrics").await;
        crate::support::sample(&metrics, name).unwrap_or(0.0)
    };
    let before = metric("sidecast_bytes_sent_total").await;
    let data = format!("\"{}\"", "s".repeat(16_000));
    // The first publication goes to an empty socket, whole: its size on the wire.
    grpc.publish(crate::support::publish("feed", &data))
        .await
        .unwrap();
    let frame = metric("sidecast_bytes_sent_total").await - before;
    assert!(
        frame > 16_000.0,
        "the first frame was written at once: {frame}"
    );
    let mut pushed = frame;
    for _ in 2..=400 {
        grpc.publish(crate::support::publish("feed", &data))
            .await
            .unwrap();
        pushed += frame;
        if metric("sidecast_slow_consumer_closes_total").await == 1.0 {
            // The socket is full and its reader stalled: nothing more was written since.
            let written = metric("sidecast_bytes_sent_total").await - before;
            let queued_before = pushed - frame - written;
            assert!(
                queued_before <= MAX,
                "{queued_before} bytes were queued before the last push"
            );
            assert!(
                queued_before + frame > MAX,
                "the last push fitted ({queued_before} + {frame} bytes) yet overflowed"
            );
            return;
        }
    }
    panic!("400 publications of 16 KB and the stalled client has not overflowed");
}

#[tokio::test]
async fn a_stalled_client_holds_little_in_the_kernel_and_overflows_soon() {
    // 64 KiB of queue, and 2 x 16 KiB of kernel send buffer: about six publications, and
    // certainly fewer than twelve. With the kernel's autotuning (`socket_send_buffer = 0`)
    // the socket alone takes hundreds of kilobytes first (see the next test).
    let n = publications_until_a_stalled_client_overflows("16384").await;
    assert!(n <= 12, "{n} publications of 16 KB before the overflow");
}

#[tokio::test]
async fn with_the_kernels_autotuning_a_stalled_client_takes_far_more() {
    // What `socket_send_buffer` prevents, shown on this kernel: the stalled socket's send
    // buffer grows (up to net.ipv4.tcp_wmem's maximum) and takes many more publications
    // before the queue behind it fills.
    let n = publications_until_a_stalled_client_overflows("0").await;
    assert!(n > 12, "only {n} publications of 16 KB before the overflow");
}

#[tokio::test]
async fn a_client_that_ends_its_stream_with_frames_queued_loses_them_and_is_dropped() {
    let server = TestServer::start(&[
        ("max_queue_bytes", "67108864"),
        ("max_publication_size", "65536"),
        ("write_timeout", "300s"),
    ])
    .await;
    let mut stuck = stuck_behind_200_publications(&server).await;
    let (_, metrics) = crate::support::http_get(server.admin, "/metrics").await;
    let sent = crate::support::sample(&metrics, "sidecast_messages_sent_total").unwrap();
    assert!(
        sent < 100.0,
        "publications wait in the queue: {sent} frames sent"
    );
    // The client ends its stream without a Close (a FIN): it is gone, as far as the server
    // knows. What is queued is dropped and the socket closed at once, without a Close frame
    // (1006), not written for as long as write_timeout (300 s) allows. Reading now, the
    // client gets what the kernel already held, then the end of the stream.
    stuck.half_close();
    let (received, close) = stuck.count_until_end().await;
    assert_eq!(
        close, None,
        "no Close frame after the client's stream ended"
    );
    assert!(
        received as f64 <= sent,
        "nothing was written after the end: {received} arrived, {sent} frames had been sent"
    );
    server.until_no_connections().await;
}

// About time: the heartbeat is a clock.
#[tokio::test]
async fn heartbeat_works_when_pong_timeout_exceeds_ping_interval() {
    let server = TestServer::start(&[("ping_interval", "100ms"), ("pong_timeout", "400ms")]).await;
    let mut silent = server.user("s", json!({})).await;
    assert_eq!(silent.recv_any().await, json!({"type": "ping"}));
    assert_eq!(silent.closed().await.0, 4007);
}

#[tokio::test]
async fn a_new_message_inside_a_fragmented_one_closes_1002() {
    let server = TestServer::start(&[]).await;
    let mut client = server.user("f", json!({})).await;
    client.send_raw(text_fragment(b"{", true, false)).await;
    client.send_raw(text_fragment(b"{", true, false)).await;
    assert_eq!(
        client.closed().await,
        (1002, "expected a continuation frame".into())
    );
    let mut stray = server.user("f", json!({})).await;
    stray.send_raw(text_fragment(b"}", false, true)).await;
    assert_eq!(
        stray.closed().await,
        (1002, "unexpected continuation frame".into())
    );
}

#[tokio::test]
async fn a_close_code_that_may_not_be_sent_is_answered_1002() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let server = TestServer::start(&[]).await;
    let mut polite = server.user("p", json!({})).await;
    polite
        .send_raw(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        })))
        .await;
    assert_eq!(polite.closed().await.0, 1001, "a valid code is echoed");
    let mut odd = server.user("o", json!({})).await;
    odd.send_raw(Message::Close(Some(CloseFrame {
        code: CloseCode::from(1006),
        reason: "".into(),
    })))
    .await;
    assert_eq!(odd.closed().await.0, 1002);
}

/// A WebSocket client written by hand, for frames no client library will send: upgrades
/// with a token in the query, writes `frame` as is, and returns the server's close.
async fn raw_close(server: &TestServer, frame: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.ws_addr)
        .await
        .unwrap();
    let token = crate::support::token("raw", json!({}));
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut input = Vec::new();
    let head_end = loop {
        let mut chunk = [0; 1024];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the upgrade was answered");
        input.extend_from_slice(&chunk[..n]);
        if let Some(i) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(input.starts_with(b"HTTP/1.1 101"));
    input.drain(..head_end);
    tcp.write_all(frame).await.unwrap();
    // Server frames are unmasked: skip them until the close.
    loop {
        if input.len() >= 2 {
            let (len, header) = match input[1] & 0x7f {
                126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as usize, 4),
                126 => (usize::MAX, 4),
                127 => panic!("no frame this long is expected"),
                n => (n as usize, 2),
            };
            if len != usize::MAX && input.len() >= header + len {
                let payload = input[header..header + len].to_vec();
                let opcode = input[0] & 0x0f;
                input.drain(..header + len);
                if opcode == 8 {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (code, String::from_utf8(payload[2..].to_vec()).unwrap());
                }
                continue;
            }
        }
        let mut chunk = [0; 1024];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the socket without a close frame");
        input.extend_from_slice(&chunk[..n]);
    }
}

/// A masked client frame (the mask is all zeros, which leaves the payload as is).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn frames_the_protocol_forbids_close_1002_with_the_reason() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.user("by", json!({})).await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x81, 0x02, b'{', b'}'], "client frames must be masked"),
        (masked(0xc1, b"{}"), "reserved bits set"),
        (masked(0x83, b"{}"), "reserved opcode 3"),
        (masked(0x09, b""), "fragmented control frame"),
        (
            {
                let mut f = vec![0x89, 0x80 | 126, 0, 126, 0, 0, 0, 0];
                f.extend_from_slice(&[0; 126]);
                f
            },
            "control frame longer than 125 bytes",
        ),
    ];
    for (frame, reason) in cases {
        assert_eq!(raw_close(&server, &frame).await, (1002, reason.into()));
    }
    // A frame's announced length over max_message_size is refused from its header alone.
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[0; 4]);
    assert_eq!(
        raw_close(&server, &huge).await,
        (1009, "message too big".into())
    );
    // Frames the client library would send work the same way by hand.
    let mut ok = masked(0x81, br#"{"id":1,"op":"ping"}"#);
    ok.extend(masked(0x88, &1000u16.to_be_bytes()));
    assert_eq!(raw_close(&server, &ok).await, (1000, String::new()));
    assert_eq!(
        bystander.request(json!({"id": 9, "op": "ping"})).await["result"],
        json!({})
    );
}

#[tokio::test]
async fn a_client_that_floods_instead_of_answering_our_close_is_dropped() {
    let server = TestServer::start(&[]).await;
    let mut grpc = server.grpc().await;
    let mut client = server.user("flood", json!({})).await;
    grpc.disconnect(pb::DisconnectRequest {
        target: Some(pb::Target {
            target: Some(pb::target::Target::User("flood".into())),
        }),
        code: 4100,
        reason: "bye".into(),
    })
    .await
    .unwrap();
    // It never reads, so it never answers the Close, and sends without a pause: the close
    // handshake's 3 s still run out and the server drops the socket.
    let flood = async {
        let mut sent = 0u64;
        while client
            .try_send_raw(Message::Ping(b"are you there".to_vec().into()))
            .await
        {
            sent += 1;
        }
        sent
    };
    let sent = tokio::time::timeout(crate::support::PATIENCE, flood)
        .await
        .expect("the server drops a client that floods instead of answering its Close");
    assert!(sent > 0);
    let metrics = crate::support::http_get(server.admin, "/metrics").await.1;
    assert_eq!(
        crate::support::sample(&metrics, "sidecast_disconnects_total{code=\"4100\"}"),
        Some(1.0)
    );
}
