//! Coalescing under load: publications that reach a node while it is still writing earlier
//! ones wait for its flushing task's next turn (`write_coalesce` after the previous one),
//! which writes each socket once with every frame queued to it.

use crate::publish_stream::{open, request};
use crate::support::{http_get, publish, sample, TestServer, PATIENCE};
use serde_json::json;
use sidecast::pb;

const SUBSCRIBERS: usize = 100;
const PUBLICATIONS: usize = 200;

async fn writes_and_frames(server: &TestServer) -> (f64, f64) {
    let (status, text) = http_get(server.admin, "/metrics").await;
    assert_eq!(status, 200);
    let writes = sample(&text, "sidecast_socket_writes_total").expect("writes counted");
    let frames = sample(&text, "sidecast_messages_sent_total").expect("frames counted");
    (writes, frames)
}

/// 200 publications to 100 subscribers, each sent once the one before last is answered:
/// the second finds the first still queued, so the node is behind, and from then on each
/// turn, 100 ms after the previous one, writes each socket once with every publication that
/// came meanwhile: at least five to a write on average (with `write_coalesce = "0s"` the
/// turns follow each other and a write carries one or two). Every subscriber still gets
/// every publication once, in order.
#[tokio::test]
async fn under_load_each_write_carries_many_publications_and_none_is_lost() {
    let server = TestServer::start_with_file(
        Some("[namespaces.room]\npublic = true\n"),
        &[("write_coalesce", "100ms")],
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut client = server.user(&format!("u{i}"), json!({})).await;
        client.subscribe(1, "room:x").await;
        clients.push(client);
    }
    let (writes_before, frames_before) = writes_and_frames(&server).await;

    let request = |i: usize| request(i as u64, publish("room:x", &i.to_string()));
    let (tx, mut answers) = open(&server).await;
    tx.send(request(0)).await.unwrap();
    tx.send(request(1)).await.unwrap();
    for i in 0..PUBLICATIONS {
        let answer = tokio::time::timeout(PATIENCE, answers.message())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("the stream goes on");
        assert_eq!(answer.id, i as u64);
        assert!(matches!(
            answer.result,
            Some(pb::publish_stream_response::Result::Published(_))
        ));
        if i + 2 < PUBLICATIONS {
            tx.send(request(i + 2)).await.unwrap();
        }
    }

    for client in &mut clients {
        for i in 0..PUBLICATIONS {
            let push = client.recv().await;
            assert_eq!(push["type"], "pub");
            assert_eq!(push["data"], json!(i), "every publication, in order");
        }
    }
    let (writes_after, frames_after) = writes_and_frames(&server).await;
    let (writes, frames) = (writes_after - writes_before, frames_after - frames_before);
    assert_eq!(frames, (SUBSCRIBERS * PUBLICATIONS) as f64);
    assert!(
        frames >= 5.0 * writes,
        "{frames} frames in {writes} writes: under load a write carries what queued since the last turn"
    );
}
