//! Schema migrations: numbered plain `.sql` files under `migrations/`, embedded in the binary and
//! applied in order, each in its own transaction, under a session-level advisory lock so that many
//! replicas starting together apply each migration exactly once. And the check, before serving,
//! that the database has them all.

use tokio_postgres::{error::SqlState, Client};

use super::config::PostgresConfig;
use super::errors::from_db;
use super::sql;
use crate::store::StoreError;

/// A migration: its number, a name for the log, and its SQL.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// All migrations, in order. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create_records",
        sql: include_str!("../../../migrations/0001_create_records.sql"),
    },
    Migration {
        version: 2,
        name: "record_waiters",
        sql: include_str!("../../../migrations/0002_record_waiters.sql"),
    },
    Migration {
        version: 3,
        name: "complete_batch",
        sql: include_str!("../../../migrations/0003_complete_batch.sql"),
    },
    Migration {
        version: 4,
        name: "drop_expires_at_index",
        sql: include_str!("../../../migrations/0004_drop_expires_at_index.sql"),
    },
    Migration {
        version: 5,
        name: "admin",
        sql: include_str!("../../../migrations/0005_admin.sql"),
    },
    Migration {
        version: 6,
        name: "admin_index_apart",
        sql: include_str!("../../../migrations/0006_admin_index_apart.sql"),
    },
    Migration {
        version: 7,
        name: "minute_counts",
        sql: include_str!("../../../migrations/0007_minute_counts.sql"),
    },
];

/// The schema version this binary needs.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |migration| migration.version)
}

/// The latest migration the database has applied: 0 if it was never migrated.
async fn applied_version(client: &Client) -> Result<i32, StoreError> {
    match client.query_one(sql::SCHEMA_VERSION, &[]).await {
        Ok(row) => row.try_get(0).map_err(from_db),
        // Never migrated.
        Err(error) if error.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(error) => Err(from_db(error)),
    }
}

/// Ok when the database has every migration this binary needs; else UNAVAILABLE, saying to run
/// `idemd migrate`.
pub async fn check_schema(client: &Client) -> Result<(), StoreError> {
    let version = applied_version(client).await?;
    let needed = latest_version();
    if version >= needed {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "database schema is at version {version}, this binary needs {needed}: run `idemd migrate`"
        )))
    }
}

/// Applies every migration the database lacks; returns the versions applied now. Uses its own
/// connection, so the session lock dies with it whatever happens.
pub async fn migrate(config: &PostgresConfig) -> Result<Vec<i32>, StoreError> {
    let (driver_config, tls) = config.connection_settings().map_err(StoreError::Internal)?;
    let (mut client, driver) = tls.connect(&driver_config).await.map_err(from_db)?;
    let outcome = apply_pending(&mut client).await;
    drop(client);
    let _ = driver.await;
    outcome
}

async fn apply_pending(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .execute(sql::MIGRATION_LOCK, &[&sql::MIGRATION_LOCK_KEY])
        .await
        .map_err(from_db)?;
    client
        .batch_execute(sql::CREATE_VERSION_TABLE)
        .await
        .map_err(from_db)?;
    let current = applied_version(client).await?;
    if current > latest_version() {
        tracing::warn!(
            database = current,
            binary = latest_version(),
            "the database schema is newer than this binary knows; leaving it alone"
        );
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        let transaction = client.transaction().await.map_err(from_db)?;
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(from_db)?;
        transaction
            .execute(
                sql::RECORD_MIGRATION,
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(from_db)?;
        transaction.commit().await.map_err(from_db)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        applied.push(migration.version);
    }
    client
        .execute(sql::MIGRATION_UNLOCK, &[&sql::MIGRATION_LOCK_KEY])
        .await
        .map_err(from_db)?;
    Ok(applied)
}
