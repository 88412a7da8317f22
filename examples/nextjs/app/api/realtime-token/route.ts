// The connection token for the signed-in user: the browser's getToken fetches it at connect
// and again before it expires. Which channels the user may join is decided here, by the app.

import { mintToken } from "@sidecast/server";

import { ROOM, TYPING } from "@/lib/room";
import { currentUser } from "@/lib/session";

export const dynamic = "force-dynamic";

export async function GET() {
  const user = await currentUser();
  if (!user) return new Response("sign in first", { status: 401 });
  const token = await mintToken({
    user,
    channels: [ROOM, TYPING],
    publish: [TYPING],
    info: { name: user },
    expiresIn: "5m",
    secret: process.env.SIDECAST_TOKEN_SECRET,
  });
  return new Response(token, { headers: { "content-type": "text/plain", "cache-control": "no-store" } });
}
