//! Connection tokens: pure verification of a JWT against the configured keys at a given `now`.
//!
//! Called by the session on `connect` and `refresh` (and by `sidecast token` to mint
//! development tokens). The accepted algorithms are pinned by configuration: the token's
//! header only selects among them, so an `alg: none` token or an HS256 token signed with a
//! public key is refused before any signature check.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{is_hmac, TokenConfig};
use crate::wire::channel::{self, Pattern};
use crate::wire::close::{self, Close};

/// Why a token was refused. Each maps to close code 4001, except `Expired` (4002).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("unknown key id")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("missing {0} claim")]
    MissingClaim(&'static str),
    #[error("invalid {0} claim")]
    InvalidClaim(&'static str),
    #[error("wrong audience")]
    Audience,
    #[error("wrong issuer")]
    Issuer,
}

/// Why the token configuration could not be loaded.
impl AuthError {
    /// The close that refuses a connection for this error: 4002 for an expired token (the
    /// client fetches a new one and reconnects), 4001 for the rest.
    pub fn close(&self) -> Close {
        let code = match self {
            AuthError::Expired => close::TOKEN_EXPIRED,
            AuthError::Malformed
            | AuthError::Algorithm
            | AuthError::UnknownKey
            | AuthError::Signature
            | AuthError::NotYetValid
            | AuthError::MissingClaim(_)
            | AuthError::InvalidClaim(_)
            | AuthError::Audience
            | AuthError::Issuer => close::UNAUTHORIZED,
        };
        Close::new(code, self.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// What a valid token grants.
#[derive(Debug, Clone)]
pub struct Claims {
    pub user: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
    pub channels: Vec<Pattern>,
    pub publish: Vec<Pattern>,
    pub subs: Vec<String>,
    /// A JSON object, shown to others in presence and join/leave.
    pub info: Option<Box<RawValue>>,
    /// A JSON object for backends only, never sent to clients.
    pub meta: Option<Box<RawValue>>,
}

/// The claims as they arrive, before validation.
#[derive(Deserialize)]
struct WireClaims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    // Read as any JSON, so that a claim of the wrong type is refused by its name.
    channels: Option<serde_json::Value>,
    publish: Option<serde_json::Value>,
    subs: Option<serde_json::Value>,
    info: Option<Box<RawValue>>,
    meta: Option<Box<RawValue>>,
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    algorithms: Vec<Algorithm>,
    hmac: Option<DecodingKey>,
    public: Option<DecodingKey>,
    jwks: HashMap<String, (DecodingKey, Option<String>)>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
}

// === impl Verifier ===

impl Verifier {
    /// Reads the keys named by the configuration.
    pub fn from_config(config: &TokenConfig) -> Result<Verifier, KeyError> {
        let public = match &config.public_key_file {
            Some(path) => Some(load_public_key(path, &config.algorithms)?),
            None => None,
        };
        let jwks = match &config.jwks_file {
            Some(path) => load_jwks(path)?,
            None => HashMap::new(),
        };
        Ok(Verifier {
            algorithms: config.algorithms.clone(),
            hmac: config
                .hmac_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            public,
            jwks,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            leeway: config.leeway.as_secs(),
        })
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // `none`, `Ed25519` and other names outside the pinned set fail to parse.
            jsonwebtoken::errors::ErrorKind::Json(_) => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        let key = if is_hmac(header.alg) {
            self.hmac.as_ref()
        } else if let Some(kid) = header.kid.as_deref().filter(|_| !self.jwks.is_empty()) {
            let (key, alg) = self.jwks.get(kid).ok_or(AuthError::UnknownKey)?;
            if alg
                .as_deref()
                .is_some_and(|a| a != format!("{:?}", header.alg))
            {
                return Err(AuthError::Algorithm);
            }
            Some(key)
        } else {
            self.public.as_ref()
        }
        .ok_or(AuthError::UnknownKey)?;

        let mut validation = Validation::new(header.alg);
        // Time claims are checked below against the caller's `now`, so tests need no clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        use jsonwebtoken::errors::ErrorKind as K;
        let data = match jsonwebtoken::decode::<WireClaims>(token, key, &validation) {
            Ok(data) => data,
            // jsonwebtoken reads sub, exp, nbf, iss and aud for itself after checking the
            // signature, and a claim of a type it does not expect fails that whole read:
            // say which claim, as for any other invalid claim.
            Err(e) if matches!(e.kind(), K::Json(_)) => return Err(self.unreadable(token, now)),
            Err(e) => return Err(refusal(e.kind())),
        };
        self.check(data.claims, now)
    }

    /// Why signed claims could not be read: the first claim `check` refuses, else malformed.
    /// Only ever an error: nothing here accepts a token.
    fn unreadable(&self, token: &str, now: u64) -> AuthError {
        use base64::Engine;
        let claims = token
            .split('.')
            .nth(1)
            .and_then(|part| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(part)
                    .ok()
            })
            .and_then(|json| serde_json::from_slice::<WireClaims>(&json).ok());
        match claims.map(|wire| self.check(wire, now)) {
            Some(Err(refused)) => refused,
            _ => AuthError::Malformed,
        }
    }

    fn check(&self, wire: WireClaims, now: u64) -> Result<Claims, AuthError> {
        let user = match wire.sub {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(_) => return Err(AuthError::InvalidClaim("sub")),
            None => return Err(AuthError::MissingClaim("sub")),
        };
        let expires_at = numeric_date(wire.exp, "exp")?.ok_or(AuthError::MissingClaim("exp"))?;
        if now >= expires_at.saturating_add(self.leeway) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = numeric_date(wire.nbf, "nbf")? {
            if now.saturating_add(self.leeway) < nbf {
                return Err(AuthError::NotYetValid);
            }
        }
        let patterns = |list: Option<serde_json::Value>, name| {
            strings(list, name)?
                .iter()
                .map(|p| Pattern::parse(p).map_err(|_| AuthError::InvalidClaim(name)))
                .collect::<Result<Vec<_>, _>>()
        };
        let subs = strings(wire.subs, "subs")?;
        if subs.iter().any(|s| channel::validate(s).is_err()) {
            return Err(AuthError::InvalidClaim("subs"));
        }
        let object = |v: Option<Box<RawValue>>, name| match v {
            Some(raw) if raw.get().trim_start().starts_with('{') => Ok(Some(raw)),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(_) => Err(AuthError::InvalidClaim(name)),
            None => Ok(None),
        };
        Ok(Claims {
            user,
            expires_at,
            channels: patterns(wire.channels, "channels")?,
            publish: patterns(wire.publish, "publish")?,
            subs,
            info: object(wire.info, "info")?,
            meta: object(wire.meta, "meta")?,
        })
    }
}

/// The refusal for an error of jsonwebtoken's.
fn refusal(kind: &jsonwebtoken::errors::ErrorKind) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) => {
            AuthError::Signature
        }
        K::InvalidAlgorithm => AuthError::Algorithm,
        K::InvalidAudience => AuthError::Audience,
        K::MissingRequiredClaim(claim) if claim == "aud" => AuthError::Audience,
        K::InvalidIssuer | K::MissingRequiredClaim(_) => AuthError::Issuer,
        _ => AuthError::Malformed,
    }
}

/// An array of strings (absent or null: empty); anything else is refused by the claim's name.
fn strings(v: Option<serde_json::Value>, name: &'static str) -> Result<Vec<String>, AuthError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(AuthError::InvalidClaim(name)),
            })
            .collect(),
        Some(_) => Err(AuthError::InvalidClaim(name)),
    }
}

/// The largest NumericDate accepted: 2^53 - 1, the largest integer every JSON reader (a
/// JavaScript one included) represents exactly. Anything later is refused rather than read
/// approximately.
const MAX_NUMERIC_DATE: u64 = (1 << 53) - 1;

fn numeric_date(
    v: Option<serde_json::Value>,
    name: &'static str,
) -> Result<Option<u64>, AuthError> {
    match v {
        None => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .filter(|seconds| *seconds <= MAX_NUMERIC_DATE)
            .map(Some)
            .ok_or(AuthError::InvalidClaim(name)),
        Some(_) => Err(AuthError::InvalidClaim(name)),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn load_public_key(path: &Path, algorithms: &[Algorithm]) -> Result<DecodingKey, KeyError> {
    let pem = read(path)?;
    let parse_error = |e: jsonwebtoken::errors::Error| KeyError::Parse {
        path: path.display().to_string(),
        message: format!("not a public key for {algorithms:?}: {e}"),
    };
    // One PEM key serves one family; the pinned algorithms say which.
    let asymmetric = algorithms.iter().find(|a| !is_hmac(**a)).copied();
    match asymmetric {
        Some(Algorithm::ES256 | Algorithm::ES384) => {
            DecodingKey::from_ec_pem(&pem).map_err(parse_error)
        }
        Some(Algorithm::EdDSA) => DecodingKey::from_ed_pem(&pem).map_err(parse_error),
        _ => DecodingKey::from_rsa_pem(&pem).map_err(parse_error),
    }
}

fn load_jwks(path: &Path) -> Result<HashMap<String, (DecodingKey, Option<String>)>, KeyError> {
    let text = read(path)?;
    let parse_error = |message: String| KeyError::Parse {
        path: path.display().to_string(),
        message,
    };
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| parse_error(e.to_string()))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| parse_error("every key needs a kid".into()))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| parse_error(format!("key {kid}: {e}")))?;
        let alg = jwk.common.key_algorithm.map(|a| format!("{a:?}"));
        keys.insert(kid, (key, alg));
    }
    Ok(keys)
}

/// The claims of a token minted by `sidecast token` (development and tests).
#[derive(Serialize, Default)]
pub struct MintClaims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Signs `claims` with HS256 and `secret`.
pub fn mint_hs256(claims: &MintClaims, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing with a secret cannot fail")
}

#[cfg(test)]
mod tests;
