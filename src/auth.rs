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
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    subs: Option<Vec<String>>,
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
        let data = jsonwebtoken::decode::<WireClaims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature
                | K::InvalidEcdsaKey
                | K::InvalidEddsaKey
                | K::InvalidRsaKey(_) => AuthError::Signature,
                K::InvalidAlgorithm => AuthError::Algorithm,
                K::InvalidAudience => AuthError::Audience,
                K::MissingRequiredClaim(claim) if claim == "aud" => AuthError::Audience,
                K::InvalidIssuer | K::MissingRequiredClaim(_) => AuthError::Issuer,
                _ => AuthError::Malformed,
            }
        })?;
        self.check(data.claims, now)
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
        let patterns = |list: Option<Vec<String>>, name| {
            list.unwrap_or_default()
                .iter()
                .map(|p| Pattern::parse(p).map_err(|_| AuthError::InvalidClaim(name)))
                .collect::<Result<Vec<_>, _>>()
        };
        let subs = wire.subs.unwrap_or_default();
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

fn numeric_date(
    v: Option<serde_json::Value>,
    name: &'static str,
) -> Result<Option<u64>, AuthError> {
    match v {
        None => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
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
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000;

    fn hs_config(secret: &str) -> TokenConfig {
        TokenConfig {
            hmac_secret: Some(Secret::new(secret)),
            public_key_file: None,
            jwks_file: None,
            algorithms: vec![Algorithm::HS256],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
        }
    }

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn accepts_a_valid_token() {
        let v = Verifier::from_config(&hs_config("s3")).unwrap();
        let t = sign(
            serde_json::json!({"sub":"alice","exp":NOW+60,"channels":["chat:*"],"subs":["user:alice"],"info":{"name":"A"}}),
            Algorithm::HS256,
            b"s3",
        );
        let c = v.verify(&t, NOW).unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.expires_at, NOW + 60);
        assert!(channel::granted(&c.channels, "chat:lobby"));
        assert_eq!(c.subs, vec!["user:alice".to_string()]);
        assert_eq!(c.info.unwrap().get(), r#"{"name":"A"}"#);
    }

    #[test]
    fn refusals() {
        let v = Verifier::from_config(&hs_config("s3")).unwrap();
        let ok = serde_json::json!({"sub":"a","exp":NOW+60});
        assert_eq!(
            v.verify(&sign(ok.clone(), Algorithm::HS256, b"other"), NOW)
                .err(),
            Some(AuthError::Signature)
        );
        assert_eq!(
            v.verify(&sign(ok.clone(), Algorithm::HS512, b"s3"), NOW)
                .err(),
            Some(AuthError::Algorithm)
        );
        assert_eq!(
            v.verify(
                &sign(
                    serde_json::json!({"sub":"a","exp":NOW-6}),
                    Algorithm::HS256,
                    b"s3"
                ),
                NOW
            )
            .err(),
            Some(AuthError::Expired)
        );
        // Within the leeway.
        assert!(v
            .verify(
                &sign(
                    serde_json::json!({"sub":"a","exp":NOW-4}),
                    Algorithm::HS256,
                    b"s3"
                ),
                NOW
            )
            .is_ok());
        assert_eq!(
            v.verify(
                &sign(serde_json::json!({"exp":NOW+60}), Algorithm::HS256, b"s3"),
                NOW
            )
            .err(),
            Some(AuthError::MissingClaim("sub"))
        );
        assert_eq!(
            v.verify(
                &sign(serde_json::json!({"sub":"a"}), Algorithm::HS256, b"s3"),
                NOW
            )
            .err(),
            Some(AuthError::MissingClaim("exp"))
        );
        assert_eq!(
            v.verify(
                &sign(
                    serde_json::json!({"sub":"a","exp":NOW+60,"channels":["a*b"]}),
                    Algorithm::HS256,
                    b"s3"
                ),
                NOW
            )
            .err(),
            Some(AuthError::InvalidClaim("channels"))
        );
        assert_eq!(
            v.verify("not a token", NOW).err(),
            Some(AuthError::Malformed)
        );
        assert_eq!(v.verify("", NOW).err(), Some(AuthError::Malformed));
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(serde_json::to_string(&ok).unwrap().as_bytes())
        );
        assert_eq!(v.verify(&none, NOW).err(), Some(AuthError::Algorithm));
    }

    #[test]
    fn every_pinned_hmac_algorithm() {
        let mut config = hs_config("s3");
        config.algorithms = vec![Algorithm::HS384, Algorithm::HS512];
        let v = Verifier::from_config(&config).unwrap();
        let claims = serde_json::json!({"sub":"a","exp":NOW+60});
        assert!(v
            .verify(&sign(claims.clone(), Algorithm::HS384, b"s3"), NOW)
            .is_ok());
        assert!(v
            .verify(&sign(claims.clone(), Algorithm::HS512, b"s3"), NOW)
            .is_ok());
        assert_eq!(
            v.verify(&sign(claims, Algorithm::HS256, b"s3"), NOW).err(),
            Some(AuthError::Algorithm)
        );
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let mut config = hs_config("s3");
        config.audience = Some("app".into());
        config.issuer = Some("backend".into());
        let v = Verifier::from_config(&config).unwrap();
        let good = serde_json::json!({"sub":"a","exp":NOW+60,"aud":"app","iss":"backend"});
        assert!(v.verify(&sign(good, Algorithm::HS256, b"s3"), NOW).is_ok());
        let wrong_aud = serde_json::json!({"sub":"a","exp":NOW+60,"aud":"x","iss":"backend"});
        assert_eq!(
            v.verify(&sign(wrong_aud, Algorithm::HS256, b"s3"), NOW)
                .err(),
            Some(AuthError::Audience)
        );
        let no_aud = serde_json::json!({"sub":"a","exp":NOW+60,"iss":"backend"});
        assert_eq!(
            v.verify(&sign(no_aud, Algorithm::HS256, b"s3"), NOW).err(),
            Some(AuthError::Audience)
        );
        let no_iss = serde_json::json!({"sub":"a","exp":NOW+60,"aud":"app"});
        assert_eq!(
            v.verify(&sign(no_iss, Algorithm::HS256, b"s3"), NOW).err(),
            Some(AuthError::Issuer)
        );
    }

    #[test]
    fn aud_is_ignored_without_configured_audience() {
        let v = Verifier::from_config(&hs_config("s3")).unwrap();
        let t = sign(
            serde_json::json!({"sub":"a","exp":NOW+60,"aud":"x"}),
            Algorithm::HS256,
            b"s3",
        );
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn es256_and_alg_confusion() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let config = TokenConfig {
            hmac_secret: None,
            public_key_file: Some(format!("{dir}/tests/fixtures/es256-public.pem").into()),
            jwks_file: None,
            algorithms: vec![Algorithm::ES256],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
        };
        let v = Verifier::from_config(&config).unwrap();
        let private = std::fs::read(format!("{dir}/tests/fixtures/es256-private.pem")).unwrap();
        let claims = serde_json::json!({"sub":"a","exp":NOW+60});
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(&private).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&t, NOW).unwrap().user, "a");
        // HS256 signed with the public key's bytes: refused as an algorithm outside the pinned set.
        let public = std::fs::read(format!("{dir}/tests/fixtures/es256-public.pem")).unwrap();
        assert_eq!(
            v.verify(&sign(claims, Algorithm::HS256, &public), NOW)
                .err(),
            Some(AuthError::Algorithm)
        );
    }

    fn asymmetric(alg: Algorithm, public: Option<&str>, jwks: Option<&str>) -> Verifier {
        let dir = env!("CARGO_MANIFEST_DIR");
        Verifier::from_config(&TokenConfig {
            hmac_secret: None,
            public_key_file: public.map(|f| format!("{dir}/tests/fixtures/{f}").into()),
            jwks_file: jwks.map(|f| format!("{dir}/tests/fixtures/{f}").into()),
            algorithms: vec![alg],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn sign_pem(alg: Algorithm, private: &str, kid: Option<&str>) -> String {
        let pem = std::fs::read(format!(
            "{}/tests/fixtures/{private}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, &serde_json::json!({"sub":"k","exp":NOW+60}), &key).unwrap()
    }

    #[test]
    fn rs256_and_eddsa_public_keys() {
        let rs = asymmetric(Algorithm::RS256, Some("rs256-public.pem"), None);
        assert_eq!(
            rs.verify(&sign_pem(Algorithm::RS256, "rs256-private.pem", None), NOW)
                .unwrap()
                .user,
            "k"
        );
        let ed = asymmetric(Algorithm::EdDSA, Some("ed25519-public.pem"), None);
        assert_eq!(
            ed.verify(
                &sign_pem(Algorithm::EdDSA, "ed25519-private.pem", None),
                NOW
            )
            .unwrap()
            .user,
            "k"
        );
        // A key of another family does not verify.
        assert_eq!(
            ed.verify(&sign_pem(Algorithm::RS256, "rs256-private.pem", None), NOW)
                .err(),
            Some(AuthError::Algorithm)
        );
    }

    #[test]
    fn jwks_selects_the_key_by_kid() {
        let v = asymmetric(Algorithm::ES256, None, Some("es256.jwks.json"));
        assert_eq!(
            v.verify(
                &sign_pem(Algorithm::ES256, "es256-private.pem", Some("es-1")),
                NOW
            )
            .unwrap()
            .user,
            "k"
        );
        assert_eq!(
            v.verify(
                &sign_pem(Algorithm::ES256, "es256-private.pem", Some("es-2")),
                NOW
            )
            .err(),
            Some(AuthError::UnknownKey)
        );
        assert_eq!(
            v.verify(&sign_pem(Algorithm::ES256, "es256-private.pem", None), NOW)
                .err(),
            Some(AuthError::UnknownKey)
        );
    }
}
