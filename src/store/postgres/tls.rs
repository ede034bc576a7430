//! TLS to PostgreSQL. `sslmode=require` in the URL turns it on, and then the server certificate
//! is verified (against the system's roots and `--db-ca-file`), hostname included: what libpq
//! calls verify-full. `prefer` (the default) and `disable` connect in plaintext: an opportunistic
//! TLS that accepts any certificate would protect nothing.
//!
//! `DbTls` is itself the driver's TLS connector, so the pool, the LISTEN connection, migrations
//! and cancel requests all pass it as it is; whether it is plain or verified is decided here only.

use std::{convert::Infallible, io, path::Path};

use futures_util::future::{ready, Either, Ready};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{CancelToken, Client, Config, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How idemd connects to PostgreSQL.
#[derive(Clone)]
pub enum DbTls {
    /// Plaintext: `for_config` has set `sslmode=disable`, so the driver never starts a handshake.
    Plain,
    Verified(MakeRustlsConnect),
}

type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
type RustlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

impl DbTls {
    /// Chooses from the URL's sslmode; `prefer` is turned into `disable` on `config`.
    pub fn for_config(config: &mut Config, ca_file: Option<&Path>) -> Result<Self, String> {
        if config.get_ssl_mode() != SslMode::Require {
            config.ssl_mode(SslMode::Disable);
            return Ok(DbTls::Plain);
        }
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|error| format!("--db-ca-file {}: {error}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|error| format!("--db-ca-file {}: {error}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|error| format!("--db-ca-file {}: {error}", path.display()))?;
            }
        }
        if roots.is_empty() {
            return Err("sslmode=require, but there is no CA to verify the database's certificate: set --db-ca-file".into());
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("database TLS: {error}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(DbTls::Verified(MakeRustlsConnect::new(tls)))
    }

    /// Opens one connection and drives it on a task of its own.
    pub async fn connect(
        &self,
        config: &Config,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let (client, connection) = config.connect(self.clone()).await?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "database connection ended with an error");
            }
        });
        Ok((client, driver))
    }

    /// Asks the server to cancel the statement running on `token`'s connection.
    pub async fn cancel(&self, token: CancelToken) {
        let _ = token.cancel_query(self.clone()).await;
    }
}

impl MakeTlsConnect<Socket> for DbTls {
    type Stream = RustlsStream;
    type TlsConnect = DbTlsConnect;
    type Error = Infallible;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<DbTlsConnect, Infallible> {
        match self {
            DbTls::Plain => Ok(DbTlsConnect(None)),
            DbTls::Verified(tls) => MakeTlsConnect::<Socket>::make_tls_connect(tls, hostname)
                .map(|tls| DbTlsConnect(Some(tls))),
        }
    }
}

/// The handshake of one connection: none in plaintext (the driver does not ask for one with
/// `sslmode=disable`), else rustls's.
pub struct DbTlsConnect(Option<RustlsConnect>);

impl TlsConnect<Socket> for DbTlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future =
        Either<Ready<io::Result<RustlsStream>>, <RustlsConnect as TlsConnect<Socket>>::Future>;

    fn connect(self, stream: Socket) -> Self::Future {
        match self.0 {
            None => Either::Left(ready(Err(io::Error::other(
                "TLS to the database is off (sslmode=require turns it on)",
            )))),
            Some(tls) => Either::Right(tls.connect(stream)),
        }
    }
}
