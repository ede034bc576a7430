//! Domain → wire. The lease token leaves the server only inside the `Lease` of the caller that
//! acquired it; `Record` never carries it.

use std::time::{Duration, SystemTime};

use crate::domain::{AcquireOutcome, Lease, Record, RecordState, StoredResult, WaitOutcome};
use crate::proto::idempotency::v1 as pb;

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(value).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

pub fn lease(lease: &Lease) -> pb::Lease {
    pb::Lease {
        token: lease.token.to_hex(),
        fencing_token: lease.fencing_token,
        expires_at: Some(timestamp(lease.expires_at)),
    }
}

fn result(result: StoredResult) -> pb::Result {
    pb::Result {
        body: result.body,
        code: result.code,
        metadata: result.metadata,
    }
}

pub fn record(record: Record) -> pb::Record {
    let completed = record.state == RecordState::Completed;
    pb::Record {
        namespace: record.namespace.into_string(),
        key: record.key.into_string(),
        state: match record.state {
            RecordState::InProgress => pb::RecordState::InProgress,
            RecordState::Completed => pb::RecordState::Completed,
        } as i32,
        fingerprint: record.fingerprint.into_bytes(),
        result: record.result.map(result),
        fencing_token: record.fencing_token,
        attempts: record.attempts,
        holder: record.holder.into_string(),
        created_at: Some(timestamp(record.created_at)),
        lease_expires_at: (!completed).then(|| timestamp(record.lease_expires_at)),
        completed_at: record.completed_at.map(timestamp),
        expires_at: Some(timestamp(record.expires_at)),
    }
}

pub fn acquire(outcome: AcquireOutcome) -> pb::AcquireResponse {
    match outcome {
        AcquireOutcome::Acquired {
            lease: granted,
            record: current,
            ..
        } => pb::AcquireResponse {
            outcome: pb::Outcome::Acquired as i32,
            lease: Some(lease(&granted)),
            record: Some(record(current)),
            retry_after: None,
        },
        AcquireOutcome::InProgress {
            record: current,
            retry_after,
        } => pb::AcquireResponse {
            outcome: pb::Outcome::InProgress as i32,
            lease: None,
            record: Some(record(current)),
            retry_after: Some(duration(retry_after)),
        },
        AcquireOutcome::Completed { record: current } => pb::AcquireResponse {
            outcome: pb::Outcome::Completed as i32,
            lease: None,
            record: Some(record(current)),
            retry_after: None,
        },
    }
}

pub fn wait(outcome: WaitOutcome) -> pb::WaitResponse {
    let (outcome, current) = match outcome {
        WaitOutcome::Completed { record } => (pb::WaitOutcome::Completed, Some(record)),
        WaitOutcome::Free { record } => (pb::WaitOutcome::Free, record),
        WaitOutcome::TimedOut { record } => (pb::WaitOutcome::TimedOut, Some(record)),
    };
    pb::WaitResponse {
        outcome: outcome as i32,
        record: current.map(record),
    }
}
