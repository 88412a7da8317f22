//! Interop: tokens minted by the `jose` npm package (what a Next.js route handler uses)
//! are accepted, driven by a real Node client (tests/js/jose_connect.mjs).

use std::process::Command;

use crate::support::{TestServer, SECRET};

#[tokio::test]
async fn tokens_minted_by_jose_connect() {
    let dir = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(&format!("{dir}/tests/js/node_modules/jose")).exists(),
        "tests/js/node_modules is missing: run the README's test command (scripts/test), which runs npm ci"
    );
    let public = format!("{dir}/tests/fixtures/es256-public.pem");
    let server = TestServer::start(&[
        ("token_public_key_file", &public),
        ("token_algorithms", "HS256,ES256"),
    ])
    .await;
    let ws_url = server.ws_url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{dir}/tests/js/jose_connect.mjs"))
            .env("SIDECAST_WS_URL", ws_url)
            .env("SIDECAST_HS_SECRET", SECRET)
            .env(
                "SIDECAST_ES256_KEY",
                format!("{dir}/tests/fixtures/es256-private.pem"),
            )
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("jose interop: 4 passed, 0 failed"),
        "{stdout}"
    );
}
