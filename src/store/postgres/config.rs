//! Configuration of the PostgreSQL store, and the driver settings derived from it.

use std::{str::FromStr, time::Duration};

use super::tls::DbTls;

/// Connection settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string.
    pub url: String,
    /// Most connections the pool opens.
    pub pool_size: usize,
    /// Bound on opening one connection, and on waiting for a free one.
    pub connect_timeout: Duration,
    /// Bound on one command's database work; past it the caller gets UNAVAILABLE and the
    /// connection is discarded (it may be black-holed).
    pub query_timeout: Duration,
    /// Extra CA certificates (PEM) to verify the database's certificate with `sslmode=require`.
    pub ca_file: Option<std::path::PathBuf>,
    /// How often a Wait re-reads its record without a notification: a lost notification delays
    /// a Wait by at most this much.
    pub wait_poll: Duration,
    /// Most Acquires (or Completes) sent to PostgreSQL as one statement when they arrive
    /// together (see `batch`); 1 turns batching off.
    pub max_batch: usize,
    /// Batched statements of each kind in flight at once (see `batch`).
    pub batch_slots: usize,
    /// Bytes of completed records kept in memory so replays skip the database (see `cache`);
    /// 0 turns the cache off.
    pub replay_cache_bytes: u64,
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: usize::from(crate::defaults::POOL_SIZE),
            connect_timeout: crate::defaults::DB_CONNECT_TIMEOUT.value,
            query_timeout: crate::defaults::DB_QUERY_TIMEOUT.value,
            ca_file: None,
            wait_poll: crate::defaults::DB_WAIT_POLL,
            max_batch: usize::from(crate::defaults::DB_BATCH),
            batch_slots: usize::from(crate::defaults::DB_BATCH_SLOTS),
            replay_cache_bytes: crate::defaults::REPLAY_CACHE_BYTES,
        }
    }

    /// The driver configuration and how to secure it (see `tls`).
    pub fn connection_settings(&self) -> Result<(tokio_postgres::Config, DbTls), String> {
        let mut config = self.driver_config()?;
        let tls = DbTls::for_config(&mut config, self.ca_file.as_deref())?;
        Ok((config, tls))
    }

    /// The driver configuration, with idemd's defaults for what the URL leaves unset.
    pub fn driver_config(&self) -> Result<tokio_postgres::Config, String> {
        let mut config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|error| format!("not a valid PostgreSQL URL or key=value string ({error})"))?;
        if config.get_application_name().is_none() {
            config.application_name("idemd");
        }
        if config.get_connect_timeout().is_none() {
            // The driver applies its connect timeout to each host of a multi-host URL in turn,
            // while the pool bounds the whole attempt by `connect_timeout`: each host gets its
            // share, so a black-holed first host still leaves time to reach the next.
            let hosts = u32::try_from(config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
            config.connect_timeout(self.connect_timeout / hosts);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_gets_its_share_of_the_connect_timeout() {
        let config = PostgresConfig {
            connect_timeout: Duration::from_secs(3),
            ..PostgresConfig::new("postgres://idemd@h1:5432,h2:5432,h3:5432/idemd")
        };
        let driver = config.driver_config().expect("a valid URL");
        assert_eq!(driver.get_hosts().len(), 3);
        assert_eq!(driver.get_connect_timeout(), Some(&Duration::from_secs(1)));
        let single = PostgresConfig {
            connect_timeout: Duration::from_secs(3),
            ..PostgresConfig::new("host=h1 dbname=idemd")
        };
        assert_eq!(
            single
                .driver_config()
                .expect("a valid key=value string")
                .get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        // A timeout in the URL is the operator's: per host, as libpq reads it.
        let explicit = PostgresConfig::new("postgres://h1,h2/idemd?connect_timeout=7");
        assert_eq!(
            explicit
                .driver_config()
                .expect("a valid URL")
                .get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
    }
}
