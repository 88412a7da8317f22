//! Delivery receipts: in a namespace with `receipts`, subscribers acknowledge what they
//! handled (`ack`, cumulative), and for a publication made with `receipt` Control.Receipt
//! tells the backend how many subscriptions were given it, how many acknowledged it by its
//! deadline, and who did not; on one node and across a cluster, live and recovered.

use serde_json::{json, Value};
use sidecast::pb;
use tonic::Code;

use crate::support::{eventually, publish, Client, TestServer};

const RECEIPTS: &str = "[namespaces.r]\nhistory_size = 100\nhistory_ttl = \"1m\"\n\
                        receipts = true\nreceipt_timeout = \"1s\"\n\
                        [namespaces.h]\nhistory_size = 100\nhistory_ttl = \"1m\"\n";

async fn reader(server: &TestServer, user: &str) -> Client {
    let mut client = server.user(user, json!({"channels": ["r:*", "h:*"]})).await;
    let reply = client.subscribe(1, "r:room").await;
    assert_eq!(reply["result"]["receipts"], true, "{reply}");
    client
}

/// A Publish whose delivery receipt is tallied.
fn tallied(channel: &str, data: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        receipt: true,
        ..publish(channel, data)
    }
}

async fn next_pub(client: &mut Client) -> Value {
    loop {
        let message = client.recv().await;
        if message["type"] == "pub" {
            return message;
        }
    }
}

async fn receipt(server: &TestServer, channel: &str, offset: u64) -> pb::ReceiptResponse {
    server
        .grpc()
        .await
        .receipt(pb::ReceiptRequest {
            channel: channel.into(),
            offset,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn receipts_count_acknowledgements_by_the_deadline_and_name_who_did_not() {
    let server = TestServer::start_with_file(Some(RECEIPTS), &[]).await;
    let mut ann = reader(&server, "ann").await;
    let mut bob = reader(&server, "bob").await;
    let mut cy = reader(&server, "cy").await;
    let mut grpc = server.grpc().await;
    let offset = grpc
        .publish(tallied("r:room", r#"{"text":"hi"}"#))
        .await
        .unwrap()
        .into_inner()
        .offset;
    for client in [&mut ann, &mut bob, &mut cy] {
        assert_eq!(next_pub(client).await["offset"], offset);
    }
    // With an id the acknowledgement is answered; without one, nothing answers it.
    let answer = ann
        .request(json!({"id": 5, "op": "ack", "channel": "r:room", "offset": offset}))
        .await;
    assert_eq!(answer, json!({"id": 5, "result": {}}));
    bob.send(json!({"op": "ack", "channel": "r:room", "offset": offset}))
        .await;
    // A round trip after bob's acknowledgement: it has been handled.
    bob.request(json!({"id": 6, "op": "ping"})).await;

    let open = receipt(&server, "r:room", offset).await;
    assert_eq!(
        (open.delivered, open.acknowledged, open.complete),
        (3, 2, false)
    );
    assert_eq!(open.missing_users, ["cy"]);

    let done = wait_complete(&server, "r:room", offset).await;
    // cy acknowledges too late: the receipt is final.
    cy.request(json!({"id": 7, "op": "ack", "channel": "r:room", "offset": offset}))
        .await;
    let after = receipt(&server, "r:room", offset).await;
    assert_eq!(after, done);
    assert_eq!((done.delivered, done.acknowledged), (3, 2));
    assert_eq!(done.missing_users, ["cy"]);
}

async fn wait_complete(server: &TestServer, channel: &str, offset: u64) -> pb::ReceiptResponse {
    let grpc = server.grpc().await;
    eventually("the receipt's deadline", || {
        let mut grpc = grpc.clone();
        let channel = channel.to_string();
        async move {
            grpc.receipt(pb::ReceiptRequest { channel, offset })
                .await
                .unwrap()
                .into_inner()
                .complete
        }
    })
    .await;
    receipt(server, channel, offset).await
}

#[tokio::test]
async fn a_publication_recovered_after_a_reconnect_is_acknowledged_like_a_live_one() {
    let server = TestServer::start_with_file(Some(RECEIPTS), &[]).await;
    // A node tallies what it delivers: eli stays subscribed while dee is away.
    let _eli = reader(&server, "eli").await;
    let mut dee = reader(&server, "dee").await;
    let mut grpc = server.grpc().await;
    grpc.publish(tallied("r:room", r#"{"n":1}"#)).await.unwrap();
    let first = next_pub(&mut dee).await;
    let epoch = {
        let history = dee
            .request(json!({"id": 2, "op": "history", "channel": "r:room"}))
            .await;
        history["result"]["epoch"].clone()
    };
    drop(dee);
    let grpc_for_check = grpc.clone();
    eventually("dee's connection gone", || {
        let mut grpc = grpc_for_check.clone();
        async move {
            let info = grpc.info(pb::InfoRequest {}).await.unwrap().into_inner();
            info.connections == 1
        }
    })
    .await;
    // Published while dee is away: only her recovery delivers it.
    let offset = grpc
        .publish(tallied("r:room", r#"{"n":2}"#))
        .await
        .unwrap()
        .into_inner()
        .offset;
    let mut dee = server.user("dee", json!({"channels": ["r:*"]})).await;
    let since = json!({"offset": first["offset"], "epoch": epoch});
    let reply = dee
        .request(json!({"id": 1, "op": "subscribe", "channel": "r:room", "since": since}))
        .await;
    assert_eq!(reply["result"]["recovered"], true);
    assert_eq!(reply["result"]["publications"][0]["offset"], offset);
    // Given live to eli and, by the recovery, to dee.
    let before = receipt(&server, "r:room", offset).await;
    assert_eq!((before.delivered, before.acknowledged), (2, 0));
    dee.request(json!({"id": 3, "op": "ack", "channel": "r:room", "offset": offset}))
        .await;
    let after = receipt(&server, "r:room", offset).await;
    assert_eq!((after.delivered, after.acknowledged), (2, 1));
    assert_eq!(after.missing_users, ["eli"]);
    // The first publication was given on the connection that ended before dee
    // acknowledged it; her acknowledgement is cumulative, so the one on the new connection
    // covers it too.
    let first = wait_complete(&server, "r:room", first["offset"].as_u64().unwrap()).await;
    assert_eq!((first.delivered, first.acknowledged), (2, 1));
    assert_eq!(first.missing_users, ["eli"]);
}

#[tokio::test]
async fn wrong_acknowledgements_and_receipts_get_their_codes() {
    let server = TestServer::start_with_file(Some(RECEIPTS), &[]).await;
    let mut eve = server
        .user("eve", json!({"channels": ["r:*", "h:*"]}))
        .await;
    eve.subscribe(1, "h:plain").await;
    let cases = [
        (
            json!({"id": 2, "op": "ack", "channel": "r:room", "offset": 1}),
            "forbidden",
        ),
        (
            json!({"id": 3, "op": "ack", "channel": "h:plain", "offset": 1}),
            "not_available",
        ),
        (
            json!({"id": 4, "op": "ack", "channel": "r:room"}),
            "bad_request",
        ),
        (
            json!({"id": 5, "op": "ack", "channel": "r:room", "offset": -1}),
            "bad_request",
        ),
        (json!({"id": 6, "op": "ack", "offset": 1}), "bad_request"),
        (
            json!({"id": 7, "op": "ack", "channel": "no spaces", "offset": 1}),
            "bad_request",
        ),
    ];
    for (command, code) in cases {
        let answer = eve.request(command.clone()).await;
        assert_eq!(answer["error"]["code"], code, "{command}: {answer}");
    }
    // Without an id a wrong acknowledgement is dropped; one that cannot be read closes.
    eve.send(json!({"op": "ack", "channel": "r:room", "offset": 1}))
        .await;
    assert_eq!(
        eve.request(json!({"id": 8, "op": "ping"})).await["result"],
        json!({})
    );
    eve.send(json!({"op": "ack", "channel": "r:room"})).await;
    assert_eq!(
        eve.closed().await,
        (4500, "ack without id needs a channel and an offset".into())
    );

    let mut grpc = server.grpc().await;
    let unknown = grpc
        .receipt(pb::ReceiptRequest {
            channel: "r:room".into(),
            offset: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let plain = grpc
        .receipt(pb::ReceiptRequest {
            channel: "h:plain".into(),
            offset: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(plain.code(), Code::FailedPrecondition);
    assert_eq!(
        plain.message(),
        "receipts are not enabled for channel \"h:plain\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_receipt_adds_up_every_node() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let settings = [("broker", url.as_str())];
    let (a, b) = (
        TestServer::start_ready(Some(RECEIPTS), &settings).await,
        TestServer::start_ready(Some(RECEIPTS), &settings).await,
    );
    let mut fay = reader(&a, "fay").await;
    let mut gil = reader(&b, "gil").await;
    let mut hal = reader(&b, "hal").await;
    let offset = a
        .grpc()
        .await
        .publish(tallied("r:room", r#"{"n":1}"#))
        .await
        .unwrap()
        .into_inner()
        .offset;
    for client in [&mut fay, &mut gil, &mut hal] {
        assert_eq!(next_pub(client).await["offset"], offset);
    }
    for client in [&mut fay, &mut gil] {
        client
            .request(json!({"id": 9, "op": "ack", "channel": "r:room", "offset": offset}))
            .await;
    }
    // Asked on either node: the same sum.
    for node in [&a, &b] {
        let receipt = receipt(node, "r:room", offset).await;
        assert_eq!((receipt.delivered, receipt.acknowledged), (3, 2));
        assert_eq!(receipt.missing_users, ["hal"]);
    }
}

#[tokio::test]
async fn past_max_pending_receipts_the_oldest_is_forgotten_and_counted() {
    let server =
        TestServer::start_with_file(Some(RECEIPTS), &[("max_pending_receipts", "2")]).await;
    let _reader = reader(&server, "ivy").await;
    let mut grpc = server.grpc().await;
    let mut offsets = Vec::new();
    for n in 1..=3 {
        let published = grpc
            .publish(tallied("r:room", &format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
        offsets.push(published.into_inner().offset);
    }
    let forgotten = grpc
        .receipt(pb::ReceiptRequest {
            channel: "r:room".into(),
            offset: offsets[0],
        })
        .await
        .unwrap_err();
    assert_eq!(forgotten.code(), Code::NotFound);
    assert_eq!(receipt(&server, "r:room", offsets[2]).await.delivered, 1);
    let metrics = crate::support::http_get(server.admin, "/metrics").await.1;
    assert_eq!(
        crate::support::sample(&metrics, "sidecast_receipts_forgotten_total"),
        Some(1.0)
    );
}

#[tokio::test]
async fn only_publications_made_with_receipt_are_tallied_each_with_its_deadline() {
    let server = TestServer::start_with_file(Some(RECEIPTS), &[]).await;
    let mut jo = reader(&server, "jo").await;
    let mut grpc = server.grpc().await;
    let plain = grpc
        .publish(publish("r:room", "1"))
        .await
        .unwrap()
        .into_inner()
        .offset;
    // A deadline of its own, shorter than the namespace's second.
    let quick = pb::PublishRequest {
        receipt_timeout_ms: 50,
        ..tallied("r:room", "2")
    };
    let quick = grpc.publish(quick).await.unwrap().into_inner().offset;
    assert_eq!(next_pub(&mut jo).await["offset"], plain);
    assert_eq!(next_pub(&mut jo).await["offset"], quick);
    let untallied = grpc
        .receipt(pb::ReceiptRequest {
            channel: "r:room".into(),
            offset: plain,
        })
        .await
        .unwrap_err();
    assert_eq!(untallied.code(), Code::NotFound);
    let done = wait_complete(&server, "r:room", quick).await;
    assert_eq!((done.delivered, done.acknowledged), (1, 0));
    assert_eq!(done.missing_users, ["jo"]);

    let refused = [
        (tallied("h:plain", "1"), Code::FailedPrecondition),
        (
            pb::PublishRequest {
                receipt_timeout_ms: 3_600_001,
                ..tallied("r:room", "1")
            },
            Code::InvalidArgument,
        ),
    ];
    for (request, code) in refused {
        assert_eq!(grpc.publish(request).await.unwrap_err().code(), code);
    }
}
