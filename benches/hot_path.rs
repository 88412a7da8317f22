//! Microbenchmarks of the hot path: the protocol codec, the per-connection queue and the
//! hub's fan-out. `cargo bench --bench hot_path`; BENCHMARKS.md records the figures.

use std::sync::Arc;

use bytes::Bytes;
use divan::Bencher;
use sidecast::config::Config;
use sidecast::events::Events;
use sidecast::hub::{Hub, SubscribedBy};
use sidecast::metrics::Metrics;
use sidecast::outbox::Outbox;
use sidecast::wire::{command, ServerMessage};

fn main() {
    divan::main();
}

#[divan::bench]
fn decode_subscribe() -> command::Request {
    command::decode(divan::black_box(
        br#"{"id":12,"op":"subscribe","channel":"chat:lobby"}"#,
    ))
    .unwrap()
}

#[divan::bench]
fn decode_publish() -> command::Request {
    command::decode(divan::black_box(
        br#"{"id":13,"op":"publish","channel":"chat:lobby","data":{"text":"hello there","n":42}}"#,
    ))
    .unwrap()
}

#[divan::bench(args = [64, 1024])]
fn encode_pub_frame(bencher: Bencher, size: usize) {
    let data = format!("\"{}\"", "x".repeat(size - 2));
    bencher.bench(|| {
        ServerMessage::Pub {
            channel: divan::black_box("chat:lobby"),
            data: divan::black_box(data.as_bytes()),
            offset: Some(17),
            trace: None,
        }
        .frame()
    });
}

/// Writes everything `outbox` holds to a sink that takes it all.
fn drain(outbox: &Outbox, sink: &mut tokio::io::Sink) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while outbox.has_work() {
        let _ = outbox.poll_drain(&mut cx, sink);
    }
}

#[divan::bench]
fn outbox_push_drain(bencher: Bencher) {
    let outbox = Outbox::new(1 << 20);
    let frame = Bytes::from_static(&[0u8; 64]);
    let mut sink = tokio::io::sink();
    bencher.bench_local(|| {
        for _ in 0..8 {
            outbox.push(frame.clone());
        }
        drain(&outbox, &mut sink);
    });
}

/// A hub with `n` connections subscribed to one channel.
fn hub_with(n: usize) -> (Hub, Vec<Arc<Outbox>>) {
    let config = Arc::new(Config::from_layers(None, &[], &[]).unwrap());
    let hub = Hub::new(
        config.clone(),
        Arc::new(Metrics::default()),
        Events::new(&config, Arc::from("bench")),
    );
    let mut outboxes = Vec::new();
    for i in 0..n {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let id: Arc<str> = Arc::from(format!("c{i}"));
        hub.register(id.clone(), &format!("u{i}"), None, None, outbox.clone());
        hub.subscribe(
            &id,
            "room:1",
            SubscribedBy::Client,
            Bytes::from_static(b"{}"),
        )
        .unwrap()
        .run();
        outboxes.push(outbox);
    }
    (hub, outboxes)
}

/// One publication encoded and queued to every subscriber (the queues are drained between
/// samples, outside the measurement; no socket is written: these outboxes have none).
#[divan::bench(args = [100, 1000, 10000], sample_count = 50, sample_size = 1)]
fn hub_fan_out(bencher: Bencher, subscribers: usize) {
    let (hub, outboxes) = hub_with(subscribers);
    let mut sink = tokio::io::sink();
    bencher
        .with_inputs(|| {
            for outbox in &outboxes {
                drain(outbox, &mut sink);
            }
        })
        .bench_local_refs(|_| {
            let (counts, flush) = hub.deliver("room:1", b"{\"n\":1}", None, None, None);
            flush.run();
            counts
        });
}
