//! Token verification, along its three paths: an arbitrary string as the token; arbitrary
//! claims signed with the right key (the claims' checks); and an arbitrary header over valid
//! claims (the algorithm and key selection). Whatever comes in, the answer is a token's
//! claims or a refusal with its documented close (4001, or 4002 for an expired token), and
//! accepted claims obey the rules: a user, and an expiry after now.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use sidecast::auth::Verifier;
use sidecast::config::Config;

const SECRET: &str = "fuzz-secret";
const NOW: u64 = 1_800_000_000;

fn verifier() -> Verifier {
    let overrides = [("token_hmac_secret".to_string(), SECRET.to_string())];
    let config = Config::from_layers(None, &[], &overrides).expect("a valid configuration");
    Verifier::from_config(&config.token()).expect("an HMAC key")
}

/// `header.payload.signature`, signed with the verifier's secret.
fn signed(header: &[u8], payload: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HS256 signs anything");
    format!("{message}.{signature}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let verifier = verifier();
    let token = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest),
        _ => signed(rest, br#"{"sub":"a","exp":1900000000}"#),
    };
    match verifier.verify(&token, NOW) {
        Ok(claims) => {
            assert!(!claims.user.is_empty());
            assert!(
                claims.expires_at + 5 > NOW,
                "accepted a token expired at {}",
                claims.expires_at
            );
        }
        Err(refusal) => {
            let code = refusal.close().code;
            assert!(
                code == 4001 || code == 4002,
                "{refusal:?} closes with {code}"
            );
        }
    }
});
