// The package loads control.proto at run time (@grpc/proto-loader), so it ships a copy of
// the repository's proto/ taken at build time: the package and the server it was built
// beside speak the same API.
import { cpSync } from "node:fs";
import { fileURLToPath } from "node:url";

const from = fileURLToPath(new URL("../../../proto/sidecast", import.meta.url));
const to = fileURLToPath(new URL("../proto/sidecast", import.meta.url));
cpSync(from, to, { recursive: true });
