// React binding (`@sidecast/client/react`): a provider for one client, and hooks that
// subscribe while a component is mounted. Only this subpath imports React.

import { createContext, createElement, useContext, useEffect, useState, type ReactNode } from "react";

import type { Client } from "./client.js";
import type { ClientInfo, Publication, Subscription, SubscriptionState } from "./subscription.js";

const ClientContext = createContext<Client | null>(null);

/** Connects `client` while mounted and gives it to the hooks below. */
export function SidecastProvider(props: { client: Client; children?: ReactNode }): ReactNode {
  const { client } = props;
  useEffect(() => {
    client.connect();
    return () => client.disconnect();
  }, [client]);
  return createElement(ClientContext.Provider, { value: client }, props.children);
}

/** The client of the nearest SidecastProvider. */
export function useSidecast(): Client {
  const client = useContext(ClientContext);
  if (!client) throw new Error("sidecast: useSidecast needs a SidecastProvider above it");
  return client;
}

/** How many mounted components hold each subscription: the last one to let go ends it. */
const holders = new WeakMap<Subscription, number>();

/** Subscribes while held; the subscription ends when its last holder lets go. Counted per
 * subscription, not per channel: one the server ended is not confused with its successor. */
function hold(client: Client, channel: string): [Subscription, () => void] {
  const subscription = client.subscribe(channel);
  holders.set(subscription, (holders.get(subscription) ?? 0) + 1);
  const release = () => {
    const left = (holders.get(subscription) ?? 1) - 1;
    if (left > 0) {
      holders.set(subscription, left);
      return;
    }
    holders.delete(subscription);
    void subscription.unsubscribe().catch(() => {});
  };
  return [subscription, release];
}

export interface SubscriptionView<T> {
  state: SubscriptionState;
  /** The latest publication, or undefined before the first one. */
  last?: Publication<T>;
  /** True once something may have been missed (see `unrecovered` in docs/sdk.md); reload and
   * call `clear`. */
  unrecovered: boolean;
  clear: () => void;
}

/** Subscribes to `channel` while the component is mounted; `onPublication` sees every
 * publication, in order. */
export function useSubscription<T = unknown>(
  channel: string,
  onPublication?: (publication: Publication<T>) => void,
): SubscriptionView<T> {
  const client = useSidecast();
  const [state, setState] = useState<SubscriptionState>("subscribing");
  const [last, setLast] = useState<Publication<T> | undefined>(undefined);
  const [unrecovered, setUnrecovered] = useState(false);
  const handler = useLatest(onPublication);
  useEffect(() => {
    const [subscription, release] = hold(client, channel);
    setState(subscription.state);
    const offs = [
      subscription.on("state", (e) => setState(e.state)),
      subscription.on("publication", (p) => {
        setLast(p as Publication<T>);
        handler.current?.(p as Publication<T>);
      }),
      subscription.on("unrecovered", () => setUnrecovered(true)),
    ];
    return () => {
      offs.forEach((off) => off());
      release();
    };
  }, [client, channel]);
  return { state, last, unrecovered, clear: () => setUnrecovered(false) };
}

/** Who is in `channel` (a namespace with `presence`; `join_leave` keeps it current), while
 * the component is mounted. */
export function usePresence(channel: string): ClientInfo[] {
  const client = useSidecast();
  const [clients, setClients] = useState<ClientInfo[]>([]);
  useEffect(() => {
    const [subscription, release] = hold(client, channel);
    let live = true;
    const load = () =>
      client.presence(channel).then(
        (list) => live && setClients(list),
        () => {},
      );
    const offs = [
      subscription.on("subscribed", () => void load()),
      subscription.on("join", (who) =>
        setClients((list) => [...list.filter((c) => c.client !== who.client), who]),
      ),
      subscription.on("leave", (who) => setClients((list) => list.filter((c) => c.client !== who.client))),
    ];
    if (subscription.state === "subscribed") void load();
    return () => {
      live = false;
      offs.forEach((off) => off());
      release();
    };
  }, [client, channel]);
  return clients;
}

/** A ref that always holds the latest value (callbacks without resubscribing). */
function useLatest<T>(value: T): { current: T } {
  const [ref] = useState(() => ({ current: value }));
  ref.current = value;
  return ref;
}
