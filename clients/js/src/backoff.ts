// Reconnect delays: exponential backoff with full jitter, bounded.

export interface BackoffOptions {
  /** The first delay's upper bound, in ms (default 500). */
  minDelay?: number;
  /** The largest delay, in ms (default 20000). */
  maxDelay?: number;
  /** After a server drain (close 1001), the first attempt waits a random delay up to this
   * many ms (default 5000), so that a drained node's clients do not all come back at once. */
  drainSpread?: number;
}

/** The delay before reconnect attempt `attempt` (0 for the first): a random value in
 * [0, min(maxDelay, minDelay * 2^attempt)]. `random` is in [0, 1). */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  const min = options.minDelay ?? 500;
  const max = options.maxDelay ?? 20000;
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}
