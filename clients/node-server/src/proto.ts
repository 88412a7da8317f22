// The generated gRPC client of sidecast.v1.Control, from the descriptor built into the
// package. Field names are camelCase, 64-bit numbers plain numbers (offsets and sequence
// numbers stay far below 2^53), enums their names, bytes Buffers.

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

import { descriptor } from "./descriptor.generated.js";

/** The untyped generated client; `control.ts` wraps each method with its types. */
export type RawControl = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

type ControlConstructor = new (
  address: string,
  credentials: grpc.ChannelCredentials,
  options?: grpc.ChannelOptions,
) => RawControl;

let constructor: ControlConstructor | undefined;

export function controlConstructor(): ControlConstructor {
  if (!constructor) {
    const definition = protoLoader.fromJSON(descriptor as Parameters<typeof protoLoader.fromJSON>[0], {
      keepCase: false,
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const loaded = grpc.loadPackageDefinition(definition) as unknown as {
      sidecast: { v1: { Control: ControlConstructor } };
    };
    constructor = loaded.sidecast.v1.Control;
  }
  return constructor;
}
