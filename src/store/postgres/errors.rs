//! Maps driver and pool failures to `StoreError`: what a caller can retry is `Unavailable`.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::store::StoreError;

/// A database error: connection trouble, server shutdowns and a server that cannot take writes
/// are retryable, the rest is a bug. The message names the SQLSTATE and PostgreSQL's own words
/// (the driver's `Display` says only "db error"), or the chain of causes, for the operator's log.
pub fn from_db(error: tokio_postgres::Error) -> StoreError {
    let cause = describe(&error);
    let Some(code) = error.code() else {
        // No SQLSTATE: an I/O error, a closed connection, or a decoding problem.
        if error.is_closed()
            || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>())
        {
            return StoreError::Unavailable(format!("database connection failed: {cause}"));
        }
        return StoreError::Internal(format!("database client error: {cause}"));
    };
    if is_retryable(code) {
        StoreError::Unavailable(format!("database temporarily unable to answer: {cause}"))
    } else {
        StoreError::Internal(format!("database error: {cause}"))
    }
}

/// SQLSTATEs a caller may retry, on this connection or (see `Connections::run`) a new one. These
/// are the states a failover goes through, each pinned by `tests::a_failover_is_retryable`:
/// - class 08, connection exception (08000, 08003 connection does not exist, 08006 connection
///   failure, 08001 and 08004 client or server could not establish one);
/// - class 53, insufficient resources (disk full, out of memory, too many connections);
/// - class 57, operator intervention: 57P01 admin shutdown (a fast or smart stop, a
///   `pg_terminate_backend`), 57P02 crash shutdown (another backend crashed and the postmaster
///   reset them all), 57P03 cannot connect now (starting up, or in recovery without hot standby),
///   57014 a statement cancelled or timed out;
/// - class 40, 40001 serialization failure and 40P01 deadlock detected (the transaction was
///   rolled back; idemd runs read committed, so these are rare);
/// - 55P03, lock not available;
/// - 25006, read-only SQL transaction: the server became a standby or was made read-only (a
///   demoted or fenced primary). A new connection may reach the writable primary, for instance
///   through a multi-host URL with `target_session_attrs=read-write`.
fn is_retryable(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57" | "40")
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
}

/// PostgreSQL's report (severity, SQLSTATE, message, detail, hint) or the error's causes.
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Pool failures are all about reaching the database. A connection that cannot be opened is
/// UNAVAILABLE whatever the server said (too many connections, database not accepting connections,
/// permission revoked): the caller can only retry, and the operator reads the cause in the log.
pub fn from_pool(error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(error) => StoreError::Unavailable(format!(
            "cannot connect to the database: {}",
            describe(&error)
        )),
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "no database connection available in time ({kind:?})"
        )),
        other => StoreError::Unavailable(format!("database pool: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_is_retryable() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", "57P01", "57P02", "57P03", "57014",
            "40001", "40P01", "25006", "53300", "55P03",
        ] {
            assert!(is_retryable(&SqlState::from_code(code)), "{code}");
        }
    }

    #[test]
    fn bugs_are_not_retryable() {
        // Unique violation, undefined table, invalid text representation, syntax error.
        for code in ["23505", "42P01", "22P02", "42601", "XX000"] {
            assert!(!is_retryable(&SqlState::from_code(code)), "{code}");
        }
    }
}
