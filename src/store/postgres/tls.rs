//! TLS to PostgreSQL. `sslmode=require` in the URL turns it on, and then the server certificate
//! is verified (against the system's roots and `--db-ca-file`), hostname included: what libpq
//! calls verify-full. `prefer` (the default) and `disable` connect in plaintext: an opportunistic
//! TLS that accepts any certificate would protect nothing.

use std::path::Path;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres::config::SslMode;
use tokio_postgres::{CancelToken, Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How idemd connects to PostgreSQL.
#[derive(Clone)]
pub enum DbTls {
    Plain,
    Verified(MakeRustlsConnect),
}

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
        fn drive<F>(connection: F) -> tokio::task::JoinHandle<()>
        where
            F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "database connection ended with an error");
                }
            })
        }
        match self {
            DbTls::Plain => {
                let (client, connection) = config.connect(NoTls).await?;
                Ok((client, drive(connection)))
            }
            DbTls::Verified(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                Ok((client, drive(connection)))
            }
        }
    }

    /// Asks the server to cancel the statement running on `token`'s connection.
    pub async fn cancel(&self, token: CancelToken) {
        let _ = match self {
            DbTls::Plain => token.cancel_query(NoTls).await,
            DbTls::Verified(tls) => token.cancel_query(tls.clone()).await,
        };
    }
}
