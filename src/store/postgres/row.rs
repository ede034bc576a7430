//! Rows → domain values. The database is trusted but checked: a row that breaks the domain's
//! rules is reported as an internal error rather than served.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use tokio_postgres::{types::FromSql, Row};

use super::errors::from_db;
use crate::domain::{
    AcquireCommand, CompleteCommand, Fingerprint, Holder, Key, LeaseToken, Namespace, Record,
    RecordState, StoredResult,
};
use crate::store::StoreError;

fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected value in idemd_records.{what}"))
}

/// Column `index`.
fn column<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(from_db)
}

/// Column `index`, stored signed (as PostgreSQL has no unsigned integers), which is never negative.
fn unsigned<'a, S: FromSql<'a>, T: TryFrom<S>>(
    row: &'a Row,
    index: usize,
    name: &str,
) -> Result<T, StoreError> {
    T::try_from(column::<S>(row, index)?).map_err(|_| corrupt(name))
}

fn fingerprint(row: &Row, index: usize) -> Result<Fingerprint, StoreError> {
    Fingerprint::parse(column(row, index)?).map_err(|_| corrupt("fingerprint"))
}

fn holder(row: &Row, index: usize) -> Result<Holder, StoreError> {
    Holder::parse(column(row, index)?).map_err(|_| corrupt("holder"))
}

fn retention(row: &Row, index: usize) -> Result<Duration, StoreError> {
    Ok(Duration::from_micros(unsigned::<i64, u64>(
        row,
        index,
        "retention_us",
    )?))
}

/// Decodes the columns of `record_columns!()` starting at index 0.
pub fn record_from_row(row: &Row) -> Result<Record, StoreError> {
    let get_err = from_db;
    let state = match row.try_get::<_, i16>(2).map_err(get_err)? {
        1 => RecordState::InProgress,
        2 => RecordState::Completed,
        _ => return Err(corrupt("state")),
    };
    let result = if state == RecordState::Completed {
        let keys: Vec<String> = row.try_get(17).map_err(get_err)?;
        let values: Vec<String> = row.try_get(18).map_err(get_err)?;
        if keys.len() != values.len() {
            return Err(corrupt("result_meta_values"));
        }
        Some(StoredResult {
            body: row.try_get(15).map_err(get_err)?,
            code: row.try_get(16).map_err(get_err)?,
            metadata: keys.into_iter().zip(values).collect::<BTreeMap<_, _>>(),
        })
    } else {
        None
    };
    let token: Vec<u8> = row.try_get(4).map_err(get_err)?;
    Ok(Record {
        namespace: Namespace::parse(row.try_get(0).map_err(get_err)?)
            .map_err(|_| corrupt("namespace"))?,
        key: Key::parse(row.try_get(1).map_err(get_err)?).map_err(|_| corrupt("key"))?,
        state,
        fingerprint: fingerprint(row, 3)?,
        lease_token: LeaseToken::from_bytes(&token).ok_or_else(|| corrupt("lease_token"))?,
        released: row.try_get(5).map_err(get_err)?,
        fencing_token: unsigned::<i64, _>(row, 6, "fencing_token")?,
        attempts: unsigned::<i32, _>(row, 7, "attempts")?,
        holder: holder(row, 8)?,
        retention: retention(row, 9)?,
        revision: unsigned::<i64, _>(row, 10, "revision")?,
        created_at: row.try_get(11).map_err(get_err)?,
        lease_expires_at: row.try_get(12).map_err(get_err)?,
        completed_at: row.try_get(13).map_err(get_err)?,
        expires_at: row.try_get(14).map_err(get_err)?,
        result,
    })
}

/// The record a Complete stored, from the command and the columns of `completed_columns!()`
/// starting at index 0 (the rest of the record is the command's own: its key, its token, the
/// result it stored).
pub fn completed_record(command: &CompleteCommand, row: &Row) -> Result<Record, StoreError> {
    Ok(Record {
        namespace: command.namespace.clone(),
        key: command.key.clone(),
        state: RecordState::Completed,
        fingerprint: fingerprint(row, 0)?,
        lease_token: command.lease_token,
        released: false,
        fencing_token: unsigned::<i64, _>(row, 1, "fencing_token")?,
        attempts: unsigned::<i32, _>(row, 2, "attempts")?,
        holder: holder(row, 3)?,
        retention: retention(row, 4)?,
        revision: unsigned::<i64, _>(row, 5, "revision")?,
        created_at: column(row, 6)?,
        lease_expires_at: column(row, 7)?,
        completed_at: Some(column(row, 8)?),
        expires_at: column(row, 9)?,
        result: Some(command.result.clone()),
    })
}

/// The lease token of an inserted record (column 0 of `inserted_columns!()`), which names the
/// command it was inserted for.
pub fn inserted_token(row: &Row) -> Result<LeaseToken, StoreError> {
    LeaseToken::from_bytes(column(row, 0)?).ok_or_else(|| corrupt("lease_token"))
}

/// The record an Acquire inserted for `command` with `token`, from the columns of
/// `inserted_columns!()` starting at index 0: a first lease, everything else the command's own.
pub fn inserted_record(
    command: &AcquireCommand,
    token: LeaseToken,
    row: &Row,
) -> Result<Record, StoreError> {
    Ok(Record {
        namespace: command.namespace.clone(),
        key: command.key.clone(),
        state: RecordState::InProgress,
        fingerprint: command.fingerprint.clone(),
        lease_token: token,
        released: false,
        fencing_token: unsigned::<i64, _>(row, 1, "fencing_token")?,
        attempts: 1,
        holder: command.holder.clone(),
        // As stored: in whole microseconds.
        retention: Duration::from_micros(micros(command.retention).unsigned_abs()),
        revision: 1,
        created_at: column(row, 2)?,
        lease_expires_at: column(row, 3)?,
        completed_at: None,
        expires_at: column(row, 4)?,
        result: None,
    })
}

/// The database time at column `index`.
pub fn db_now(row: &Row, index: usize) -> Result<SystemTime, StoreError> {
    row.try_get(index).map_err(from_db)
}

/// A duration as the whole microseconds the SQL expects. Durations are bounded by the server's
/// limits long before they could overflow.
pub fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
