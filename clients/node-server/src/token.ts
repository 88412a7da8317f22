// Connection tokens: the JWT a browser sends in its first frame (docs/protocol.md section 2),
// signed here with jose. The claims are sidecast's; the key is the app's.

import { createPrivateKey, type KeyObject } from "node:crypto";

import { SignJWT } from "jose";

export interface TokenOptions {
  /** The user id (`sub`). */
  user: string;
  /** Patterns of channels the client may subscribe to (`chat:*`). */
  channels?: string[];
  /** Patterns of channels the client may publish to itself. */
  publish?: string[];
  /** Channels subscribed for the client at connect (server-side subscriptions). */
  subs?: string[];
  /** Shown to other clients in presence, join and leave. */
  info?: Record<string, unknown> | null;
  /** For your backends only (the connect event); never sent to clients. */
  meta?: Record<string, unknown> | null;
  /** Lifetime: seconds, or a jose time span such as "10m". Default 10 minutes. */
  expiresIn?: number | string;
  /** `aud`, when sidecast's `token_audience` is set. */
  audience?: string;
  /** `iss`, when sidecast's `token_issuer` is set. */
  issuer?: string;
  /** HS256/384/512: the secret shared with sidecast's `token_hmac_secret`. */
  secret?: string | Uint8Array;
  /** RS*, PS*, ES256/384 or EdDSA: the private key (a PEM PKCS#8 string or a KeyObject);
   * sidecast holds the public key (`token_public_key_file` or `token_jwks_file`). */
  privateKey?: string | KeyObject;
  /** The JWS algorithm: HS256 with a secret; with a private key, required except for
   * Ed25519 keys (EdDSA) and EC P-256/P-384 keys (ES256/ES384). */
  algorithm?: string;
  /** `kid`, to pick the key out of sidecast's JWKS file. */
  keyId?: string;
}

const DEFAULT_LIFETIME = 600;

/** A signed connection token for `user`. Short lifetimes are the point: the client refreshes
 * its token (getToken) before it expires, so a revoked grant ends within one lifetime. */
export async function mintToken(options: TokenOptions): Promise<string> {
  const { key, algorithm } = signingKey(options);
  const claims: Record<string, unknown> = {};
  for (const name of ["channels", "publish", "subs", "info", "meta"] as const) {
    if (options[name] !== undefined) claims[name] = options[name];
  }
  const lifetime = options.expiresIn ?? DEFAULT_LIFETIME;
  const jwt = new SignJWT(claims)
    .setProtectedHeader({ alg: algorithm, typ: "JWT", ...(options.keyId ? { kid: options.keyId } : {}) })
    .setSubject(options.user)
    .setIssuedAt()
    .setExpirationTime(typeof lifetime === "number" ? Math.floor(Date.now() / 1000) + lifetime : lifetime);
  if (options.audience) jwt.setAudience(options.audience);
  if (options.issuer) jwt.setIssuer(options.issuer);
  return jwt.sign(key);
}

function signingKey(options: TokenOptions): { key: Uint8Array | KeyObject; algorithm: string } {
  if (!options.user) throw new TypeError("mintToken: user is required");
  if (options.secret !== undefined && options.privateKey !== undefined) {
    throw new TypeError("mintToken: give either secret or privateKey, not both");
  }
  if (options.secret !== undefined) {
    const key = typeof options.secret === "string" ? new TextEncoder().encode(options.secret) : options.secret;
    if (key.length === 0) throw new TypeError("mintToken: the secret is empty");
    return { key, algorithm: options.algorithm ?? "HS256" };
  }
  if (options.privateKey === undefined) throw new TypeError("mintToken: a secret or a privateKey is required");
  const key = typeof options.privateKey === "string" ? createPrivateKey(options.privateKey) : options.privateKey;
  return { key, algorithm: options.algorithm ?? implied(key) };
}

/** The one algorithm a key type allows, or an error asking for `algorithm`. */
function implied(key: KeyObject): string {
  // sidecast names Ed25519 signatures "EdDSA"; jose could also write "Ed25519", which it refuses.
  if (key.asymmetricKeyType === "ed25519") return "EdDSA";
  if (key.asymmetricKeyType === "ec") {
    const curve = key.asymmetricKeyDetails?.namedCurve;
    if (curve === "prime256v1" || curve === "P-256") return "ES256";
    if (curve === "secp384r1" || curve === "P-384") return "ES384";
  }
  throw new TypeError(`mintToken: say which algorithm to sign with for a ${key.asymmetricKeyType} key (RS256, PS256, …)`);
}
