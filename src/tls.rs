//! TLS for the listeners: the WebSocket listener (rustls, through tokio-rustls) and the
//! control listener (tonic's rustls, with optional client-certificate verification for mTLS
//! between the backend and the sidecar). Keys and certificates are PEM files named by the
//! configuration and read once at start; a file that cannot be used stops the node with
//! exit 64, naming the key.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn error(key: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        message: format!("{}: {e}", path.display()),
    }
}

/// The WebSocket listener's TLS configuration, when ws_tls_cert_file is set.
pub fn ws_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&config.ws_tls_cert_file, &config.ws_tls_key_file)
    else {
        return Ok(None);
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| error("ws_tls_cert_file", cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| error("ws_tls_cert_file", cert_file, e))?;
    if certs.is_empty() {
        return Err(error("ws_tls_cert_file", cert_file, "no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| error("ws_tls_key_file", key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error("ws_tls_cert_file", cert_file, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| error("ws_tls_key_file", key_file, e))?;
    // WebSocket upgrades are HTTP/1.1 only.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// The control listener's TLS configuration, when grpc_tls_cert_file is set: the server's
/// identity, and with grpc_tls_client_ca_file, client certificates required and verified.
pub fn grpc_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&config.grpc_tls_cert_file, &config.grpc_tls_key_file)
    else {
        return Ok(None);
    };
    let read =
        |key: &'static str, path: &Path| std::fs::read(path).map_err(|e| error(key, path, e));
    let cert = read("grpc_tls_cert_file", cert_file)?;
    let key = read("grpc_tls_key_file", key_file)?;
    // tonic builds its rustls configuration inside the server task: the same configuration is
    // built here first, so that a key that does not match its certificate, or a CA file
    // without a usable root, is reported at start with its key.
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| error("grpc_tls_cert_file", cert_file, e))?;
    let private =
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| error("grpc_tls_key_file", key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("grpc_tls_cert_file", cert_file, e))?;
    let mut tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&cert, &key))
        .timeout(config.header_read_timeout);
    match &config.grpc_tls_client_ca_file {
        None => {
            builder
                .with_no_client_auth()
                .with_single_cert(certs, private)
                .map_err(|e| error("grpc_tls_key_file", key_file, e))?;
        }
        Some(ca_file) => {
            let ca = read("grpc_tls_client_ca_file", ca_file)?;
            let mut roots = rustls::RootCertStore::empty();
            for root in CertificateDer::pem_slice_iter(&ca) {
                let root = root.map_err(|e| error("grpc_tls_client_ca_file", ca_file, e))?;
                roots
                    .add(root)
                    .map_err(|e| error("grpc_tls_client_ca_file", ca_file, e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| error("grpc_tls_client_ca_file", ca_file, e))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, private)
                .map_err(|e| error("grpc_tls_key_file", key_file, e))?;
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
    }
    Ok(Some(tls))
}
