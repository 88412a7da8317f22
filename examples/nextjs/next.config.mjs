import { fileURLToPath } from "node:url";

// The two SDK packages come from this repository (file: dependencies, symlinked), so the
// project root for tracing and bundling is the repository's.
const root = fileURLToPath(new URL("../..", import.meta.url));

/** @type {import('next').NextConfig} */
export default {
  // @sidecast/server loads its .proto at run time and holds gRPC channels: it runs from
  // node_modules on the server, never bundled.
  serverExternalPackages: ["@sidecast/server", "@grpc/grpc-js", "@grpc/proto-loader"],
  // A self-contained server (.next/standalone) for the app's container image.
  output: "standalone",
  outputFileTracingRoot: root,
  turbopack: { root },
};
