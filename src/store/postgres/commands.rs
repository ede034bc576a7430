//! The SQL-running code of each command: the statements of `sql`, their parameters, and the
//! domain's decision on what they return. Each function runs on one connection lent by
//! `connection`; `batch` runs the batched ones (`Acquires`, `Completes`).

use std::{
    ops::ControlFlow,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use deadpool_postgres::Object;
use tokio_postgres::{error::SqlState, types::ToSql, Row};

use super::batch::Batched;
use super::cache::CompletedRecords;
use super::errors::from_db;
use super::identity;
use super::row::{
    completed_record, db_now, inserted_record, inserted_token, micros, record_from_row,
};
use super::sql;
use crate::domain::{
    decide_acquire, decide_complete, decide_release, decide_renew, AcquireCommand, AcquireDecision,
    AcquireOutcome, CompleteCommand, CompleteDecision, GetCommand, Lease, LeaseRejection,
    LeaseToken, Record, ReleaseCommand, ReleaseDecision, RenewCommand, RenewDecision, WaitCommand,
};
use crate::store::StoreError;
use crate::telemetry::metrics;

/// How often a command re-decides after losing a race before giving up. Each lost race means
/// another writer made progress on the key, so a handful is plenty.
const MAX_DECISION_ROUNDS: usize = 8;

/// Reads one record, live or not, with the database's time.
async fn fetch(
    client: &Object,
    namespace: &str,
    key: &str,
) -> Result<(Option<Record>, SystemTime), StoreError> {
    let statement = client.prepare_cached(sql::GET).await.map_err(from_db)?;
    let rows = client
        .query(&statement, &[&namespace, &key])
        .await
        .map_err(from_db)?;
    match rows.first() {
        Some(row) => Ok((Some(record_from_row(row)?), db_now(row, sql::AFTER_RECORD)?)),
        None => {
            let now = client.query_one(sql::DB_NOW, &[]).await.map_err(from_db)?;
            Ok((None, db_now(&now, 0)?))
        }
    }
}

fn lost_too_many_races(command: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{command} kept racing with concurrent writers of the same key; retry"
    ))
}

/// Acquire: insert the record, or decide on the one there and take it over by compare-and-set.
/// Counts in `races` the insert races described at `sql::ACQUIRE_INSERT_OR_GET`; remembers
/// completed records in `completed` and tells its clock the database's time.
pub async fn acquire(
    client: &Object,
    command: &AcquireCommand,
    races: &AtomicU64,
    completed: &CompletedRecords,
) -> Result<AcquireOutcome, StoreError> {
    let token = LeaseToken::generate()
        .map_err(|error| StoreError::Internal(format!("no randomness: {error}")))?;
    let token_bytes: &[u8] = token.as_bytes();
    let lease_ttl = micros(command.lease_ttl);
    let retention = micros(command.retention);
    let insert = client
        .prepare_cached(sql::ACQUIRE_INSERT_OR_GET)
        .await
        .map_err(from_db)?;
    let grant = client
        .prepare_cached(sql::ACQUIRE_GRANT)
        .await
        .map_err(from_db)?;
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let fingerprint: &[u8] = command.fingerprint.as_bytes();
    let holder = command.holder.as_str();
    for _ in 0..MAX_DECISION_ROUNDS {
        let sent = SystemTime::now();
        let generation = completed.generation();
        let rows = client
            .query(
                &insert,
                &[
                    &namespace,
                    &key,
                    &fingerprint,
                    &token_bytes,
                    &holder,
                    &lease_ttl,
                    &retention,
                ],
            )
            .await
            .map_err(from_db)?;
        // No row: a concurrent insert of this key committed while the statement ran (see
        // `sql::ACQUIRE_INSERT_OR_GET`). Deciding again sees it.
        let Some(row) = rows.first() else {
            races.fetch_add(1, Ordering::Relaxed);
            metrics::acquire_insert_race();
            continue;
        };
        let record = record_from_row(row)?;
        let created: bool = row.try_get(sql::AFTER_RECORD).map_err(from_db)?;
        if created {
            return Ok(AcquireOutcome::Acquired {
                lease: record.lease(),
                record,
                taken_over: false,
            });
        }
        let now = db_now(row, sql::AFTER_RECORD + 1)?;
        completed.clock.observe(sent, now);
        let replace = match decide_acquire(Some(&record), &command.fingerprint, now) {
            AcquireDecision::FingerprintMismatch => {
                completed.remember(&record, generation, identity::created(client));
                return Err(StoreError::FingerprintMismatch);
            }
            AcquireDecision::Completed => {
                completed.remember(&record, generation, identity::created(client));
                return Ok(AcquireOutcome::Completed { record });
            }
            AcquireDecision::InProgress { retry_after } => {
                return Ok(AcquireOutcome::InProgress {
                    record,
                    retry_after,
                })
            }
            AcquireDecision::Create => true,
            AcquireDecision::TakeOver => false,
        };
        let expected_fencing = i64::try_from(record.fencing_token)
            .map_err(|_| StoreError::Internal("fencing token out of range".into()))?;
        let expected_revision = i64::try_from(record.revision)
            .map_err(|_| StoreError::Internal("revision out of range".into()))?;
        let granted = client
            .query_opt(
                &grant,
                &[
                    &namespace,
                    &key,
                    &fingerprint,
                    &token_bytes,
                    &holder,
                    &lease_ttl,
                    &retention,
                    &replace,
                    &expected_fencing,
                    &expected_revision,
                ],
            )
            .await
            .map_err(from_db)?;
        if let Some(row) = granted {
            let record = record_from_row(&row)?;
            return Ok(AcquireOutcome::Acquired {
                lease: record.lease(),
                record,
                taken_over: !replace,
            });
        }
        // Someone wrote the row since we read it: decide again on what it is now.
    }
    Err(lost_too_many_races("Acquire"))
}

/// Runs the compare-and-set `statement` (an UPDATE guarded by the lease, returning a row when it
/// applied) until it applies, or until the domain's decision on the record as it is now settles
/// the command without it (`decide` breaks with the answer). Each round it does not apply while
/// `decide` says to try again, another writer changed the row in between; after a handful the
/// caller is told to retry.
async fn update_or_decide<T>(
    client: &Object,
    command: &str,
    statement: &str,
    parameters: &[&(dyn ToSql + Sync)],
    (namespace, key): (&str, &str),
    applied: impl Fn(Row) -> Result<T, StoreError>,
    decide: impl Fn(Option<Record>, SystemTime) -> ControlFlow<Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let statement = client.prepare_cached(statement).await.map_err(from_db)?;
    for _ in 0..MAX_DECISION_ROUNDS {
        let updated = client
            .query_opt(&statement, parameters)
            .await
            .map_err(from_db)?;
        if let Some(row) = updated {
            return applied(row);
        }
        let (record, now) = fetch(client, namespace, key).await?;
        if let ControlFlow::Break(answer) = decide(record, now) {
            return answer;
        }
    }
    Err(lost_too_many_races(command))
}

/// Complete: store the result under the current lease; returns the completed record, and whether
/// this call stored it (`false`: a retried Complete found its result already stored).
pub async fn complete(
    client: &Object,
    command: &CompleteCommand,
) -> Result<(Record, bool), StoreError> {
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let token: &[u8] = command.lease_token.as_bytes();
    let (meta_keys, meta_values): (Vec<&str>, Vec<&str>) = command
        .result
        .metadata
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .unzip();
    let retention = command.retention.map(micros);
    let body: &[u8] = &command.result.body;
    let parameters: [&(dyn ToSql + Sync); 8] = [
        &namespace,
        &key,
        &token,
        &body,
        &command.result.code,
        &meta_keys,
        &meta_values,
        &retention,
    ];
    update_or_decide(
        client,
        "Complete",
        sql::COMPLETE,
        &parameters,
        (namespace, key),
        |row| Ok((completed_record(command, &row)?, true)),
        |record, now| match decide_complete(record.as_ref(), &command.lease_token, now) {
            CompleteDecision::Reject(rejection) => ControlFlow::Break(Err(rejection.into())),
            CompleteDecision::AlreadyCompleted => ControlFlow::Break(
                record
                    .map(|record| (record, false))
                    .ok_or(StoreError::Rejected(LeaseRejection::NotFound)),
            ),
            // The row changed between the two statements; try the update again.
            CompleteDecision::Store => ControlFlow::Continue(()),
        },
    )
    .await
}

/// Release: give the key back.
pub async fn release(client: &Object, command: &ReleaseCommand) -> Result<(), StoreError> {
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let token: &[u8] = command.lease_token.as_bytes();
    update_or_decide(
        client,
        "Release",
        sql::RELEASE,
        &[&namespace, &key, &token],
        (namespace, key),
        |_| Ok(()),
        |record, now| match decide_release(record.as_ref(), &command.lease_token, now) {
            ReleaseDecision::Reject(rejection) => ControlFlow::Break(Err(rejection.into())),
            ReleaseDecision::AlreadyFree => ControlFlow::Break(Ok(())),
            ReleaseDecision::Release => ControlFlow::Continue(()),
        },
    )
    .await
}

/// Renew: extend the current lease.
pub async fn renew(client: &Object, command: &RenewCommand) -> Result<Lease, StoreError> {
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let token: &[u8] = command.lease_token.as_bytes();
    let lease_ttl = micros(command.lease_ttl);
    update_or_decide(
        client,
        "Renew",
        sql::RENEW,
        &[&namespace, &key, &token, &lease_ttl],
        (namespace, key),
        |row| Ok(record_from_row(&row)?.lease()),
        |record, now| match decide_renew(record.as_ref(), &command.lease_token, now) {
            RenewDecision::Reject(rejection) => ControlFlow::Break(Err(rejection.into())),
            RenewDecision::Renew => ControlFlow::Continue(()),
        },
    )
    .await
}

/// Get: the live record, remembered in `completed` if completed.
pub async fn get(
    client: &Object,
    command: &GetCommand,
    completed: &CompletedRecords,
) -> Result<Record, StoreError> {
    let sent = SystemTime::now();
    let generation = completed.generation();
    let (record, now) = fetch(client, command.namespace.as_str(), command.key.as_str()).await?;
    completed.clock.observe(sent, now);
    let record = record
        .filter(|record| record.is_live(now))
        .ok_or(StoreError::Rejected(LeaseRejection::NotFound))?;
    completed.remember(&record, generation, identity::created(client));
    Ok(record)
}

/// One look of a Wait: the record, live or not, with the database's time. With `mark`, first
/// marks the record as waited on, so that its Complete or Release notifies.
pub async fn read_for_wait(
    client: &Object,
    command: &WaitCommand,
    mark: bool,
) -> Result<(Option<Record>, SystemTime), StoreError> {
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    if mark {
        let statement = client
            .prepare_cached(sql::MARK_WAITED_ON)
            .await
            .map_err(from_db)?;
        client
            .execute(&statement, &[&namespace, &key])
            .await
            .map_err(from_db)?;
    }
    fetch(client, namespace, key).await
}

/// Runs a batch statement. Batches take their rows in one global order, so they should not
/// deadlock; should PostgreSQL still report a deadlock or a serialization failure, no row comes
/// back, so every command goes back to its caller for the one-command path rather than failing.
async fn query_batch(
    client: &Object,
    sql: &str,
    parameters: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(from_db)?;
    let rows = client.query(&statement, parameters).await;
    match rows {
        Ok(rows) => Ok(rows),
        Err(error)
            if matches!(
                error.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
            ) =>
        {
            Ok(Vec::new())
        }
        Err(error) => Err(from_db(error)),
    }
}

/// Acquires as the batcher runs them: `acquire` alone, or many new keys in one statement.
pub struct Acquires {
    /// Where `acquire` counts the insert races it lost.
    pub insert_races: Arc<AtomicU64>,
    /// The replay cache `acquire` fills and whose database clock it sets.
    pub completed: Arc<CompletedRecords>,
}

impl Batched for Acquires {
    type Command = AcquireCommand;
    type Output = AcquireOutcome;
    const NAME: &'static str = "acquire";

    fn row(command: &AcquireCommand) -> (&str, &str) {
        (command.namespace.as_str(), command.key.as_str())
    }

    async fn one(
        &self,
        command: &AcquireCommand,
        client: &Object,
    ) -> Result<AcquireOutcome, StoreError> {
        acquire(client, command, &self.insert_races, &self.completed).await
    }

    async fn many(
        &self,
        commands: &[&AcquireCommand],
        client: &Object,
    ) -> Result<Vec<Option<AcquireOutcome>>, StoreError> {
        let tokens = commands
            .iter()
            .map(|_| LeaseToken::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| StoreError::Internal(format!("no randomness: {error}")))?;
        let namespaces: Vec<&str> = commands.iter().map(|c| c.namespace.as_str()).collect();
        let keys: Vec<&str> = commands.iter().map(|c| c.key.as_str()).collect();
        let fingerprints: Vec<&[u8]> = commands.iter().map(|c| c.fingerprint.as_bytes()).collect();
        let token_bytes: Vec<&[u8]> = tokens.iter().map(|t| t.as_bytes().as_slice()).collect();
        let holders: Vec<&str> = commands.iter().map(|c| c.holder.as_str()).collect();
        let ttls: Vec<i64> = commands.iter().map(|c| micros(c.lease_ttl)).collect();
        let retentions: Vec<i64> = commands.iter().map(|c| micros(c.retention)).collect();
        let parameters: [&(dyn ToSql + Sync); 7] = [
            &namespaces,
            &keys,
            &fingerprints,
            &token_bytes,
            &holders,
            &ttls,
            &retentions,
        ];
        let mut settled: Vec<Option<AcquireOutcome>> = commands.iter().map(|_| None).collect();
        let rows = query_batch(client, sql::ACQUIRE_BATCH, &parameters).await?;
        for row in &rows {
            // Lease tokens are random and fresh: the token names the input row.
            let token = inserted_token(row)?;
            let Some(index) = tokens.iter().position(|mine| *mine == token) else {
                continue;
            };
            if let (Some(slot), Some(command)) = (settled.get_mut(index), commands.get(index)) {
                let record = inserted_record(command, token, row)?;
                *slot = Some(AcquireOutcome::Acquired {
                    lease: record.lease(),
                    record,
                    taken_over: false,
                });
            }
        }
        Ok(settled)
    }
}

/// Completes as the batcher runs them: `complete` alone, or many in one statement.
pub struct Completes {
    /// The replay cache every completed record goes into.
    pub completed: Arc<CompletedRecords>,
}

impl Batched for Completes {
    type Command = CompleteCommand;
    /// The record, and whether this command stored it (see `complete`).
    type Output = (Record, bool);
    const NAME: &'static str = "complete";

    fn row(command: &CompleteCommand) -> (&str, &str) {
        (command.namespace.as_str(), command.key.as_str())
    }

    async fn one(
        &self,
        command: &CompleteCommand,
        client: &Object,
    ) -> Result<(Record, bool), StoreError> {
        let generation = self.completed.generation();
        let (record, stored) = complete(client, command).await?;
        self.completed
            .remember(&record, generation, identity::created(client));
        Ok((record, stored))
    }

    async fn many(
        &self,
        commands: &[&CompleteCommand],
        client: &Object,
    ) -> Result<Vec<Option<(Record, bool)>>, StoreError> {
        let generation = self.completed.generation();
        let namespaces: Vec<&str> = commands.iter().map(|c| c.namespace.as_str()).collect();
        let keys: Vec<&str> = commands.iter().map(|c| c.key.as_str()).collect();
        let tokens: Vec<&[u8]> = commands
            .iter()
            .map(|c| c.lease_token.as_bytes().as_slice())
            .collect();
        let bodies: Vec<&[u8]> = commands.iter().map(|c| c.result.body.as_slice()).collect();
        let codes: Vec<i32> = commands.iter().map(|c| c.result.code).collect();
        // Metadata flattened: command i's pairs are meta_names[starts[i] ..][..counts[i]]
        // (1-based, as SQL arrays are).
        let (mut meta_names, mut meta_values) = (Vec::new(), Vec::new());
        let (mut starts, mut counts) = (Vec::new(), Vec::new());
        for command in commands {
            let start = i32::try_from(meta_names.len() + 1);
            let count = i32::try_from(command.result.metadata.len());
            let (Ok(start), Ok(count)) = (start, count) else {
                return Err(StoreError::Internal(
                    "metadata too large for a batch".into(),
                ));
            };
            starts.push(start);
            counts.push(count);
            for (name, value) in &command.result.metadata {
                meta_names.push(name.as_str());
                meta_values.push(value.as_str());
            }
        }
        let retentions: Vec<Option<i64>> =
            commands.iter().map(|c| c.retention.map(micros)).collect();
        let parameters: [&(dyn ToSql + Sync); 10] = [
            &namespaces,
            &keys,
            &tokens,
            &bodies,
            &codes,
            &meta_names,
            &meta_values,
            &starts,
            &counts,
            &retentions,
        ];
        let mut settled: Vec<Option<(Record, bool)>> = commands.iter().map(|_| None).collect();
        let rows = query_batch(client, sql::COMPLETE_BATCH, &parameters).await?;
        for row in &rows {
            let position: i32 = row.try_get(sql::AFTER_COMPLETED + 2).map_err(from_db)?;
            let Ok(position) = usize::try_from(position) else {
                continue;
            };
            if let (Some(slot), Some(command)) = (settled.get_mut(position), commands.get(position))
            {
                let record = completed_record(command, row)?;
                self.completed
                    .remember(&record, generation, identity::created(client));
                // The batch statement settles only the rows it stored.
                *slot = Some((record, true));
            }
        }
        Ok(settled)
    }
}
