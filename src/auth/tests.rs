//! Token verification against every refusal it documents, and minting.

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
