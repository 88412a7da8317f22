// The app's one connection to its sidecar, and its one event consumer.

import { RpcError, Sidecast, type Consumer } from "@sidecast/server";

import { ROOM, rename, type RoomEvent } from "./room";

// One per server process, kept across hot reloads in development.
const global = globalThis as unknown as { sidecast?: Sidecast; consumer?: Consumer };

/** The control API of the sidecar (SIDECAST_GRPC, SIDECAST_API_KEY). */
export function sidecast(): Sidecast {
  global.sidecast ??= new Sidecast();
  return global.sidecast;
}

/** Joins the event group "chat-app": who came and went (logged), and the room's rpc. Started
 * once by instrumentation.ts when the server starts. */
export function startConsumer(): void {
  if (global.consumer) return;
  global.consumer = sidecast().consume({
    group: "chat-app",
    kinds: ["connect", "disconnect"],
    onEvent: (event) => {
      if (event.kind === "connect") console.log(`sidecast: ${event.user} connected (${event.client})`);
      if (event.kind === "disconnect") console.log(`sidecast: ${event.user} left, code ${event.code}`);
    },
    rpcMethods: ["room."],
    onRpc: async ({ method, data, user }) => {
      if (method !== "room.rename") throw new RpcError(404, `no method ${method}`);
      let title: string;
      try {
        title = rename((data as { title?: unknown } | null)?.title);
      } catch (e) {
        throw new RpcError(400, (e as Error).message);
      }
      const event: RoomEvent = { type: "renamed", user, title, at: Date.now() };
      await sidecast().publish(ROOM, event);
      return { title };
    },
    onError: (error) => console.error(`sidecast events: ${error.message}`),
  });
  const stop = () => void global.consumer?.stop();
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}
