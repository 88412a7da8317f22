// A small typed event emitter (no dependency): `on` returns the function that removes the
// listener.

export class Emitter<Events extends Record<string, unknown>> {
  private listeners: { [K in keyof Events]?: Set<(event: Events[K]) => void> } = {};

  on<K extends keyof Events>(name: K, listener: (event: Events[K]) => void): () => void {
    const set = (this.listeners[name] ??= new Set());
    set.add(listener);
    return () => set.delete(listener);
  }

  protected emit<K extends keyof Events>(name: K, event: Events[K]): void {
    for (const listener of [...(this.listeners[name] ?? [])]) {
      try {
        listener(event);
      } catch (e) {
        // An app's listener that throws must not break the connection's bookkeeping.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}
