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
async fn open(
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

fn request(id: u64, publication: pb::PublishRequest) -> pb::PublishStreamRequest {
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
