//! TLS and mTLS for the gRPC listener, with certificates reloaded from their files when they
//! change (cert-manager rotates them) without dropping connections: each new connection is
//! handshaken with the configuration in force when it arrives.

use std::{
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::auth::PeerIdentities;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 1024;

/// Where the server's certificate, key and (for mTLS) client CA live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA, every client must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn read(&self) -> Result<Vec<Vec<u8>>, String> {
        let mut contents = Vec::new();
        for (flag, path) in [
            ("--tls-cert", Some(&self.cert)),
            ("--tls-key", Some(&self.key)),
            ("--tls-client-ca", self.client_ca.as_ref()),
        ] {
            if let Some(path) = path {
                contents.push(
                    std::fs::read(path)
                        .map_err(|error| format!("{flag} {}: {error}", path.display()))?,
                );
            }
        }
        Ok(contents)
    }
}

/// The TLS configuration in force, and the file contents it was built from.
pub struct TlsState {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    loaded: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("files", &self.files)
            .finish()
    }
}

fn build_config(files: &TlsFiles, contents: &[Vec<u8>]) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&contents[0])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("--tls-cert {}: {error}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in the file",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&contents[1])
        .map_err(|error| format!("--tls-key {}: {error}", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS: {error}"))?;
    let builder = match (&files.client_ca, contents.get(2)) {
        (Some(path), Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert =
                    cert.map_err(|error| format!("--tls-client-ca {}: {error}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|error| format!("--tls-client-ca {}: {error}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| format!("--tls-client-ca {}: {error}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|error| format!("--tls-cert/--tls-key: {error}"))?;
    // h2 first: gRPC clients get it; HTTP/1.1 for JSON clients of the gateway.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl TlsState {
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let contents = files.read()?;
        let config = build_config(&files, &contents)?;
        Ok(Self {
            files,
            config: RwLock::new(Arc::new(config)),
            loaded: Mutex::new(contents),
        })
    }

    /// Re-reads the files; Ok(true) when changed, valid material took effect, Err when the new
    /// material is unreadable or invalid (the old stays in force).
    pub fn reload(&self) -> Result<bool, String> {
        let contents = self.files.read()?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded == contents {
            return Ok(false);
        }
        let config = build_config(&self.files, &contents)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        *loaded = contents;
        Ok(true)
    }

    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(true) => {
                crate::telemetry::metrics::reloaded("tls", "applied");
                tracing::info!("TLS certificates reloaded")
            }
            Ok(false) => {}
            Err(error) => {
                crate::telemetry::metrics::reloaded("tls", "rejected");
                tracing::error!(%error, "TLS certificates NOT reloaded; the previous ones stay in force")
            }
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// A client certificate's identities: its SAN DNS names, or, only when it has none, its subject
/// CN (as RFC 6125 prescribes for names).
fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    if names.is_empty() {
        for cn in parsed.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_string());
            }
        }
    }
    names
}

/// One accepted TLS connection, carrying its client's identities to every request on it.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerIdentities,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerIdentities;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and yields those that complete the TLS handshake.
/// Handshakes run concurrently, each bounded in time; failed ones are logged and dropped. The
/// accept loop ends when the returned stream is dropped (the server stopped).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsState>,
) -> ReceiverStream<io::Result<TlsConnection>> {
    accept(listener, tls, Protocol::Grpc)
}

/// As `incoming`, for the web console: the same certificates (and client CA), with HTTP/1.1
/// offered in ALPN instead of the gRPC listener's h2.
pub fn incoming_http1(
    listener: TcpListener,
    tls: Arc<TlsState>,
) -> ReceiverStream<io::Result<TlsConnection>> {
    accept(listener, tls, Protocol::Http1)
}

#[derive(Clone, Copy)]
enum Protocol {
    Grpc,
    Http1,
}

impl TlsState {
    fn acceptor_for(&self, protocol: Protocol) -> TlsAcceptor {
        match protocol {
            Protocol::Grpc => self.acceptor(),
            Protocol::Http1 => {
                let mut config = (*self
                    .config
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone())
                .clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                TlsAcceptor::from(Arc::new(config))
            }
        }
    }
}

impl TlsConnection {
    /// The identities of the client's certificate (empty without one).
    pub fn peer(&self) -> &PeerIdentities {
        &self.peer
    }
}

fn accept(
    listener: TcpListener,
    tls: Arc<TlsState>,
    protocol: Protocol,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let (sender, receiver) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(connection) => connection,
                Err(error) => {
                    // E.g. out of file descriptors: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor_for(protocol);
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let names = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .map(identities)
                            .unwrap_or_default();
                        let peer = PeerIdentities(Arc::new(names));
                        let _ = sender.send(Ok(TlsConnection { stream, peer })).await;
                    }
                    Ok(Err(error)) => tracing::info!(%remote, %error, "TLS handshake failed"),
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
