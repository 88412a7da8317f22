"""A sidecast backend in Python: receives what clients do, answers their rpcs.

It joins the event group "app" (SIDECAST_GROUP), handles each event and acknowledges it,
and answers rpc methods starting with "app.". On SIGTERM or Ctrl-C it half-closes its
stream: sidecast applies the acknowledgements sent so far, ends the stream, and hands
anything unacknowledged to the group's other members. Each event is printed as a JSON line.

From the repository root (docs/backend.md):
    python3 -m venv .venv
    .venv/bin/pip install -r tests/py/requirements.txt
    mkdir -p gen
    .venv/bin/python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen proto/sidecast/v1/control.proto
    PYTHONPATH=gen .venv/bin/python examples/python/backend.py
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


def answer(control, event):
    """Answers an rpc with Control.Reply: rpcs are never acknowledged nor redelivered."""
    rpc = event.rpc
    if rpc.method == "app.echo":
        data = {"echo": json.loads(rpc.data), "user": event.user}
        encoded = json.dumps(data, separators=(",", ":")).encode()
        reply = pb.ReplyRequest(rpc_id=rpc.rpc_id, data=encoded)
    else:
        error = pb.RpcError(code=404, message=f"no method {rpc.method}")
        reply = pb.ReplyRequest(rpc_id=rpc.rpc_id, error=error)
    try:
        control.Reply(reply, metadata=METADATA)
    except grpc.RpcError as e:
        # NOT_FOUND: the client stopped waiting (rpc_timeout) or went away.
        print(json.dumps({"reply_failed": e.code().name}), flush=True)


def handle(event):
    """What this backend does with an event: print it as a JSON line. A real one updates its
    database here, idempotently (an event can arrive twice, marked redelivered)."""
    print(json.dumps(describe(event)), flush=True)


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
        line["data"] = json.loads(event.publish.data)
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
                print(json.dumps({"joined": GROUP, "resumed": joined.resumed,
                                  "buffered": joined.buffered}), flush=True)
                continue
            event = response.event
            if event.WhichOneof("kind") == "rpc":
                print(json.dumps(describe(event)), flush=True)
                answer(control, event)  # Control.Reply; rpcs are not acknowledged
            else:
                handle(event)
                acks.put(event.seq)  # acknowledged once handled
        print(json.dumps({"ended": "ok"}), flush=True)
    except grpc.RpcError as e:
        print(json.dumps({"ended": e.code().name, "details": e.details()}), flush=True)
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
