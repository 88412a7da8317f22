"use server";

// Server actions: the app validates and publishes; clients never publish chat messages
// themselves (their token's publish claim names only the typing channel).

import { randomUUID } from "node:crypto";

import { redirect } from "next/navigation";

import { ROOM, validText, type RoomEvent } from "@/lib/room";
import { currentUser, signIn, signOut, validName } from "@/lib/session";
import { sidecast } from "@/lib/sidecast";

export async function signInAction(form: FormData): Promise<void> {
  const name = String(form.get("name") ?? "").trim();
  if (!validName(name)) redirect("/?error=name");
  await signIn(name);
  redirect("/");
}

export async function signOutAction(): Promise<void> {
  await signOut();
  redirect("/");
}

/** Publishes a message for the signed-in user. `id` comes from the browser, so that a
 * retried send (a double click, a flaky network) publishes once: it is the idempotency key. */
export async function sendMessage(id: string, text: string): Promise<{ ok: true } | { ok: false; error: string }> {
  const user = await currentUser();
  if (!user) return { ok: false, error: "sign in first" };
  let valid: string;
  try {
    valid = validText(text);
  } catch (e) {
    return { ok: false, error: (e as Error).message };
  }
  const key = /^[\w-]{8,64}$/.test(id) ? id : randomUUID();
  const event: RoomEvent = { type: "message", id: key, user, text: valid, at: Date.now() };
  await sidecast().publish(ROOM, event, { idempotencyKey: `msg:${key}` });
  return { ok: true };
}
