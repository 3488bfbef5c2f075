//! kiln's HTTP ports (the coordinators' REST API and dashboard, the workers'
//! inference and metrics endpoints): HTTPS with the node's cluster certificate
//! whenever the node has TLS, plain HTTP only with `--insecure`.
//!
//! [`serve`] is the one server loop and [`http_client`] the one client that
//! every kiln HTTP caller (worker-to-worker forwarding, the CLI) goes through.
//! Servers use the same certificate as the node's gRPC port and, like it, accept
//! a client certificate signed by the cluster CA without requiring one: people
//! and programs prove themselves with bearer tokens.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
pub use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};
use crate::tls::TlsMaterial;

/// Connections one HTTPS port holds at once; beyond that, new ones wait in the
/// kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 4096;

/// Longest a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a stopping server waits for open requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// An HTTP client for kiln's HTTP ports: `https://` URLs verified against the
/// cluster CA (presenting the node's certificate when it has one), `http://`
/// URLs in plaintext.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How a client reaches kiln's HTTP ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSettings {
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per host.
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 32,
        }
    }
}

/// The URL scheme of kiln's HTTP ports: `https` with TLS, `http` without.
pub fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// Returns a pooled HTTP/1.1 client; with `tls` it trusts only the cluster CA.
pub fn http_client(tls: Option<&TlsMaterial>, settings: ClientSettings) -> Result<HttpClient> {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(settings.connect_timeout));
    // The TLS layer takes `https://` URLs; the TCP connector must let them through.
    tcp.enforce_http(false);
    let config = match tls {
        Some(tls) => tls.https_client_config()?,
        // No CA to trust: an `https://` URL fails at the handshake.
        None => rustls::ClientConfig::builder_with_provider(crate::tls::crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("tls protocol versions: {e}")))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .build(connector))
}

/// Returns the acceptor of a node's HTTPS port, or `None` without TLS.
pub fn acceptor(tls: Option<&TlsMaterial>) -> Result<Option<TlsAcceptor>> {
    tls.map(|tls| Ok(TlsAcceptor::from(Arc::new(tls.https_server_config()?))))
        .transpose()
}

/// Serves `router` on `listener` until `shutdown` completes, then lets open
/// requests finish (at most [`DRAIN_TIMEOUT`]). With an acceptor every
/// connection is HTTPS (HTTP/1.1 or HTTP/2 by ALPN); a client that speaks plain
/// HTTP to it gets a 400 that says so.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(acceptor) = tls else {
        return axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
    };
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or a connection reset before
                    // accept: wait a little rather than spin.
                    tracing::warn!("accept on {:?}: {e}", listener.local_addr().ok());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(stream) = handshake(&acceptor, stream, peer).await else {
                return;
            };
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, "https connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open https requests did not finish within {DRAIN_TIMEOUT:?}");
    }
    Ok(())
}

/// Completes the TLS handshake of one connection within [`HANDSHAKE_TIMEOUT`];
/// a plain HTTP request is answered with a 400 naming the scheme to use.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let _ = stream.set_nodelay(true);
    let attempt = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Ok(None);
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            refuse_plaintext(stream).await;
            return Ok(None);
        }
        acceptor.accept(stream).await.map(Some)
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "tls handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake took over {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// Answers a plain HTTP request sent to an HTTPS port, as nginx does, so that
/// the caller learns what is wrong instead of seeing a reset connection.
async fn refuse_plaintext(mut stream: TcpStream) {
    // Read the request head first: closing a socket with unread bytes sends a
    // reset, which can destroy the answer before the client reads it.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = r#"{"error":"this port speaks HTTPS: use an https:// URL and the cluster CA"}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}
