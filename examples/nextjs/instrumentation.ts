// Runs once when the Next.js server starts: the event consumer lives as long as the server.
export async function register() {
  if (process.env.NEXT_RUNTIME === "nodejs") {
    const { startConsumer } = await import("./lib/sidecast");
    startConsumer();
  }
}
