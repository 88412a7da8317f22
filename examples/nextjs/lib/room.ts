// The room: what a message is, who may do what. Business logic lives in the app; sidecast
// only carries what the app decided to publish.

export const ROOM = "chat:lobby";
export const TYPING = "typing:lobby";
export const MAX_TEXT = 500;

export type RoomEvent =
  | { type: "message"; id: string; user: string; text: string; at: number }
  | { type: "renamed"; user: string; title: string; at: number };

/** The room's title: app state (a database in a real app), on globalThis because Next.js
 * loads this module separately for instrumentation (the rpc) and for pages. Renames are
 * announced in the room. */
const state = globalThis as unknown as { roomTitle?: string };

export function roomTitle(): string {
  return state.roomTitle ?? "Lobby";
}

export function rename(to: unknown): string {
  if (typeof to !== "string" || !/^.{1,40}$/u.test(to.trim())) throw new Error("a title is 1 to 40 characters");
  state.roomTitle = to.trim();
  return state.roomTitle;
}

export function validText(text: unknown): string {
  if (typeof text !== "string") throw new Error("no text");
  const trimmed = text.trim();
  if (trimmed.length === 0) throw new Error("the message is empty");
  if (trimmed.length > MAX_TEXT) throw new Error(`a message is at most ${MAX_TEXT} characters`);
  return trimmed;
}
