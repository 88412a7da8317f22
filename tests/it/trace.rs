//! A trace through every hop: a Publish with a W3C `traceparent` carries its trace id to
//! the `pub` push (where the namespace has `trace_ids`), the Publish answer and the delivery
//! receipt, on one node and across Redis; with `otlp_endpoint`, the hops' spans reach a
//! real OTLP/gRPC receiver, children of the backend's span and of each other.

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{json, Value};
use sidecast::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;

use crate::support::{publish, Client, NodeProcess, TestServer, PATIENCE};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `t:` shows trace ids and tallies receipts; `h:` keeps history only; `p:` shows trace
/// ids and keeps no history.
const NAMESPACES: &str = "[namespaces.t]\nhistory_size = 100\nhistory_ttl = \"1m\"\n\
                          trace_ids = true\nreceipts = true\n\
                          [namespaces.h]\nhistory_size = 100\nhistory_ttl = \"1m\"\n\
                          [namespaces.p]\ntrace_ids = true\n";

fn traced(channel: &str, data: &str, traceparent: &str) -> tonic::Request<pb::PublishRequest> {
    let mut request = tonic::Request::new(pb::PublishRequest {
        receipt: channel.starts_with("t:"),
        ..publish(channel, data)
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

async fn subscriber(server_url: &str, user: &str, channels: &[&str]) -> Client {
    let mut client = Client::open(server_url)
        .await
        .authenticate(&crate::support::token(
            user,
            json!({"channels": ["t:*", "h:*", "p:*"]}),
        ))
        .await;
    for (id, channel) in channels.iter().enumerate() {
        let reply = client.subscribe(id as u64 + 1, channel).await;
        assert!(reply.get("result").is_some(), "{reply}");
    }
    client
}

async fn next_pub(client: &mut Client) -> Value {
    loop {
        let message = client.recv().await;
        if message["type"] == "pub" {
            return message;
        }
    }
}

#[tokio::test]
async fn the_trace_id_reaches_the_pub_push_the_answer_and_the_receipt() {
    let server = TestServer::start_with_file(Some(NAMESPACES), &[]).await;
    let mut ann = subscriber(&server.ws_url, "ann", &["t:room", "h:room"]).await;
    let mut grpc = server.grpc().await;

    let answer = grpc
        .publish(traced("t:room", r#"{"n":1}"#, SAMPLED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.trace_id, TRACE_ID);
    let push = next_pub(&mut ann).await;
    assert_eq!(push["trace"], TRACE_ID, "{push}");
    assert_eq!(push["data"], json!({"n": 1}));

    let receipt = grpc
        .receipt(pb::ReceiptRequest {
            channel: "t:room".into(),
            offset: answer.offset,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.trace_id, TRACE_ID);
    assert_eq!(receipt.delivered, 1);

    // A namespace without trace_ids: the same publication shape, no trace field.
    let answer = grpc
        .publish(traced("h:room", r#"{"n":2}"#, SAMPLED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.trace_id, TRACE_ID);
    let push = next_pub(&mut ann).await;
    assert_eq!(push["data"], json!({"n": 2}));
    assert!(push.get("trace").is_none(), "{push}");

    // An untraced publication: no trace anywhere.
    let answer = grpc
        .publish(publish("t:room", r#"{"n":3}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.trace_id, "");
    let push = next_pub(&mut ann).await;
    assert_eq!(push["data"], json!({"n": 3}));
    assert!(push.get("trace").is_none(), "{push}");
}

#[tokio::test]
async fn a_malformed_traceparent_field_is_refused_and_malformed_metadata_ignored() {
    let server = TestServer::start_with_file(Some(NAMESPACES), &[]).await;
    let mut ann = subscriber(&server.ws_url, "ann", &["t:room"]).await;
    let mut grpc = server.grpc().await;
    for bad in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let field = pb::PublishRequest {
            traceparent: bad.into(),
            ..publish("t:room", "1")
        };
        let refused = grpc.publish(field).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad}");
        assert!(refused.message().contains("traceparent"), "{refused:?}");

        // The same value as metadata: published, untraced.
        let answer = grpc
            .publish(traced("t:room", r#""untraced""#, bad))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.trace_id, "", "{bad}");
        let push = next_pub(&mut ann).await;
        assert_eq!(push["data"], "untraced");
        assert!(push.get("trace").is_none(), "{push}");
    }
    // A valid field wins over malformed metadata.
    let mut both = traced("t:room", r#""field""#, "garbage");
    both.get_mut().traceparent = SAMPLED.into();
    let answer = grpc.publish(both).await.unwrap().into_inner();
    assert_eq!(answer.trace_id, TRACE_ID);
    // The refused ones were never delivered: the next publication is this one.
    let push = next_pub(&mut ann).await;
    assert_eq!(
        (push["data"].as_str(), push["trace"].as_str()),
        (Some("field"), Some(TRACE_ID))
    );
}

#[tokio::test]
async fn a_replay_of_an_idempotency_key_publishes_nothing_and_names_no_trace() {
    let server = TestServer::start_with_file(Some(NAMESPACES), &[]).await;
    let mut ann = subscriber(&server.ws_url, "ann", &["t:room"]).await;
    let mut grpc = server.grpc().await;
    let mut first = traced("t:room", "1", SAMPLED);
    first.get_mut().idempotency_key = "k1".into();
    let first = grpc.publish(first).await.unwrap().into_inner();
    assert_eq!(first.trace_id, TRACE_ID);
    let mut again = traced(
        "t:room",
        "1",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    again.get_mut().idempotency_key = "k1".into();
    let again = grpc.publish(again).await.unwrap().into_inner();
    assert_eq!((again.offset, again.trace_id.as_str()), (first.offset, ""));
    grpc.publish(publish("t:room", "2")).await.unwrap();
    // One publication with the first call's trace, then the next: the replay made none.
    let push = next_pub(&mut ann).await;
    assert_eq!(
        (push["data"].as_i64(), push["trace"].as_str()),
        (Some(1), Some(TRACE_ID))
    );
    assert_eq!(next_pub(&mut ann).await["data"], 2);
}

#[tokio::test]
async fn publish_stream_takes_each_publication_s_traceparent_or_the_stream_s() {
    let server = TestServer::start_with_file(Some(NAMESPACES), &[]).await;
    let mut ann = subscriber(&server.ws_url, "ann", &["t:room"]).await;
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (tx, rx) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("traceparent", SAMPLED.parse().unwrap());
    let mut answers = server
        .grpc()
        .await
        .publish_stream(request)
        .await
        .unwrap()
        .into_inner();
    let publications = [
        publish("t:room", "1"),
        pb::PublishRequest {
            traceparent: own.into(),
            ..publish("t:room", "2")
        },
        pb::PublishRequest {
            traceparent: "nonsense".into(),
            ..publish("t:room", "3")
        },
    ];
    for (id, publication) in publications.into_iter().enumerate() {
        let request = pb::PublishStreamRequest {
            id: id as u64,
            publication: Some(publication),
        };
        tx.send(request).await.unwrap();
    }
    let mut results = Vec::new();
    for _ in 0..3 {
        let answer = tokio::time::timeout(PATIENCE, answers.message())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("the stream is open");
        results.push(answer.result.unwrap());
    }
    use pb::publish_stream_response::Result as Answer;
    let [Answer::Published(first), Answer::Published(second), Answer::Error(third)] = &results[..]
    else {
        panic!("{results:?}")
    };
    assert_eq!(first.trace_id, TRACE_ID);
    assert_eq!(second.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(third.code, Code::InvalidArgument as i32);
    assert_eq!(next_pub(&mut ann).await["trace"], TRACE_ID);
    assert_eq!(
        next_pub(&mut ann).await["trace"],
        "0af7651916cd43dd8448eb211c80319c"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_the_trace_id_reaches_every_node_and_the_receipt() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let settings = [("broker", url.as_str())];
    let (a, b) = (
        TestServer::start_ready(Some(NAMESPACES), &settings).await,
        TestServer::start_ready(Some(NAMESPACES), &settings).await,
    );
    let mut ann = subscriber(&a.ws_url, "ann", &["t:room", "p:plain"]).await;
    let mut bob = subscriber(&b.ws_url, "bob", &["t:room", "p:plain"]).await;
    let answer = a
        .grpc()
        .await
        .publish(traced("t:room", r#"{"n":1}"#, SAMPLED))
        .await
        .unwrap()
        .into_inner();
    for client in [&mut ann, &mut bob] {
        assert_eq!(next_pub(client).await["trace"], TRACE_ID);
    }
    // Asked on the node that did not publish it: the trace id came with the publication.
    let receipt = b
        .grpc()
        .await
        .receipt(pb::ReceiptRequest {
            channel: "t:room".into(),
            offset: answer.offset,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (receipt.delivered, receipt.trace_id.as_str()),
        (2, TRACE_ID)
    );

    // Without history a publication reaches even its own node through Redis: the trace too.
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    a.grpc()
        .await
        .publish(traced("p:plain", r#""live""#, own))
        .await
        .unwrap();
    for client in [&mut ann, &mut bob] {
        let push = next_pub(client).await;
        assert_eq!(
            (push["data"].as_str(), push["trace"].as_str()),
            (Some("live"), Some("0af7651916cd43dd8448eb211c80319c"))
        );
    }
}

/// An OTLP/gRPC trace receiver: every span it is sent, with its service's process id.
struct Receiver {
    spans: mpsc::UnboundedSender<(i64, Span)>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            let pid = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "process.pid")
                .and_then(|a| a.value.as_ref()?.value.clone());
            let pid = match pid {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(pid)) => {
                    pid
                }
                _ => 0,
            };
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.spans.send((pid, span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a receiver; its address, and the spans it gets.
async fn receiver() -> (String, mpsc::UnboundedReceiver<(i64, Span)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { spans: tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (address, rx)
}

/// Spans as they come until `enough` holds for those of trace `trace_id`, within a deadline
/// (the nodes send a batch every second).
async fn collect(
    spans: &mut mpsc::UnboundedReceiver<(i64, Span)>,
    trace_id: &str,
    enough: impl Fn(&[(i64, Span)]) -> bool,
) -> Vec<(i64, Span)> {
    let mut ours: Vec<(i64, Span)> = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while !enough(&ours) {
        let (pid, span) = tokio::time::timeout_at(deadline, spans.recv())
            .await
            .unwrap_or_else(|_| panic!("spans in time; got {:#?}", names(&ours)))
            .expect("the receiver runs");
        assert_ne!(
            hex(&span.trace_id),
            UNSAMPLED_TRACE,
            "an unsampled trace was exported"
        );
        if hex(&span.trace_id) == trace_id {
            ours.push((pid, span));
        }
    }
    ours
}

const UNSAMPLED_TRACE: &str = "11112222333344445555666677778888";
const UNSAMPLED: &str = "00-11112222333344445555666677778888-1111222233334444-00";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn names(spans: &[(i64, Span)]) -> Vec<String> {
    spans
        .iter()
        .map(|(pid, s)| {
            format!(
                "{pid} {} {}<-{}",
                s.name,
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect()
}

fn count(spans: &[(i64, Span)], name: &str) -> usize {
    spans.iter().filter(|(_, s)| s.name == name).count()
}

fn one<'a>(spans: &'a [(i64, Span)], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one {name}: {:#?}", names(spans));
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_s_span_reaches_an_otlp_collector_in_the_backend_s_trace() {
    let (endpoint, mut spans) = receiver().await;
    let node = NodeProcess::start(NAMESPACES, &[("otlp_endpoint", &endpoint)]).await;
    let mut ann = subscriber(&node.ws_url, "ann", &["t:room"]).await;
    let mut grpc = pb::control_client::ControlClient::connect(node.grpc_url.clone())
        .await
        .unwrap();
    // An unsampled trace first: its id reaches the client, its spans go nowhere.
    grpc.publish(traced("t:room", "0", UNSAMPLED))
        .await
        .unwrap();
    assert_eq!(next_pub(&mut ann).await["trace"], UNSAMPLED_TRACE);
    grpc.publish(traced("t:room", "1", SAMPLED)).await.unwrap();
    assert_eq!(next_pub(&mut ann).await["trace"], TRACE_ID);

    let ours = collect(&mut spans, TRACE_ID, |ours| {
        ["publish", "engine.publish", "fanout", "writes"]
            .iter()
            .all(|name| count(ours, name) == 1)
    })
    .await;
    let publish = one(&ours, "publish");
    let engine = one(&ours, "engine.publish");
    let fanout = one(&ours, "fanout");
    let writes = one(&ours, "writes");
    // The backend's span (the traceparent's parent id) is the root of ours.
    assert_eq!(hex(&publish.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(engine.parent_span_id, publish.span_id);
    assert_eq!(fanout.parent_span_id, engine.span_id);
    assert_eq!(writes.parent_span_id, fanout.span_id);
    // Recorded numbers may arrive as integers or as text: compare their text.
    let attribute = |span: &Span, key: &str| {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
        match span
            .attributes
            .iter()
            .find(|a| a.key == key)?
            .value
            .clone()?
            .value?
        {
            V::IntValue(n) => Some(n.to_string()),
            V::StringValue(text) => Some(text),
            other => Some(format!("{other:?}")),
        }
    };
    assert_eq!(attribute(fanout, "subscribers").as_deref(), Some("1"));
    assert_eq!(attribute(writes, "sockets").as_deref(), Some("1"));
    assert_eq!(attribute(writes, "route").as_deref(), Some("inline"));
    assert_eq!(attribute(engine, "engine").as_deref(), Some("memory"));
    assert_eq!(attribute(publish, "channel").as_deref(), Some("t:room"));
    assert!(writes.end_time_unix_nano >= writes.start_time_unix_nano);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_every_node_s_fanout_is_a_child_of_the_publishing_node_s_span() {
    let redis = sidecast::testkit::RedisServer::start();
    let url = redis.url();
    let (endpoint, mut spans) = receiver().await;
    let settings = [("broker", url.as_str()), ("otlp_endpoint", &endpoint)];
    let a = NodeProcess::start(NAMESPACES, &settings).await;
    let b = NodeProcess::start(NAMESPACES, &settings).await;
    let mut ann = subscriber(&a.ws_url, "ann", &["t:room"]).await;
    let mut bob = subscriber(&b.ws_url, "bob", &["t:room"]).await;
    let mut grpc = pb::control_client::ControlClient::connect(a.grpc_url.clone())
        .await
        .unwrap();
    grpc.publish(traced("t:room", "1", SAMPLED)).await.unwrap();
    for client in [&mut ann, &mut bob] {
        assert_eq!(next_pub(client).await["trace"], TRACE_ID);
    }
    let ours = collect(&mut spans, TRACE_ID, |ours| {
        count(ours, "publish") == 1
            && count(ours, "engine.publish") == 1
            && count(ours, "fanout") == 2
            && count(ours, "writes") == 2
    })
    .await;
    let engine = one(&ours, "engine.publish");
    let fanouts: Vec<&(i64, Span)> = ours.iter().filter(|(_, s)| s.name == "fanout").collect();
    for (_, fanout) in &fanouts {
        assert_eq!(fanout.parent_span_id, engine.span_id, "{:#?}", names(&ours));
    }
    // One fan-out on each node.
    let pids: std::collections::HashSet<i64> = fanouts.iter().map(|(pid, _)| *pid).collect();
    assert_eq!(pids.len(), 2, "{:#?}", names(&ours));
    let by_id: HashMap<Vec<u8>, &Span> = ours.iter().map(|(_, s)| (s.span_id.clone(), s)).collect();
    for (_, writes) in ours.iter().filter(|(_, s)| s.name == "writes") {
        assert_eq!(by_id[&writes.parent_span_id].name, "fanout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_stops_no_delivery() {
    // Nobody listens there: every export fails.
    let endpoint = format!("http://127.0.0.1:{}", crate::support::free_port());
    let node = NodeProcess::start(NAMESPACES, &[("otlp_endpoint", &endpoint)]).await;
    let mut ann = subscriber(&node.ws_url, "ann", &["t:room"]).await;
    let mut grpc = pb::control_client::ControlClient::connect(node.grpc_url.clone())
        .await
        .unwrap();
    for n in 0..20 {
        let answer = grpc
            .publish(traced("t:room", &n.to_string(), SAMPLED))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.trace_id, TRACE_ID);
        let push = next_pub(&mut ann).await;
        assert_eq!(
            (push["data"].as_i64(), push["trace"].as_str()),
            (Some(n), Some(TRACE_ID))
        );
    }
}
