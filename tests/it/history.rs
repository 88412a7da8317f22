//! History and recovery: offsets and epochs, recovery on every path (success, epoch change,
//! gap too old, too many), idempotent publish, history pages, and no loss or duplicate when
//! publications race subscriptions.

use serde_json::{json, Value};
use sidecast::pb;
use tonic::Code;

use crate::support::{publish, token, Client, TestServer};

const HISTORY: &str = "[namespaces.h]\nhistory_size = 100\nhistory_ttl = \"1m\"\n";

fn offsets(list: &Value) -> Vec<u64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn offsets_epochs_and_positions() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut grpc = server.grpc().await;
    let mut client = server
        .user("a", json!({"channels": ["h:*", "plain"]}))
        .await;
    let reply = client.subscribe(2, "h:1").await;
    assert_eq!(reply["result"]["recoverable"], true);
    assert_eq!(reply["result"]["offset"], 0);
    let epoch = reply["result"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=3u64 {
        let p = grpc
            .publish(publish("h:1", &n.to_string()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((p.offset, p.epoch.as_str()), (n, epoch.as_str()));
        assert_eq!(
            client.recv().await,
            json!({"type": "pub", "channel": "h:1", "data": n, "offset": n})
        );
    }
    // A channel without history: no offsets, no epoch.
    assert_eq!(
        client.subscribe(3, "plain").await["result"],
        json!({"recoverable": false})
    );
    let p = grpc
        .publish(publish("plain", "1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.offset, p.epoch.as_str()), (0, ""));
    assert_eq!(
        client.recv().await,
        json!({"type": "pub", "channel": "plain", "data": 1})
    );
}

#[tokio::test]
async fn a_client_that_comes_back_recovers_what_it_missed() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut grpc = server.grpc().await;
    let mut first = server.user("b", json!({"channels": ["h:*"]})).await;
    let epoch = first.subscribe(2, "h:r").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    grpc.publish(publish("h:r", r#"{"n":1}"#)).await.unwrap();
    let last = first.recv().await["offset"].as_u64().unwrap();
    drop(first);
    for n in 2..=4 {
        grpc.publish(publish("h:r", &format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
    }
    let mut again = server.user("b", json!({"channels": ["h:*"]})).await;
    let reply = again
        .request(json!({"id": 2, "op": "subscribe", "channel": "h:r", "since": {"offset": last, "epoch": epoch}}))
        .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    assert_eq!(offsets(&reply["result"]["publications"]), vec![2, 3, 4]);
    assert_eq!(reply["result"]["publications"][0]["data"], json!({"n": 2}));
    assert_eq!(reply["result"]["offset"], 4);
    grpc.publish(publish("h:r", r#"{"n":5}"#)).await.unwrap();
    assert_eq!(
        again.recv().await["offset"],
        5,
        "live publications continue after the recovered ones"
    );
    // At the top already: recovered, with nothing to replay.
    let mut top = server.user("b", json!({"channels": ["h:*"]})).await;
    let reply = top
        .request(json!({"id": 2, "op": "subscribe", "channel": "h:r", "since": {"offset": 5, "epoch": epoch}}))
        .await;
    assert_eq!(
        (
            reply["result"]["recovered"].as_bool(),
            offsets(&reply["result"]["publications"])
        ),
        (Some(true), vec![])
    );
}

#[tokio::test]
async fn recovery_is_refused_whole_never_in_part() {
    let file = "[namespaces.h]\nhistory_size = 5\nhistory_ttl = \"1m\"\n";
    let server = TestServer::start_with_file(Some(file), &[("max_recovery", "8")]).await;
    let mut grpc = server.grpc().await;
    let mut c = server.user("c", json!({"channels": ["h:*"]})).await;
    let epoch = c.subscribe(2, "h:x").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 1..=10 {
        grpc.publish(publish("h:x", &n.to_string())).await.unwrap();
    }
    let cases = [
        (
            json!({"offset": 3, "epoch": epoch}),
            "7 missed, within max_recovery, but offsets 4 and 5 are no longer kept",
        ),
        (
            json!({"offset": 1, "epoch": epoch}),
            "9 missed, max_recovery is 8",
        ),
        (json!({"offset": 9, "epoch": "another"}), "another epoch"),
        (json!({"offset": 11, "epoch": epoch}), "ahead of the stream"),
    ];
    for (i, (since, why)) in cases.into_iter().enumerate() {
        let mut d = server.user("d", json!({"channels": ["h:*"]})).await;
        let reply = d
            .request(json!({"id": 10 + i, "op": "subscribe", "channel": "h:x", "since": since}))
            .await;
        assert_eq!(reply["result"]["recovered"], false, "{why}: {reply}");
        assert_eq!(
            offsets(&reply["result"]["publications"]),
            Vec::<u64>::new(),
            "{why}"
        );
        assert_eq!(reply["result"]["offset"], 10, "{why}");
    }
    let mut e = server.user("e", json!({"channels": ["h:*"]})).await;
    let ok = e
        .request(json!({"id": 2, "op": "subscribe", "channel": "h:x", "since": {"offset": 7, "epoch": epoch}}))
        .await;
    assert_eq!(offsets(&ok["result"]["publications"]), vec![8, 9, 10]);
}

/// Within max_recovery, but the first missed publication is gone (removed by the backend, or
/// past history_ttl): the recovery is refused whole, through the socket.
#[tokio::test]
async fn a_gap_whose_start_is_no_longer_kept_is_not_recovered() {
    let file = "[namespaces.h]\nhistory_size = 100\nhistory_ttl = \"1m\"\n\
                [namespaces.short]\nhistory_size = 100\nhistory_ttl = \"200ms\"\n";
    let server = TestServer::start_with_file(Some(file), &[("max_recovery", "50")]).await;
    let mut grpc = server.grpc().await;
    let mut watcher = server
        .user("w", json!({"channels": ["h:*", "short:*"]}))
        .await;
    let mut positions = Vec::new();
    for channel in ["h:removed", "short:expired"] {
        let epoch = watcher.subscribe(2, channel).await["result"]["epoch"]
            .as_str()
            .unwrap()
            .to_string();
        for n in 1..=5 {
            grpc.publish(publish(channel, &n.to_string()))
                .await
                .unwrap();
        }
        positions.push((channel, epoch));
    }
    grpc.history_remove(pb::HistoryRemoveRequest {
        channel: "h:removed".into(),
    })
    .await
    .unwrap();
    // Wait for the expiry itself, as the backend sees it: the page empties.
    crate::support::eventually("short:expired's publications expire", || async {
        let page = server
            .grpc()
            .await
            .history(pb::HistoryRequest {
                channel: "short:expired".into(),
                since: None,
                limit: 10,
                reverse: false,
            })
            .await
            .unwrap()
            .into_inner();
        page.publications.is_empty()
    })
    .await;
    for (i, (channel, epoch)) in positions.into_iter().enumerate() {
        let mut late = server
            .user("late", json!({"channels": ["h:*", "short:*"]}))
            .await;
        let reply = late
            .request(json!({"id": 10 + i, "op": "subscribe", "channel": channel, "since": {"offset": 2, "epoch": epoch}}))
            .await;
        assert_eq!(reply["result"]["recovered"], false, "{channel}: {reply}");
        assert_eq!(offsets(&reply["result"]["publications"]), Vec::<u64>::new());
        assert_eq!(
            reply["result"]["offset"], 5,
            "the position outlives them: {reply}"
        );
    }
}

/// A live subscriber that keeps up sees every offset of a long run on a history channel,
/// once, in order: 1..=N exactly.
#[tokio::test]
async fn a_live_subscriber_sees_every_offset_of_a_long_run() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut grpc = server.grpc().await;
    let mut client = server.user("a", json!({"channels": ["h:*"]})).await;
    client.subscribe(2, "h:long").await;
    const N: u64 = 1500;
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < N as usize {
            let message = client.recv().await;
            assert_eq!(message["type"], "pub", "{message}");
            assert_eq!(message["data"], message["offset"], "{message}");
            seen.push(message["offset"].as_u64().unwrap());
        }
        seen
    });
    for n in 1..=N {
        grpc.publish(publish("h:long", &n.to_string()))
            .await
            .unwrap();
    }
    let seen = reader.await.unwrap();
    assert_eq!(seen, (1..=N).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_restarted_memory_engine_has_a_new_epoch() {
    let first = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let p = first
        .grpc()
        .await
        .publish(publish("h:e", "1"))
        .await
        .unwrap()
        .into_inner();
    first.stop().await;
    let second = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut c = second.user("f", json!({"channels": ["h:*"]})).await;
    let reply = c
        .request(json!({"id": 2, "op": "subscribe", "channel": "h:e", "since": {"offset": p.offset, "epoch": p.epoch}}))
        .await;
    assert_eq!(reply["result"]["recovered"], false);
    assert_ne!(reply["result"]["epoch"], json!(p.epoch));
}

#[tokio::test]
async fn idempotent_publish_publishes_once() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut grpc = server.grpc().await;
    let mut c = server.user("g", json!({"channels": ["h:*"]})).await;
    c.subscribe(2, "h:i").await;
    let request = |data: &str| pb::PublishRequest {
        channel: "h:i".into(),
        data: data.as_bytes().to_vec(),
        idempotency_key: "order-42".into(),
        ..Default::default()
    };
    let long = pb::PublishRequest {
        idempotency_key: "k".repeat(257),
        ..request("1")
    };
    assert_eq!(
        grpc.publish(long).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let a = grpc.publish(request("1")).await.unwrap().into_inner();
    let b = grpc.publish(request("2")).await.unwrap().into_inner();
    assert_eq!((a.offset, a.epoch.clone()), (b.offset, b.epoch));
    grpc.publish(publish("h:i", "3")).await.unwrap();
    assert_eq!(c.recv().await["data"], 1);
    assert_eq!(
        c.recv().await["data"],
        3,
        "the repeated publish delivered nothing"
    );
}

#[tokio::test]
async fn history_pages_and_removal() {
    let server = TestServer::start_with_file(Some(HISTORY), &[("max_recovery", "50")]).await;
    let mut grpc = server.grpc().await;
    for n in 1..=6 {
        grpc.publish(publish("h:p", &n.to_string())).await.unwrap();
    }
    let mut c = server
        .user("h", json!({"channels": ["h:*", "plain"]}))
        .await;
    assert_eq!(
        c.request(json!({"id": 2, "op": "history", "channel": "h:p", "limit": 2}))
            .await["error"]["code"],
        "forbidden"
    );
    let epoch = c.subscribe(3, "h:p").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let page = c
        .request(json!({"id": 4, "op": "history", "channel": "h:p", "limit": 2}))
        .await;
    assert_eq!(offsets(&page["result"]["publications"]), vec![1, 2]);
    assert_eq!(page["result"]["offset"], 6);
    let page = c
        .request(json!({"id": 5, "op": "history", "channel": "h:p", "limit": 10, "since": {"offset": 4, "epoch": epoch}}))
        .await;
    assert_eq!(offsets(&page["result"]["publications"]), vec![5, 6]);
    let page = c
        .request(json!({"id": 6, "op": "history", "channel": "h:p", "limit": 3, "reverse": true}))
        .await;
    assert_eq!(offsets(&page["result"]["publications"]), vec![6, 5, 4]);
    let lost = c
        .request(json!({"id": 7, "op": "history", "channel": "h:p", "limit": 1, "since": {"offset": 1, "epoch": "old"}}))
        .await;
    assert_eq!(lost["error"]["code"], "unrecoverable_position");
    assert_eq!(
        c.request(json!({"id": 8, "op": "history", "channel": "h:p", "limit": 51}))
            .await["error"]["code"],
        "bad_request"
    );
    c.subscribe(9, "plain").await;
    assert_eq!(
        c.request(json!({"id": 10, "op": "history", "channel": "plain"}))
            .await["error"]["code"],
        "not_available"
    );

    let page = grpc
        .history(pb::HistoryRequest {
            channel: "h:p".into(),
            since: None,
            limit: 10,
            reverse: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.publications
            .iter()
            .map(|p| p.offset)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(page.publications[0].data, b"1");
    grpc.history_remove(pb::HistoryRemoveRequest {
        channel: "h:p".into(),
    })
    .await
    .unwrap();
    let after = grpc
        .history(pb::HistoryRequest {
            channel: "h:p".into(),
            since: None,
            limit: 10,
            reverse: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.publications.is_empty());
    assert_eq!(
        (after.offset, after.epoch.as_str()),
        (6, epoch.as_str()),
        "the position stays"
    );
    let stale = pb::StreamPosition {
        offset: 1,
        epoch: "old".into(),
    };
    let err = grpc
        .history(pb::HistoryRequest {
            channel: "h:p".into(),
            since: Some(stale),
            limit: 1,
            reverse: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = grpc
        .history(pb::HistoryRequest {
            channel: "plain".into(),
            since: None,
            limit: 1,
            reverse: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn subs_claim_channels_recover_at_connect() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut grpc = server.grpc().await;
    let p = grpc
        .publish(publish("h:me", "1"))
        .await
        .unwrap()
        .into_inner();
    grpc.publish(publish("h:me", "2")).await.unwrap();
    let mut c = Client::open(&server.ws_url).await;
    let positions = json!({"h:me": {"offset": p.offset, "epoch": p.epoch}});
    c.send(json!({"id": 1, "op": "connect", "token": token("i", json!({"subs": ["h:me"]})), "subs": positions}))
        .await;
    assert_eq!(c.recv().await["type"], "connected");
    let sub = c.recv().await;
    assert_eq!(
        (sub["type"].as_str(), sub["recovered"].as_bool()),
        (Some("sub"), Some(true))
    );
    assert_eq!(offsets(&sub["publications"]), vec![2]);
}

#[tokio::test]
async fn recovery_racing_publications_loses_and_repeats_nothing() {
    const TOTAL: u64 = 400;
    let server = TestServer::start_with_file(Some(HISTORY), &[("max_recovery", "100")]).await;
    let mut grpc = server.grpc().await;
    let epoch = grpc
        .publish(publish("h:race", "0"))
        .await
        .unwrap()
        .into_inner()
        .epoch;
    let publishing = tokio::spawn(async move {
        for n in 1..TOTAL {
            grpc.publish(publish("h:race", &n.to_string()))
                .await
                .unwrap();
        }
    });
    // Subscribe repeatedly while publishing runs, recovering from a few publications back.
    let mut checked = 0;
    while !publishing.is_finished() || checked < 5 {
        let mut c = server.user("r", json!({"channels": ["h:*"]})).await;
        let plain = c.subscribe(2, "h:race").await;
        let top = plain["result"]["offset"].as_u64().unwrap();
        let mut d = server.user("r", json!({"channels": ["h:*"]})).await;
        let from = top.saturating_sub(3).max(1);
        let reply = d
            .request(json!({"id": 2, "op": "subscribe", "channel": "h:race", "since": {"offset": from, "epoch": epoch}}))
            .await;
        if reply["result"]["recovered"] != true {
            continue;
        }
        let mut seen = offsets(&reply["result"]["publications"]);
        let head = reply["result"]["offset"].as_u64().unwrap();
        assert_eq!(
            seen.last().copied().unwrap_or(from),
            head,
            "the recovered part ends at the reply's position"
        );
        // Then live publications must continue exactly from there. Offsets run from 1 (the
        // first publication) to TOTAL.
        let want = TOTAL.min(head + 5);
        while seen.last().copied().unwrap_or(from) < want {
            let m = d.recv().await;
            seen.push(m["offset"].as_u64().unwrap());
        }
        let expected: Vec<u64> = (from + 1..=*seen.last().unwrap()).collect();
        assert_eq!(
            seen, expected,
            "no gap and no duplicate around the subscription"
        );
        checked += 1;
        if head >= TOTAL {
            break;
        }
    }
    assert!(checked >= 1);
    publishing.await.unwrap();
}

#[tokio::test]
async fn a_slow_consumer_closed_with_4004_resumes_with_everything() {
    const TOTAL: u64 = 2000;
    let file = "[namespaces.h]\nhistory_size = 5000\nhistory_ttl = \"1m\"\n";
    let server = TestServer::start_with_file(
        Some(file),
        &[
            ("max_queue_bytes", "262144"),
            ("max_publication_size", "8192"),
            ("max_recovery", "5000"),
        ],
    )
    .await;
    let mut grpc = server.grpc().await;
    let mut slow = server
        .user_small_buffer("slow", json!({"channels": ["h:*"]}))
        .await;
    let epoch = slow.subscribe(2, "h:s").await["result"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    // ~8 MB: more than the kernel's socket buffers and the 256 KiB queue together.
    let pad = "p".repeat(4000);
    for n in 1..=TOTAL {
        grpc.publish(publish("h:s", &format!(r#"{{"n":{n},"pad":"{pad}"}}"#)))
            .await
            .unwrap();
    }
    let (messages, code) = slow.drain_until_close().await;
    assert_eq!(code, 4004);
    let got: Vec<u64> = messages
        .iter()
        .filter(|m| m["type"] == "pub")
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "an in-order prefix before the close"
    );
    let last = got.last().copied().unwrap_or(0);
    assert!(last < TOTAL);

    // Back with its last offset. One recovery is capped at half the queue bound (so that it can
    // never trip the slow-consumer close itself); a larger backlog is paged from history on the
    // same subscription, which keeps receiving live publications meanwhile.
    let mut back = server.user("slow", json!({"channels": ["h:*"]})).await;
    let reply = back
        .request(json!({"id": 2, "op": "subscribe", "channel": "h:s", "since": {"offset": last, "epoch": epoch}}))
        .await;
    let top = reply["result"]["offset"].as_u64().unwrap();
    assert_eq!(top, TOTAL);
    let mut have: Vec<u64> = got;
    if reply["result"]["recovered"] == true {
        have.extend(offsets(&reply["result"]["publications"]));
    } else {
        let mut id = 3;
        while have.last().copied().unwrap_or(0) < top {
            let since = json!({"offset": have.last().copied().unwrap_or(0), "epoch": epoch});
            let page = back.request(json!({"id": id, "op": "history", "channel": "h:s", "limit": 10, "since": since})).await;
            have.extend(offsets(&page["result"]["publications"]));
            id += 1;
        }
    }
    assert_eq!(
        have,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every publication, in order, none twice"
    );
    grpc.publish(publish("h:s", r#"{"n":"live"}"#))
        .await
        .unwrap();
    assert_eq!(back.recv().await["offset"], TOTAL + 1);
}

#[tokio::test]
async fn since_on_a_channel_without_history_is_not_recovered() {
    let server = TestServer::start_with_file(Some(HISTORY), &[]).await;
    let mut c = server.user("j", json!({"channels": ["plain"]})).await;
    let reply = c
        .request(json!({"id": 2, "op": "subscribe", "channel": "plain", "since": {"offset": 3, "epoch": "e"}}))
        .await;
    assert_eq!(
        reply["result"],
        json!({"recoverable": false, "recovered": false, "publications": []})
    );
}

#[tokio::test]
async fn recovering_many_channels_at_connect_never_trips_the_slow_consumer_close() {
    let server = TestServer::start_with_file(
        Some(HISTORY),
        &[
            ("max_queue_bytes", "65536"),
            ("max_publication_size", "16384"),
        ],
    )
    .await;
    let mut grpc = server.grpc().await;
    let channels = ["h:a", "h:b", "h:c", "h:d"];
    let mut positions = serde_json::Map::new();
    let big = format!("\"{}\"", "x".repeat(12_000));
    for channel in channels {
        let p = grpc
            .publish(publish(channel, "0"))
            .await
            .unwrap()
            .into_inner();
        positions.insert(
            channel.into(),
            json!({"offset": p.offset, "epoch": p.epoch}),
        );
        for _ in 0..2 {
            grpc.publish(publish(channel, &big)).await.unwrap();
        }
    }
    // 4 channels × 24 KB missed, against a 32 KiB recovery budget.
    let mut c = Client::open(&server.ws_url).await;
    let claims = json!({"subs": channels});
    c.send(json!({"id": 1, "op": "connect", "token": token("k", claims), "subs": positions}))
        .await;
    assert_eq!(c.recv().await["type"], "connected");
    let mut recovered = 0;
    for _ in channels {
        let sub = c.recv().await;
        assert_eq!(sub["type"], "sub");
        match sub["recovered"].as_bool() {
            Some(true) => {
                assert_eq!(offsets(&sub["publications"]), vec![2, 3]);
                recovered += 1;
            }
            Some(false) => assert_eq!(offsets(&sub["publications"]), Vec::<u64>::new()),
            None => panic!("{sub}"),
        }
    }
    // How many fit depends on how fast the writer drains the queue meanwhile; what must hold
    // is that each recovery is whole or nothing and the connection is not closed.
    assert!(recovered >= 1, "the first recovery fits the budget");
    assert_eq!(
        c.request(json!({"id": 2, "op": "ping"})).await["result"],
        json!({}),
        "still connected"
    );
}

#[tokio::test]
async fn a_control_api_history_page_over_3_mib_is_refused() {
    let file = "[namespaces.h]\nhistory_size = 400\nhistory_ttl = \"1m\"\n";
    let server = TestServer::start_with_file(
        Some(file),
        &[("max_recovery", "400"), ("max_publication_size", "16384")],
    )
    .await;
    let mut grpc = server.grpc().await;
    let big = format!("\"{}\"", "x".repeat(12_000));
    for _ in 0..300 {
        grpc.publish(publish("h:big", &big)).await.unwrap();
    }
    let page = |limit| pb::HistoryRequest {
        channel: "h:big".into(),
        since: None,
        limit,
        reverse: false,
    };
    assert_eq!(
        grpc.history(page(300)).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    assert_eq!(
        grpc.history(page(100))
            .await
            .unwrap()
            .into_inner()
            .publications
            .len(),
        100
    );
}
