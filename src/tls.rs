//! HTTPS for the daemon's API: the rustls server configuration from PEM files, and a
//! listener for `axum::serve` that hands over only connections whose TLS handshake has
//! finished. Each handshake runs in its own task under a deadline, so a client that
//! stalls or speaks plain HTTP never holds up the next one.
//!
//! The crypto provider is rustls' `ring`, the one reqwest's `rustls-tls` already builds.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::AbortOnDropHandle;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in flight at once; past this, new connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// Which of the two files a [`TlsError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemFile {
    Cert,
    Key,
}

/// A file's content is not what it should be. The message names the file and never
/// quotes the key file.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct TlsError {
    pub file: PemFile,
    pub msg: String,
}

/// The server configuration for a certificate chain and its private key, both PEM (as
/// read from `cert_path` and `key_path`, which only name the files in messages).
pub fn server_config(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |msg: String| TlsError {
        file: PemFile::Cert,
        msg,
    };
    let key_err = |msg: String| TlsError {
        file: PemFile::Key,
        msg,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            cert_err(format!(
                "{}: not a valid PEM file: {e}",
                cert_path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(cert_err(format!(
            "{}: no certificate found (expected \"-----BEGIN CERTIFICATE-----\")",
            cert_path.display()
        )));
    }
    // The parser's messages may quote a line of the file: say only where and what.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        key_err(match e {
            rustls::pki_types::pem::Error::NoItemsFound => format!(
                "{}: no private key found (expected \"-----BEGIN PRIVATE KEY-----\", \"-----BEGIN EC PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\")",
                key_path.display()
            ),
            _ => format!("{}: not a valid PEM file", key_path.display()),
        })
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(format!("TLS setup: {e}")))?
        .with_no_client_auth();
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_err(format!(
            "{}: this private key does not belong to the certificate in {}",
            key_path.display(),
            cert_path.display()
        )),
        other => key_err(format!(
            "{}: unusable private key ({other}); expected RSA, ECDSA P-256/P-384 or Ed25519",
            key_path.display()
        )),
    })?;
    // axum serves HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TCP listener whose connections come out of a finished TLS handshake.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    _accepting: AbortOnDropHandle<()>,
}

impl TlsListener {
    /// Start accepting on `tcp`: every connection's handshake runs in its own task and
    /// is dropped if it has not finished after `handshake_timeout`. Dropping the listener
    /// stops the accepting and every handshake in flight.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        handshake_timeout: Duration,
    ) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(16);
        let task = tokio::spawn(accept_loop(
            tcp,
            TlsAcceptor::from(config),
            tx,
            handshake_timeout,
        ));
        Ok(TlsListener {
            local,
            ready,
            _accepting: AbortOnDropHandle::new(task),
        })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    handshake_timeout: Duration,
) {
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        if handshakes.len() >= MAX_HANDSHAKES {
            handshakes.join_next().await;
            continue;
        }
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) {
                    // Out of file descriptors and the like: give others time to close some.
                    tracing::error!(error = %e, "HTTP API: cannot accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        handshakes.spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the listener is gone: the connection just closes.
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP API: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, timeout = ?handshake_timeout, "HTTP API: TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            None => {
                // The accepting task ended (it only does so by panicking): serve nothing
                // more rather than spin; the API's health check shows it.
                tracing::error!("HTTP API: the TLS accept loop stopped; no new connections");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
