// Sign-in kept trivial but real: the user's name in a cookie signed with SESSION_SECRET
// (HMAC-SHA256), so that nobody can claim another name by editing the cookie.

import { createHmac, timingSafeEqual } from "node:crypto";

import { cookies } from "next/headers";

const COOKIE = "session";

function sign(name: string): string {
  const secret = process.env.SESSION_SECRET;
  if (!secret) throw new Error("SESSION_SECRET is not set");
  return createHmac("sha256", secret).update(name).digest("base64url");
}

/** A display name: 1 to 24 letters, digits, spaces, dots, dashes or underscores. */
export function validName(name: string): boolean {
  return /^[\p{L}\p{N} ._-]{1,24}$/u.test(name) && name.trim() === name;
}

export async function signIn(name: string): Promise<void> {
  (await cookies()).set(COOKIE, `${encodeURIComponent(name)}.${sign(name)}`, {
    httpOnly: true,
    sameSite: "lax",
    path: "/",
    maxAge: 60 * 60 * 24 * 7,
  });
}

export async function signOut(): Promise<void> {
  (await cookies()).delete(COOKIE);
}

/** The signed-in user's name, or null. */
export async function currentUser(): Promise<string | null> {
  const value = (await cookies()).get(COOKIE)?.value;
  if (!value) return null;
  const dot = value.lastIndexOf(".");
  if (dot < 0) return null;
  const name = decodeURIComponent(value.slice(0, dot));
  const given = Buffer.from(value.slice(dot + 1));
  const expected = Buffer.from(sign(name));
  return given.length === expected.length && timingSafeEqual(given, expected) ? name : null;
}
