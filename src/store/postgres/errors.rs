//! Maps driver and pool failures to `StoreError`: what a caller can retry is `Unavailable`.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::store::StoreError;

/// A database error: connection trouble and server shutdowns are retryable, the rest is a bug.
pub fn from_db(error: tokio_postgres::Error) -> StoreError {
    let Some(code) = error.code() else {
        // No SQLSTATE: an I/O error, a closed connection, or a decoding problem.
        if error.is_closed()
            || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>())
        {
            return StoreError::Unavailable(format!("database connection failed: {error}"));
        }
        return StoreError::Internal(format!("database client error: {error}"));
    };
    let class = &code.code()[..2];
    let retryable = class == "08" // connection exception
        || class == "53" // insufficient resources
        || class == "57" // operator intervention: shutdown, cancel, statement timeout
        || class == "40" // serialization failure, deadlock
        || *code == SqlState::LOCK_NOT_AVAILABLE;
    if retryable {
        StoreError::Unavailable(format!("database temporarily unable to answer: {error}"))
    } else {
        StoreError::Internal(format!("database error: {error}"))
    }
}

/// Pool failures are all about reaching the database. A connection that cannot be opened is
/// UNAVAILABLE whatever the server said (too many connections, database not accepting connections,
/// permission revoked): the caller can only retry, and the operator reads the cause in the log.
pub fn from_pool(error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(error) => {
            StoreError::Unavailable(format!("cannot connect to the database: {error}"))
        }
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "no database connection available in time ({kind:?})"
        )),
        other => StoreError::Unavailable(format!("database pool: {other}")),
    }
}
