"""A small sidecast backend in Python (grpcio): the same one as ../go, line for line.

It joins the event group SIDECAST_GROUP ("app"), handles each event and then acknowledges
it. Handling means printing it as a JSON line and, for a subscription, publishing a welcome
to the channel (with an idempotency key, so a redelivered event does not welcome twice) and
printing who is present there. It answers the rpc method "app.echo" and refuses the other
"app." methods with 404. On SIGTERM or Ctrl-C it half-closes its stream: sidecast applies the
acknowledgements sent so far, ends the stream, and hands anything unacknowledged to the
group's other members. See README.md for how to run it.
"""

import json
import os
import queue
import signal
import threading

import grpc

from sidecast.v1 import control_pb2 as pb
from sidecast.v1 import control_pb2_grpc as pb_grpc

ADDRESS = os.environ.get("SIDECAST_GRPC", "127.0.0.1:50051")
API_KEY = os.environ.get("SIDECAST_API_KEY", "")
GROUP = os.environ.get("SIDECAST_GROUP", "app")
METADATA = [("authorization", f"Bearer {API_KEY}")] if API_KEY else []


def emit(line):
    print(json.dumps(line, separators=(",", ":")), flush=True)


def requests(acks):
    """The request side of the stream: the join, then acknowledgements until None."""
    yield pb.EventsRequest(
        join=pb.Join(
            group=GROUP,
            kinds=[
                pb.EVENT_KIND_CONNECT,
                pb.EVENT_KIND_DISCONNECT,
                pb.EVENT_KIND_SUBSCRIBE,
                pb.EVENT_KIND_UNSUBSCRIBE,
                pb.EVENT_KIND_PUBLISH,
                pb.EVENT_KIND_RPC,
            ],
            rpc_methods=["app."],
        )
    )
    while (seq := acks.get()) is not None:
        yield pb.EventsRequest(ack=pb.Ack(seqs=[seq]))


def handle(control, event):
    """What this backend does with an event before acknowledging it. A real one updates its
    database here, idempotently: an event can arrive twice, marked redelivered."""
    emit(describe(event))
    if event.WhichOneof("kind") == "subscribe":
        welcome(control, event.subscribe.channel, event.client, event.user)


def welcome(control, channel, client, user):
    """Publishes a welcome to the channel, then asks who is there."""
    data = json.dumps({"welcome": user}, separators=(",", ":")).encode()
    published = control.Publish(
        pb.PublishRequest(channel=channel, data=data, idempotency_key=f"welcome:{client}:{channel}"),
        metadata=METADATA,
    )
    present = control.Presence(pb.PresenceRequest(channel=channel), metadata=METADATA)
    users = sorted({c.user for c in present.clients})
    emit({"welcomed": channel, "offset": published.offset, "present": users})


def answer(control, event):
    """Answers an rpc with Control.Reply: rpcs are never acknowledged nor redelivered."""
    rpc = event.rpc
    if rpc.method == "app.echo":
        data = {"echo": json.loads(rpc.data or b"null"), "user": event.user}
        reply = pb.ReplyRequest(rpc_id=rpc.rpc_id, data=json.dumps(data, separators=(",", ":")).encode())
    else:
        reply = pb.ReplyRequest(rpc_id=rpc.rpc_id, error=pb.RpcError(code=404, message=f"no method {rpc.method}"))
    try:
        control.Reply(reply, metadata=METADATA)
    except grpc.RpcError as e:
        # NOT_FOUND: the client stopped waiting (rpc_timeout) or went away.
        emit({"reply_failed": e.code().name})


def describe(event):
    kind = event.WhichOneof("kind")
    line = {"seq": event.seq, "kind": kind, "client": event.client, "user": event.user}
    if event.redelivered:
        line["redelivered"] = True
    if kind == "connect":
        line["meta"] = json.loads(event.connect.meta or b"null")
    elif kind == "disconnect":
        line["code"] = event.disconnect.code
    elif kind in ("subscribe", "unsubscribe"):
        line["channel"] = getattr(event, kind).channel
    elif kind == "publish":
        line["channel"] = event.publish.channel
        line["data"] = json.loads(event.publish.data or b"null")
    elif kind == "rpc":
        line["method"] = event.rpc.method
    elif kind == "lost":
        line["lost"] = [event.lost.first_seq, event.lost.last_seq]
    return line


def serve(control, acks, done):
    try:
        for response in control.Events(requests(acks), metadata=METADATA):
            if response.HasField("joined"):
                joined = response.joined
                emit({"joined": GROUP, "resumed": joined.resumed, "buffered": joined.buffered})
                continue
            event = response.event
            if event.WhichOneof("kind") == "rpc":
                emit(describe(event))
                answer(control, event)
                continue
            try:
                handle(control, event)
            except grpc.RpcError as e:
                # Left unacknowledged: the group redelivers it once this stream ends.
                emit({"handler_failed": e.code().name, "seq": event.seq})
                continue
            acks.put(event.seq)
        emit({"ended": "ok"})
    except grpc.RpcError as e:
        emit({"ended": e.code().name, "details": e.details()})
    finally:
        done.set()


def main():
    with grpc.insecure_channel(ADDRESS) as channel:
        control = pb_grpc.ControlStub(channel)
        acks = queue.Queue()
        done = threading.Event()
        # SIGTERM / Ctrl-C: stop acknowledging and half-close; sidecast ends the stream.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: acks.put(None))
        worker = threading.Thread(target=serve, args=(control, acks, done), daemon=True)
        worker.start()
        done.wait()  # interrupted by the signals above, then waits on
        worker.join()


if __name__ == "__main__":
    main()
