"use client";

import { useEffect, useMemo, useState } from "react";

import { Client, type ConnectionState } from "@sidecast/client";
import { SidecastProvider, usePresence, useSidecast, useSubscription } from "@sidecast/client/react";

import { sendMessage } from "../actions";
import { ROOM, TYPING, type RoomEvent } from "@/lib/room";

/** Typing shows for this long after someone's last keystroke. */
const TYPING_SHOWN_MS = 3000;
/** A typing notice is published at most this often while typing. */
const TYPING_EVERY_MS = 1000;

export function Chat(props: { user: string; wsUrl: string; initialTitle: string }) {
  const client = useMemo(
    () =>
      new Client({
        url: props.wsUrl,
        // The route handler mints a short-lived token for the signed-in user; the client asks
        // again before it expires and after a 4001/4002.
        getToken: async () => {
          const response = await fetch("/api/realtime-token", { cache: "no-store" });
          if (!response.ok) throw new Error(`token: ${response.status}`);
          return response.text();
        },
      }),
    [props.wsUrl],
  );
  return (
    <SidecastProvider client={client}>
      <Room user={props.user} initialTitle={props.initialTitle} />
    </SidecastProvider>
  );
}

type Shown = RoomEvent & { offset: number };

function Room({ user, initialTitle }: { user: string; initialTitle: string }) {
  const client = useSidecast();
  const [connection, setConnection] = useState<ConnectionState>(client.state);
  const [messages, setMessages] = useState<Shown[]>([]);
  const [title, setTitle] = useState(initialTitle);
  const [error, setError] = useState("");

  useEffect(() => client.on("state", ({ state }) => setConnection(state)), [client]);

  const add = (list: Shown[], more: Shown[]) => {
    const seen = new Set(list.map((m) => m.offset));
    return [...list, ...more.filter((m) => !seen.has(m.offset))].sort((a, b) => a.offset - b.offset);
  };
  const room = useSubscription<RoomEvent>(ROOM, (p) => {
    setMessages((list) => add(list, [{ ...p.data, offset: p.offset ?? 0 }]));
    if (p.data.type === "renamed") setTitle(p.data.title);
  });

  // After a reconnect: either the subscription recovered what was missed from its position,
  // or (sidecast restarted with the memory engine, or the client was away longer than the
  // history keeps) the list is reloaded from history. Shown, so that users know.
  const [sync, setSync] = useState<"live" | "recovered" | "reloaded">("live");
  useEffect(
    () =>
      client.getSubscription(ROOM)?.on("subscribed", ({ resumed, recovered }) => {
        if (resumed && recovered) setSync("recovered");
      }),
    [client],
  );

  // History on load, and again after a reconnect that could not recover.
  const [loaded, setLoaded] = useState(false);
  useEffect(() => {
    if (room.state !== "subscribed" || (loaded && !room.unrecovered)) return;
    const replace = room.unrecovered;
    room.clear();
    setLoaded(true);
    client.history(ROOM, { limit: 50, reverse: true }).then(
      ({ publications }) => {
        const page = publications.map((p) => ({ ...(p.data as RoomEvent), offset: p.offset ?? 0 }));
        setMessages((list) => add(replace ? [] : list, page));
        if (replace) setSync("reloaded");
      },
      (e) => setError(`history: ${e.message}`),
    );
  }, [client, room.state, room.unrecovered, loaded]);

  const people = usePresence(ROOM);
  const names = [...new Set(people.map((p) => p.user))].sort();

  // "…is typing": clients publish into the typing channel themselves.
  const [typing, setTyping] = useState<Record<string, number>>({});
  const [now, setNow] = useState(Date.now());
  useSubscription<{ user: string }>(TYPING, (p) => setTyping((t) => ({ ...t, [p.data.user]: Date.now() })));
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), 500);
    return () => clearInterval(timer);
  }, []);
  const typers = Object.entries(typing)
    .filter(([who, at]) => who !== user && now - at < TYPING_SHOWN_MS)
    .map(([who]) => who)
    .sort();
  const [lastTyping, setLastTyping] = useState(0);
  const keystroke = () => {
    if (Date.now() - lastTyping < TYPING_EVERY_MS || client.state !== "connected") return;
    setLastTyping(Date.now());
    client.publish(TYPING, { user }).catch(() => {});
  };

  const [text, setText] = useState("");
  const send = async (e: React.FormEvent) => {
    e.preventDefault();
    const result = await sendMessage(crypto.randomUUID(), text);
    if (result.ok) {
      setText("");
      setError("");
    } else setError(result.error);
  };

  const [newTitle, setNewTitle] = useState("");
  const renameRoom = async (e: React.FormEvent) => {
    e.preventDefault();
    try {
      // A client rpc: answered by the app's event consumer (lib/sidecast.ts).
      const answer = (await client.rpc("room.rename", { title: newTitle })) as { title: string };
      setTitle(answer.title);
      setNewTitle("");
      setError("");
    } catch (e) {
      setError(`rename: ${(e as Error).message}`);
    }
  };

  return (
    <section>
      <h1 data-testid="title">{title}</h1>
      <p>
        <span className="state" data-testid="connection" data-state={connection}>
          {connection}
        </span>{" "}
        <span className="sync" data-testid="sync" data-sync={sync}>
          {sync === "recovered" && "caught up on what you missed"}
          {sync === "reloaded" && "history reloaded"}
        </span>
      </p>
      <div className="room">
        <ul className="messages" data-testid="messages">
          {messages.map((m) =>
            m.type === "message" ? (
              <li key={m.offset} data-offset={m.offset}>
                <strong>{m.user}</strong>: <span className="text">{m.text}</span>
              </li>
            ) : m.type === "renamed" ? (
              <li key={m.offset} className="system">
                {m.user} renamed the room to {m.title}
              </li>
            ) : null, // others publish here too (a backend's welcome): not this page's concern
          )}
        </ul>
        <ul className="people" data-testid="presence">
          {names.map((name) => (
            <li key={name}>{name}</li>
          ))}
        </ul>
      </div>
      <p className="typing" data-testid="typing">
        {typers.length > 0 && `${typers.join(", ")} ${typers.length === 1 ? "is" : "are"} typing…`}
      </p>
      <form onSubmit={send}>
        <input
          type="text"
          aria-label="message"
          value={text}
          maxLength={500}
          onChange={(e) => {
            setText(e.target.value);
            keystroke();
          }}
        />
        <button type="submit">Send</button>
      </form>
      <form onSubmit={renameRoom}>
        <input type="text" aria-label="room title" value={newTitle} onChange={(e) => setNewTitle(e.target.value)} />
        <button type="submit">Rename</button>
      </form>
      {error && <p className="error" data-testid="error">{error}</p>}
    </section>
  );
}
