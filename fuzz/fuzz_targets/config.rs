//! The configuration layers: an arbitrary TOML file, `SIDECAST_*` variables and `--set`
//! pairs give a configuration or an error naming the key (exit 64 in the binary), never a
//! panic. The input is split on NUL bytes: the file, then alternating names and values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecast::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let file = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let pairs: Vec<(String, String)> = rest
        .chunks(2)
        .map(|pair| {
            (
                pair[0].to_string(),
                pair.get(1).copied().unwrap_or("").to_string(),
            )
        })
        .collect();
    let (env, overrides) = pairs.split_at(pairs.len() / 2);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (format!("SIDECAST_{}", k.to_uppercase()), v.clone()))
        .collect();
    if let Err(error) = Config::from_layers(Some(("fuzz.toml", file)), &env, overrides) {
        assert!(!error.to_string().is_empty());
    }
});
