//! [`http_get`] and [`http_request`]: one HTTP/1.1 request over a fresh loopback
//! connection, with a bearer token and a JSON body when given; enough to drive
//! kiln's HTTP endpoints without an HTTP client.
//!
//! A [`Cluster`](crate::Cluster) with TLS registers each node's HTTP address
//! with [`trust`]; requests to those addresses go over HTTPS, verified against
//! that cluster's CA, and all others in plaintext.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use kiln_common::tls::TlsMaterial;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Longest time one request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTPS addresses of this process's clusters and the client settings that
/// trust each one's CA.
fn trusted() -> &'static Mutex<HashMap<String, TlsConnector>> {
    static TRUSTED: OnceLock<Mutex<HashMap<String, TlsConnector>>> = OnceLock::new();
    TRUSTED.get_or_init(Mutex::default)
}

/// Records that `addr` speaks HTTPS with a certificate signed by the CA in `ca`.
pub fn trust(addr: &str, ca: &Path) {
    let config = TlsMaterial::client(ca)
        .and_then(|tls| tls.https_client_config())
        .unwrap_or_else(|e| panic!("client tls settings for {}: {e}", ca.display()));
    trusted()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(addr.to_string(), TlsConnector::from(Arc::new(config)));
}

/// A connection to a kiln HTTP port, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a request reaches its address.
#[derive(Clone, Copy, PartialEq)]
enum Transport {
    /// HTTPS when [`trust`] registered the address, plain HTTP otherwise.
    AsRegistered,
    /// Plain HTTP whatever the address speaks.
    Plaintext,
}

/// Connects to `addr`, over TLS when [`trust`] registered it and `transport`
/// allows.
async fn connect(addr: &str, transport: Transport) -> std::io::Result<Box<dyn Io>> {
    let stream = TcpStream::connect(addr).await?;
    if transport == Transport::Plaintext {
        return Ok(Box::new(stream));
    }
    let connector = trusted()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(addr)
        .cloned();
    let Some(connector) = connector else {
        return Ok(Box::new(stream));
    };
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    Ok(Box::new(connector.connect(name, stream).await?))
}

/// Sends `GET path` to `addr` (`host:port`); returns the status code and the body.
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token, None).await
}

/// Sends `GET path` in plain HTTP even to an address that speaks HTTPS; returns
/// the status code and the body.
pub async fn http_get_plaintext(addr: &str, path: &str) -> (u16, String) {
    request(Transport::Plaintext, addr, "GET", path, None, None).await
}

/// Reads a connection to its end. A TLS peer that closes without a
/// close_notify alert after a whole answer counts as an end, as for browsers.
async fn read_all(stream: &mut Box<dyn Io>) -> std::io::Result<Vec<u8>> {
    let mut response = Vec::new();
    match stream.read_to_end(&mut response).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
            Ok(response)
        }
        Err(e) => Err(e),
        Ok(_) => Ok(response),
    }
}

/// Sends `method path` with an optional JSON body and bearer token; returns the
/// status code and the body.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    request(Transport::AsRegistered, addr, method, path, token, body).await
}

async fn request(
    transport: Transport,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let exchange = async {
        let mut stream = connect(addr, transport)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        let content = body.map_or_else(String::new, |b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        });
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content}Connection: close\r\n\r\n{}",
            body.unwrap_or_default()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let response = read_all(&mut stream).await.expect("read");
        String::from_utf8(response).expect("a text answer")
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {addr}{path} took over {HTTP_TIMEOUT:?}"));
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An HTTP answer with its headers (names lower-cased) and raw body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The value of header `name` (lower-case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// Sends `method path` with raw `body` bytes and extra `headers` (no
/// Content-Type unless given, as tritonclient sends); returns the whole answer,
/// or the error when the connection fails.
pub async fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpAnswer> {
    let exchange = async {
        let mut stream = connect(addr, Transport::AsRegistered).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        read_all(&mut stream).await
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))??;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no header end"))?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = response[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

/// Joins a chunked transfer encoding's chunks.
fn dechunk(mut raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunked body");
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| bad())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}
