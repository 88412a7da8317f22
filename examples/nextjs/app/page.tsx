import { signInAction, signOutAction } from "./actions";
import { Chat } from "./chat/chat";
import { roomTitle } from "@/lib/room";
import { currentUser } from "@/lib/session";

export const dynamic = "force-dynamic";

export default async function Page({ searchParams }: { searchParams: Promise<{ error?: string }> }) {
  const user = await currentUser();
  if (!user) {
    const { error } = await searchParams;
    return (
      <main>
        <h1>sidecast chat</h1>
        <form action={signInAction}>
          <input type="text" name="name" placeholder="Your name" aria-label="name" autoFocus />
          <button type="submit">Sign in</button>
        </form>
        {error === "name" && <p className="error">A name is 1 to 24 letters, digits, spaces, dots, dashes or underscores.</p>}
      </main>
    );
  }
  return (
    <main>
      <header>
        <p>
          Signed in as <strong>{user}</strong>
        </p>
        <form action={signOutAction}>
          <button type="submit">Sign out</button>
        </form>
      </header>
      {/* Read at request time, so one build runs against any sidecast. */}
      <Chat user={user} wsUrl={process.env.SIDECAST_WS_URL ?? "ws://127.0.0.1:8080/ws"} initialTitle={roomTitle()} />
    </main>
  );
}
