//! Transport security between kiln processes: the one place that builds tonic
//! endpoints and server TLS settings.
//!
//! Every node (coordinator or worker) holds a certificate signed by the cluster CA
//! (`kiln certs`). Servers present theirs and ask clients for one, which is
//! optional at the handshake so that people's CLIs (who prove themselves with
//! tokens) can connect; RPCs that only nodes may make check for a verified client
//! certificate. A certificate from any other CA fails the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// Paths of the cluster CA and of this node's certificate and key (PEM).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Loaded TLS material: the CA to trust and, for a node, its own identity.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("read {what} {}: {e}", path.display())))
}

impl TlsMaterial {
    /// Loads a node's CA, certificate and key.
    pub fn node(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial> {
        Ok(TlsMaterial {
            ca_pem: read("tls ca", ca)?,
            identity: Some((read("tls cert", cert)?, read("tls key", key)?)),
        })
    }

    /// Loads only the CA, for a client that proves itself otherwise.
    pub fn client(ca: &Path) -> Result<TlsMaterial> {
        Ok(TlsMaterial {
            ca_pem: read("tls ca", ca)?,
            identity: None,
        })
    }

    /// Returns the server settings: this node's identity, client certificates
    /// verified against the CA when presented.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        let (cert, key) = self.identity.as_ref().ok_or_else(|| {
            Error::InvalidArgument("a TLS server needs a certificate and key".into())
        })?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true))
    }

    /// Returns the rustls settings of an HTTPS port: this node's identity,
    /// client certificates verified against the CA when presented, HTTP/2 or
    /// HTTP/1.1 by ALPN.
    pub fn https_server_config(&self) -> Result<rustls::ServerConfig> {
        let (cert, key) = self.identity.as_ref().ok_or_else(|| {
            Error::InvalidArgument("an HTTPS server needs a certificate and key".into())
        })?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            crypto(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::InvalidArgument(format!("tls ca: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("tls protocol versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(parse_certs("tls cert", cert)?, parse_key(key)?)
            .map_err(|e| Error::InvalidArgument(format!("tls cert and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Returns the rustls settings of an HTTPS client: servers must present a
    /// certificate the cluster CA signed; a node presents its own.
    pub fn https_client_config(&self) -> Result<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("tls protocol versions: {e}")))?
            .with_root_certificates(self.roots()?);
        // No ALPN here: hyper-rustls sets it from the HTTP versions it enables,
        // and a server without ALPN speaks HTTP/1.1.
        match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(parse_certs("tls cert", cert)?, parse_key(key)?)
                .map_err(|e| Error::InvalidArgument(format!("tls cert and key: {e}"))),
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// The cluster CA as a rustls trust store.
    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in parse_certs("tls ca", &self.ca_pem)? {
            roots
                .add(cert)
                .map_err(|e| Error::InvalidArgument(format!("tls ca: {e}")))?;
        }
        Ok(roots)
    }

    fn client_config(&self, host: &str) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

/// The cryptography every kiln TLS connection uses: ring, as tonic's.
pub(crate) fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses the certificates of a PEM file; at least one must be there.
fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what}: no PEM certificate in the file"
        )));
    }
    Ok(certs)
}

/// Parses the private key of a PEM file.
fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::InvalidArgument(format!("tls key: {e}")))?
        .ok_or_else(|| Error::InvalidArgument("tls key: no PEM private key in the file".into()))
}

/// Returns an endpoint for the kiln gRPC server at `addr` (HOST:PORT): over TLS
/// when `tls` is given, in plaintext otherwise.
pub fn endpoint(
    addr: &str,
    tls: Option<&TlsMaterial>,
    connect_timeout: Duration,
) -> Result<Endpoint> {
    endpoint_at(addr, addr, tls, connect_timeout)
}

/// Largest HTTP/2 frame a worker's server accepts (the default is 16 KiB): chunk
/// streams carry messages of up to 1 MiB.
pub const DATA_FRAME_BYTES: u32 = 256 * 1024;
/// HTTP/2 flow-control window of one stream, for chunk streams in both directions
/// (a connection gets twice this).
pub const DATA_STREAM_WINDOW_BYTES: u32 = 4 << 20;

/// Returns an endpoint for the kiln gRPC server named `addr` that connects to
/// `dial` instead (HOST:PORT each), as curl's `--resolve` does: the TLS check
/// still expects `addr`'s host in the server's certificate.
pub fn endpoint_at(
    addr: &str,
    dial: &str,
    tls: Option<&TlsMaterial>,
    connect_timeout: Duration,
) -> Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{dial}"))
        .map_err(|e| Error::InvalidArgument(format!("address {addr}: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(DATA_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(2 * DATA_STREAM_WINDOW_BYTES);
    if let Some(tls) = tls {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        endpoint = endpoint
            .tls_config(tls.client_config(host))
            .map_err(|e| Error::InvalidArgument(format!("tls settings for {addr}: {e}")))?;
    }
    Ok(endpoint)
}

/// Returns an error unless the request came over TLS with a client certificate
/// that the cluster CA signed (rustls has verified it during the handshake).
/// Without TLS (`--insecure`) every caller passes.
pub fn require_node<T>(request: &tonic::Request<T>, tls_enabled: bool) -> Result<()> {
    if !tls_enabled {
        return Ok(());
    }
    if is_node(request) {
        Ok(())
    } else {
        Err(Error::Unauthenticated(
            "this call is for cluster nodes: present a node certificate signed by the cluster CA"
                .into(),
        ))
    }
}

/// Returns true when the request came with a client certificate that rustls
/// verified against the cluster CA at the handshake: the caller is a node.
pub fn is_node<T>(request: &tonic::Request<T>) -> bool {
    request.peer_certs().is_some_and(|certs| !certs.is_empty())
}
