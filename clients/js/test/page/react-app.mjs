// The React binding in a page: bundled by the browser test with esbuild, with React.
import { createElement as h, useState } from "react";
import { createRoot } from "react-dom/client";

import { Client } from "../../dist/index.js";
import { SidecastProvider, usePresence, useSubscription } from "../../dist/react.js";

const params = new URLSearchParams(location.search);
const channel = params.get("channel");
const client = new Client({ url: params.get("url"), token: params.get("token") });
const state = { received: [], client, hide: null };
window.sidecastReact = state;

function Feed() {
  const view = useSubscription(channel, (p) => state.received.push(p.data.n));
  return h("p", { id: "feed" }, `${view.state}: ${JSON.stringify(view.last?.data ?? null)}`);
}

function People() {
  const people = usePresence(params.get("room"));
  const users = people.map((p) => p.user).sort();
  return h("p", { id: "people" }, users.join(","));
}

function App() {
  const [shown, setShown] = useState(true);
  state.hide = () => setShown(false);
  return h("div", null, shown ? h(Feed) : h("p", { id: "feed" }, "unmounted"), h(People));
}

createRoot(document.getElementById("root")).render(h(SidecastProvider, { client }, h(App)));
