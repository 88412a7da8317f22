//! Control.PublishStream: many publications over one stream, each answered in order with
//! its id, failures answered without ending the stream, and the stream's end when the
//! backend half-closes or the node stops.

use serde_json::json;
use sidecast::pb::{self, publish_stream_response::Result as Answer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::{publish, TestServer, PATIENCE};

const HISTORY: &str = "[namespaces.room]\nhistory_size = 1000\nhistory_ttl = \"5m\"\n";

/// Opens a publish stream: the sender of its requests and its answers.
pub(crate) async fn open(
    server: &TestServer,
) -> (
    mpsc::Sender<pb::PublishStreamRequest>,
    tonic::Streaming<pb::PublishStreamResponse>,
) {
    let (tx, rx) = mpsc::channel(64);
    let answers = server
        .grpc()
        .await
        .publish_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

pub(crate) fn request(id: u64, publication: pb::PublishRequest) -> pb::PublishStreamRequest {
    pb::PublishStreamRequest {
        id,
        publication: Some(publication),
    }
}

/// The next answer, or how the stream ended.
async fn next(
    answers: &mut tonic::Streaming<pb::PublishStreamResponse>,
) -> Result<Option<pb::PublishStreamResponse>, tonic::Status> {
    tokio::time::timeout(PATIENCE, answers.message())
        .await
        .expect("an answer in time")
}

/// 300 publications to two channels over one stream, with an invalid one, one without a
/// publication and an idempotency key used twice among them: each is answered once, in
/// order, with its id; the failures carry their status and the stream goes on; the repeated
/// key returns the first result; the subscribers get every publication of their channel in
/// order; after the half-close the stream ends OK.
#[tokio::test]
async fn publications_over_one_stream_are_answered_in_order() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut a = server.user("ann", json!({"channels": ["room:*"]})).await;
    let mut b = server.user("ben", json!({"channels": ["room:*"]})).await;
    a.subscribe(1, "room:a").await;
    b.subscribe(1, "room:b").await;

    let (tx, mut answers) = open(&server).await;
    let sender = tokio::spawn(async move {
        for id in 0..300u64 {
            let request = match id {
                100 => request(id, publish("room:bad channel", "1")),
                150 => pb::PublishStreamRequest {
                    id,
                    publication: None,
                },
                200 | 201 => {
                    let mut keyed = publish("room:a", &format!(r#"{{"n":{id}}}"#));
                    keyed.idempotency_key = "once".into();
                    request(id, keyed)
                }
                _ => {
                    let channel = if id % 2 == 0 { "room:a" } else { "room:b" };
                    request(id, publish(channel, &format!(r#"{{"n":{id}}}"#)))
                }
            };
            tx.send(request).await.unwrap();
        }
        // Dropping the sender half-closes the stream.
    });

    let mut offsets = std::collections::HashMap::new();
    let mut keyed = Vec::new();
    for id in 0..300u64 {
        let answer = next(&mut answers).await.unwrap().expect("an answer");
        assert_eq!(answer.id, id, "answers in order");
        match (id, answer.result.expect("a result")) {
            (100, Answer::Error(error)) => {
                assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
                assert!(error.message.contains("channel"), "{}", error.message);
            }
            (150, Answer::Error(error)) => {
                assert_eq!(
                    (error.code, error.message.as_str()),
                    (tonic::Code::InvalidArgument as i32, "missing publication")
                );
            }
            (200 | 201, Answer::Published(published)) => keyed.push(published.offset),
            (_, Answer::Published(published)) => {
                let channel = if id % 2 == 0 { "a" } else { "b" };
                let last = offsets.insert(channel, published.offset).unwrap_or(0);
                assert!(published.offset > last, "offsets grow per channel");
            }
            (id, other) => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(
        keyed[0], keyed[1],
        "the key's second use returns the first result"
    );
    assert!(next(&mut answers).await.unwrap().is_none(), "ends OK");
    sender.await.unwrap();

    // room:a: the even ids but 100 and 150, with 200 and 201 once; room:b: the odd ids but 201.
    for (client, expected) in [(&mut a, 148), (&mut b, 149)] {
        let mut got = Vec::new();
        while got.len() < expected {
            let message = client.recv().await;
            assert_eq!(message["type"], "pub", "{message}");
            got.push(message["offset"].as_u64().unwrap());
        }
        assert_eq!(got, (1..=expected as u64).collect::<Vec<_>>());
    }
}

/// A stream still open when the node stops ends with UNAVAILABLE once what it sent was
/// answered: the backend knows which publications were made.
#[tokio::test]
async fn an_open_stream_ends_unavailable_when_the_node_stops() {
    let server = TestServer::start(&[("shutdown_timeout", "2s"), ("drain_window", "100ms")]).await;
    let (tx, mut answers) = open(&server).await;
    tx.send(request(7, publish("news", "1"))).await.unwrap();
    let answer = next(&mut answers).await.unwrap().expect("an answer");
    assert_eq!(answer.id, 7);
    assert!(matches!(answer.result, Some(Answer::Published(_))));
    let reader = tokio::spawn(async move { next(&mut answers).await });
    server.stop().await;
    let status = reader.await.unwrap().expect_err("ends with a status");
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, "the server is shutting down")
    );
    drop(tx);
}

/// The node's publications so far, from /metrics.
async fn publications(server: &TestServer) -> u64 {
    let (_, text) = crate::support::http_get(server.admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("sidecast_publications_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// A publish stream over a connection with 64 KiB receive windows (grpc-go's default),
/// and a task sending `total` publications to "news" through it.
async fn open_narrow(
    server: &TestServer,
    total: u64,
) -> (
    tonic::Streaming<pb::PublishStreamResponse>,
    tokio::task::JoinHandle<()>,
) {
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(64);
    let answers = pb::control_client::ControlClient::new(channel)
        .publish_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // What the backend's own gRPC library buffers of its requests is its business; what the
    // node takes is the node's. The sender stops quietly when the stream is gone.
    let sender = tokio::spawn(async move {
        for id in 0..total {
            if tx.send(request(id, publish("news", "1"))).await.is_err() {
                return;
            }
        }
    });
    (answers, sender)
}

/// Waits until the node stops taking publications (nothing more for half a second), within
/// the usual patience, and returns how many it took.
async fn held_back(server: &TestServer) -> u64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = publications(server).await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = publications(server).await;
        if now == last && now > 0 {
            return now;
        }
        assert!(tokio::time::Instant::now() < deadline, "never held back");
        last = now;
    }
}

/// A backend that sends 50,000 publications and reads no answer is stopped by the
/// stream's bounds (256 queued answers, then HTTP/2 flow control: the backend's 64 KiB
/// window holds about 1,900 answers of this size) long before the node has taken them all;
/// once it reads, every answer comes, in order, and the rest is published.
#[tokio::test]
async fn a_backend_that_reads_no_answer_is_held_back() {
    const TOTAL: u64 = 50_000;
    let server = TestServer::start(&[]).await;
    let (mut answers, sender) = open_narrow(&server, TOTAL).await;
    let held = held_back(&server).await;
    assert!(
        held < 10_000,
        "{held} publications taken without an answer read"
    );

    for id in 0..TOTAL {
        let answer = next(&mut answers).await.unwrap().expect("an answer");
        assert_eq!(answer.id, id);
        assert!(matches!(answer.result, Some(Answer::Published(_))));
    }
    sender.await.unwrap();
    assert!(next(&mut answers).await.unwrap().is_none(), "ends OK");
    assert_eq!(publications(&server).await, TOTAL);
}

/// The node stops while a backend that reads no answer has filled its stream: the stream
/// is not waited on for room. When the backend reads, it gets the answers that were queued,
/// in order, no more than were published, and then UNAVAILABLE.
#[tokio::test]
async fn a_stream_full_of_unread_answers_ends_unavailable_when_the_node_stops() {
    let server = TestServer::start(&[("shutdown_timeout", "10s"), ("drain_window", "100ms")]).await;
    let (mut answers, sender) = open_narrow(&server, 50_000).await;
    let held = held_back(&server).await;
    let stopping = tokio::spawn(server.stop());

    let mut read = 0;
    let status = loop {
        match next(&mut answers).await {
            Ok(Some(answer)) => {
                assert_eq!(answer.id, read, "answers in order");
                assert!(matches!(answer.result, Some(Answer::Published(_))));
                read += 1;
            }
            Ok(None) => panic!("ended OK after {read} answers"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, "the server is shutting down")
    );
    assert!(
        read > 0 && read <= held,
        "{read} answers for {held} published"
    );
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("the node stops")
        .unwrap();
    tokio::time::timeout(PATIENCE, sender)
        .await
        .expect("the sender ends")
        .unwrap();
}

/// A request over gRPC's 4 MiB message limit ends the stream OUT_OF_RANGE, after the
/// answer to the request before it.
#[tokio::test]
async fn a_request_over_the_message_limit_ends_the_stream_out_of_range() {
    let server = TestServer::start(&[]).await;
    let (tx, mut answers) = open(&server).await;
    tx.send(request(1, publish("news", "1"))).await.unwrap();
    let big = format!("\"{}\"", "x".repeat(5 << 20));
    tx.send(request(2, publish("news", &big))).await.unwrap();
    let answer = next(&mut answers).await.unwrap().expect("an answer");
    assert_eq!(answer.id, 1);
    assert!(matches!(answer.result, Some(Answer::Published(_))));
    let status = next(&mut answers).await.expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(publications(&server).await, 1);
    drop(tx);
}
