// A small sidecast backend in Go (google.golang.org/grpc): the same one as ../python.
//
// It joins the event group SIDECAST_GROUP ("app"), handles each event and then acknowledges
// it. Handling means printing it as a JSON line and, for a subscription, publishing a welcome
// to the channel (with an idempotency key, so a redelivered event does not welcome twice) and
// printing who is present there. It answers the rpc method "app.echo" and refuses the other
// "app." methods with 404. On SIGTERM or Ctrl-C it half-closes its stream: sidecast applies
// the acknowledgements sent so far, ends the stream, and hands anything unacknowledged to the
// group's other members. See README.md for how to run it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "example.com/sidecast-backend/gen/sidecastv1"
)

// callTimeout bounds each unary call: a backend must not wait forever on a stuck node.
const callTimeout = 5 * time.Second

func main() {
	address := env("SIDECAST_GRPC", "127.0.0.1:50051")
	group := env("SIDECAST_GROUP", "app")
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("sidecast at %s: %v", address, err)
	}
	defer conn.Close()
	b := &backend{control: pb.NewControlClient(conn), apiKey: os.Getenv("SIDECAST_API_KEY")}

	// SIGTERM / Ctrl-C: stop acknowledging and half-close; sidecast ends the stream.
	stop, unregister := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer unregister()
	if err := b.serve(stop, group); err != nil {
		emit(map[string]any{"ended": status.Code(err).String(), "details": status.Convert(err).Message()})
		os.Exit(1)
	}
	emit(map[string]any{"ended": "ok"})
}

type backend struct {
	control pb.ControlClient
	apiKey  string
}

// ctx carries the API key (when there is one) to every call.
func (b *backend) ctx(parent context.Context) context.Context {
	if b.apiKey == "" {
		return parent
	}
	return metadata.AppendToOutgoingContext(parent, "authorization", "Bearer "+b.apiKey)
}

// serve joins the group and handles events until the stream ends: after stop, once sidecast
// has applied the acknowledgements sent before the half-close.
func (b *backend) serve(stop context.Context, group string) error {
	// Not cancelled by stop: the stream must outlive the half-close to end cleanly.
	stream, err := b.control.Events(b.ctx(context.Background()))
	if err != nil {
		return err
	}
	join := &pb.Join{
		Group: group,
		Kinds: []pb.EventKind{
			pb.EventKind_EVENT_KIND_CONNECT,
			pb.EventKind_EVENT_KIND_DISCONNECT,
			pb.EventKind_EVENT_KIND_SUBSCRIBE,
			pb.EventKind_EVENT_KIND_UNSUBSCRIBE,
			pb.EventKind_EVENT_KIND_PUBLISH,
			pb.EventKind_EVENT_KIND_RPC,
		},
		RpcMethods: []string{"app."},
	}
	if err := stream.Send(&pb.EventsRequest{Request: &pb.EventsRequest_Join{Join: join}}); err != nil {
		return err
	}

	// One goroutine owns the sending side (gRPC allows one sender at a time): it sends the
	// acknowledgements, and on stop sends those already queued, then half-closes.
	acks := make(chan uint64, 1024)
	halfClosed := make(chan struct{})
	go func() {
		defer close(halfClosed)
		for {
			select {
			case seq := <-acks:
				if stream.Send(ack(seq)) != nil {
					return // the stream broke; Recv reports why
				}
			case <-stop.Done():
				for {
					select {
					case seq := <-acks:
						_ = stream.Send(ack(seq))
					default:
						_ = stream.CloseSend()
						return
					}
				}
			}
		}
	}()

	for {
		response, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if joined := response.GetJoined(); joined != nil {
			emit(map[string]any{"joined": group, "resumed": joined.Resumed, "buffered": joined.Buffered})
			continue
		}
		event := response.GetEvent()
		if rpc := event.GetRpc(); rpc != nil {
			emit(describe(event))
			b.answer(event, rpc) // rpcs are not acknowledged
			continue
		}
		if err := b.handle(event); err != nil {
			// Left unacknowledged: the group redelivers it once this stream ends.
			emit(map[string]any{"handler_failed": status.Code(err).String(), "seq": event.Seq})
			continue
		}
		select {
		case acks <- event.Seq:
		case <-halfClosed: // after stop nothing more is acknowledged
		}
	}
}

// handle is what this backend does with an event before acknowledging it. A real one updates
// its database here, idempotently: an event can arrive twice, marked redelivered.
func (b *backend) handle(event *pb.Event) error {
	emit(describe(event))
	if sub := event.GetSubscribe(); sub != nil {
		return b.welcome(sub.Channel, event.Client, event.User)
	}
	return nil
}

// welcome publishes a welcome to the channel, then asks who is there.
func (b *backend) welcome(channel, client, user string) error {
	ctx, cancel := context.WithTimeout(b.ctx(context.Background()), callTimeout)
	defer cancel()
	data, _ := json.Marshal(map[string]string{"welcome": user})
	published, err := b.control.Publish(ctx, &pb.PublishRequest{
		Channel:        channel,
		Data:           data,
		IdempotencyKey: fmt.Sprintf("welcome:%s:%s", client, channel),
	})
	if err != nil {
		return err
	}
	present, err := b.control.Presence(ctx, &pb.PresenceRequest{Channel: channel})
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	users := []string{}
	for _, c := range present.Clients {
		if !seen[c.User] {
			seen[c.User] = true
			users = append(users, c.User)
		}
	}
	sort.Strings(users)
	emit(map[string]any{"welcomed": channel, "offset": published.Offset, "present": users})
	return nil
}

// answer replies to an rpc with Control.Reply: rpcs are never acknowledged nor redelivered.
func (b *backend) answer(event *pb.Event, rpc *pb.RpcEvent) {
	reply := &pb.ReplyRequest{RpcId: rpc.RpcId}
	if rpc.Method == "app.echo" {
		data, _ := json.Marshal(map[string]any{"echo": raw(rpc.Data), "user": event.User})
		reply.Result = &pb.ReplyRequest_Data{Data: data}
	} else {
		reply.Result = &pb.ReplyRequest_Error{Error: &pb.RpcError{Code: 404, Message: "no method " + rpc.Method}}
	}
	ctx, cancel := context.WithTimeout(b.ctx(context.Background()), callTimeout)
	defer cancel()
	if _, err := b.control.Reply(ctx, reply); err != nil {
		// NOT_FOUND: the client stopped waiting (rpc_timeout) or went away.
		emit(map[string]any{"reply_failed": status.Code(err).String()})
	}
}

func describe(event *pb.Event) map[string]any {
	line := map[string]any{"seq": event.Seq, "client": event.Client, "user": event.User}
	if event.Redelivered {
		line["redelivered"] = true
	}
	switch kind := event.Kind.(type) {
	case *pb.Event_Connect:
		line["kind"] = "connect"
		line["meta"] = raw(kind.Connect.Meta)
	case *pb.Event_Disconnect:
		line["kind"] = "disconnect"
		line["code"] = kind.Disconnect.Code
	case *pb.Event_Subscribe:
		line["kind"] = "subscribe"
		line["channel"] = kind.Subscribe.Channel
	case *pb.Event_Unsubscribe:
		line["kind"] = "unsubscribe"
		line["channel"] = kind.Unsubscribe.Channel
	case *pb.Event_Publish:
		line["kind"] = "publish"
		line["channel"] = kind.Publish.Channel
		line["data"] = raw(kind.Publish.Data)
	case *pb.Event_Rpc:
		line["kind"] = "rpc"
		line["method"] = kind.Rpc.Method
	case *pb.Event_Lost:
		line["kind"] = "lost"
		line["lost"] = []uint64{kind.Lost.FirstSeq, kind.Lost.LastSeq}
	}
	return line
}

func ack(seq uint64) *pb.EventsRequest {
	return &pb.EventsRequest{Request: &pb.EventsRequest_Ack{Ack: &pb.Ack{Seqs: []uint64{seq}}}}
}

// raw keeps JSON payloads as they are; an empty one is null.
func raw(data []byte) json.RawMessage {
	if len(data) == 0 {
		return json.RawMessage("null")
	}
	return json.RawMessage(data)
}

func emit(line map[string]any) {
	encoded, err := json.Marshal(line)
	if err != nil {
		log.Fatalf("encoding %v: %v", line, err)
	}
	fmt.Println(string(encoded))
}

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}
