//! Clients in loops: acquire → work → complete (or release, renew, or die holding the lease), with
//! retries and many duplicates per key, every call recorded in the history.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use tokio::sync::watch;
use tonic::{transport::Channel, Code};

use super::history::{retryable, Call, History, Op, Reply};
use crate::harness::reason;

pub const NAMESPACE: &str = "chaos";
/// A client gives up a call after this long (also sent as the gRPC deadline).
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct Workload {
    pub workers: usize,
    /// Workers pick among this many keys at a time ...
    pub keys: u64,
    /// ... and move on to new keys this often, so every phase of a run sees fresh work.
    pub epoch: Duration,
    pub lease_ttl: Duration,
    /// Chance that a holder dies with the lease (never completes or releases).
    pub abandon: f64,
    /// Chance that a holder hits a retryable failure and releases.
    pub release: f64,
    /// Chance that a holder's work is long and renews its lease once.
    pub renew: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            workers: 12,
            keys: 6,
            epoch: Duration::from_millis(400),
            lease_ttl: Duration::from_secs(1),
            abandon: 0.03,
            release: 0.07,
            renew: 0.05,
        }
    }
}

/// A small deterministic PRNG (SplitMix64): each worker draws its own reproducible choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One client process's view: a connection to every replica, and its identity in the history.
pub struct Caller {
    pub worker: usize,
    pub clients: Vec<IdempotencyServiceClient<Channel>>,
    pub history: Arc<History>,
}

impl Caller {
    fn pick(&self, rng: &mut Rng) -> usize {
        rng.below(self.clients.len() as u64) as usize
    }

    /// Runs one call with a deadline and records it.
    async fn record<T, Fut>(
        &self,
        replica: usize,
        key: &str,
        call: Call,
        fut: Fut,
        reply: impl FnOnce(T) -> Reply,
    ) -> (Reply, Option<T>)
    where
        T: Clone,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let invoked = SystemTime::now();
        let outcome = tokio::time::timeout(CALL_TIMEOUT + Duration::from_millis(500), fut).await;
        let returned = SystemTime::now();
        let (answer, value) = match outcome {
            Ok(Ok(response)) => {
                let value = response.into_inner();
                (reply(value.clone()), Some(value))
            }
            // The connection broke under the call (a replica died or closed it): tonic reports
            // UNKNOWN "transport error" or CANCELLED "operation was canceled", with the transport
            // error as the source. Not an answer from idemd: the outcome is unknown, as with
            // UNAVAILABLE.
            Ok(Err(status)) if lost_connection(&status) => (
                Reply::Failed {
                    code: Code::Unavailable,
                    reason: CONNECTION_LOST.into(),
                    message: status.message().to_string(),
                },
                None,
            ),
            Ok(Err(status)) => (
                Reply::Failed {
                    code: status.code(),
                    reason: reason(&status),
                    message: status.message().to_string(),
                },
                None,
            ),
            Err(_) => (
                Reply::Failed {
                    code: Code::DeadlineExceeded,
                    reason: String::new(),
                    message: "the client gave up".into(),
                },
                None,
            ),
        };
        self.history.record(Op {
            worker: self.worker,
            replica,
            key: key.to_string(),
            call,
            invoked,
            returned,
            reply: answer.clone(),
        });
        (answer, value)
    }

    pub async fn acquire(
        &self,
        replica: usize,
        key: &str,
        lease_ttl: Duration,
    ) -> (Reply, Option<pb::AcquireResponse>) {
        let mut request = tonic::Request::new(pb::AcquireRequest {
            namespace: NAMESPACE.into(),
            key: key.into(),
            fingerprint: format!("fp-{key}").into_bytes(),
            lease_ttl: prost_types::Duration::try_from(lease_ttl).ok(),
            retention: None,
            holder: format!("worker-{}", self.worker),
        });
        request.set_timeout(CALL_TIMEOUT);
        let mut client = self.clients[replica].clone();
        self.record(
            replica,
            key,
            Call::Acquire,
            async move { client.acquire(request).await },
            acquire_reply,
        )
        .await
    }

    pub async fn complete(
        &self,
        replica: usize,
        key: &str,
        lease: &pb::Lease,
        body: Vec<u8>,
    ) -> Reply {
        let mut request = tonic::Request::new(pb::CompleteRequest {
            namespace: NAMESPACE.into(),
            key: key.into(),
            lease_token: lease.token.clone(),
            result: Some(pb::Result {
                body: body.clone(),
                code: 200,
                metadata: Default::default(),
            }),
            retention: None,
        });
        request.set_timeout(CALL_TIMEOUT);
        let mut client = self.clients[replica].clone();
        let call = Call::Complete {
            fence: lease.fencing_token,
            body,
        };
        let reply = |response: pb::CompleteResponse| Reply::Stored {
            body: result_body(response.record.as_ref()).unwrap_or_default(),
        };
        self.record(
            replica,
            key,
            call,
            async move { client.complete(request).await },
            reply,
        )
        .await
        .0
    }

    async fn release(&self, replica: usize, key: &str, lease: &pb::Lease) -> Reply {
        let mut request = tonic::Request::new(pb::ReleaseRequest {
            namespace: NAMESPACE.into(),
            key: key.into(),
            lease_token: lease.token.clone(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let mut client = self.clients[replica].clone();
        let call = Call::Release {
            fence: lease.fencing_token,
        };
        self.record(
            replica,
            key,
            call,
            async move { client.release(request).await },
            |_| Reply::Released,
        )
        .await
        .0
    }

    async fn renew(&self, replica: usize, key: &str, lease: &pb::Lease, ttl: Duration) -> Reply {
        let mut request = tonic::Request::new(pb::RenewRequest {
            namespace: NAMESPACE.into(),
            key: key.into(),
            lease_token: lease.token.clone(),
            lease_ttl: prost_types::Duration::try_from(ttl).ok(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let mut client = self.clients[replica].clone();
        let call = Call::Renew {
            fence: lease.fencing_token,
        };
        let reply = |response: pb::RenewResponse| match response
            .lease
            .and_then(|lease| lease.expires_at)
            .and_then(|at| SystemTime::try_from(at).ok())
        {
            Some(expires) => Reply::Renewed { expires },
            None => malformed("Renew without a lease expiry"),
        };
        self.record(
            replica,
            key,
            call,
            async move { client.renew(request).await },
            reply,
        )
        .await
        .0
    }

    pub async fn get(&self, replica: usize, key: &str) -> Reply {
        let mut request = tonic::Request::new(pb::GetRequest {
            namespace: NAMESPACE.into(),
            key: key.into(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let mut client = self.clients[replica].clone();
        let outcome = self
            .record(
                replica,
                key,
                Call::Get,
                async move { client.get(request).await },
                |response: pb::GetResponse| Reply::Read {
                    body: result_body(response.record.as_ref()),
                },
            )
            .await
            .0;
        match outcome {
            Reply::Failed {
                code: Code::NotFound,
                ..
            } => Reply::Missing,
            other => other,
        }
    }
}

/// The `reason` recorded for a call whose connection broke under it.
pub const CONNECTION_LOST: &str = "CONNECTION_LOST";

fn lost_connection(status: &tonic::Status) -> bool {
    use std::error::Error;
    status
        .source()
        .is_some_and(|source| source.is::<tonic::transport::Error>())
}

fn malformed(what: &str) -> Reply {
    Reply::Failed {
        code: Code::Internal,
        reason: "MALFORMED_ANSWER".into(),
        message: what.into(),
    }
}

/// The result body of a completed record.
fn result_body(record: Option<&pb::Record>) -> Option<Vec<u8>> {
    let record = record?;
    (record.state == pb::RecordState::Completed as i32).then(|| {
        record
            .result
            .as_ref()
            .map(|r| r.body.clone())
            .unwrap_or_default()
    })
}

fn acquire_reply(response: pb::AcquireResponse) -> Reply {
    match pb::Outcome::try_from(response.outcome) {
        Ok(pb::Outcome::Acquired) => {
            let expires = response
                .lease
                .as_ref()
                .and_then(|lease| lease.expires_at)
                .and_then(|at| SystemTime::try_from(at).ok());
            match (response.lease.as_ref(), expires) {
                (Some(lease), Some(expires)) => Reply::Acquired {
                    fence: lease.fencing_token,
                    expires,
                },
                _ => malformed("ACQUIRED without a lease"),
            }
        }
        Ok(pb::Outcome::InProgress) => Reply::InProgress,
        Ok(pb::Outcome::Completed) => match result_body(response.record.as_ref()) {
            Some(body) => Reply::Completed { body },
            None => malformed("COMPLETED without a completed record"),
        },
        _ => malformed("unknown outcome"),
    }
}

/// The key a worker works on now: a few keys per epoch, shared by all workers.
fn key_now(rng: &mut Rng, workload: &Workload, started: Instant) -> String {
    let epoch = started.elapsed().as_millis() / workload.epoch.as_millis().max(1);
    format!("e{epoch}-k{}", rng.below(workload.keys))
}

/// A backoff between retries; faults are short, so keep it small.
async fn pause(rng: &mut Rng) {
    tokio::time::sleep(Duration::from_millis(5 + rng.below(20))).await;
}

/// A worker's loop until `stop`: each round takes one key to completion, like a client handling
/// one incoming request with retries.
/// Calls are never cancelled half-way (an unrecorded call would hide what the server did): the
/// worker looks at `stop` between calls.
pub async fn worker(caller: Caller, workload: Workload, stop: watch::Receiver<bool>) {
    let mut rng = Rng::new(0x1de3d ^ ((caller.worker as u64) << 32));
    let started = Instant::now();
    while !*stop.borrow() {
        let key = key_now(&mut rng, &workload, started);
        handle_request(&caller, &workload, &mut rng, &key, &stop).await;
    }
}

/// Acquire until the work is done by us or someone else (or 100 attempts pass).
async fn handle_request(
    caller: &Caller,
    workload: &Workload,
    rng: &mut Rng,
    key: &str,
    stop: &watch::Receiver<bool>,
) {
    for _ in 0..100 {
        if *stop.borrow() {
            return;
        }
        let (reply, response) = caller
            .acquire(caller.pick(rng), key, workload.lease_ttl)
            .await;
        let lease = match reply {
            Reply::Acquired { .. } => match response.and_then(|response| response.lease) {
                Some(lease) => lease,
                None => return,
            },
            Reply::Completed { .. } => return,
            Reply::InProgress => {
                tokio::time::sleep(Duration::from_millis(20 + rng.below(30))).await;
                continue;
            }
            Reply::Failed { code, .. } if retryable(code) => {
                pause(rng).await;
                continue;
            }
            _ => return,
        };
        // The work: short, well inside the lease.
        tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
        if rng.chance(workload.abandon) {
            return; // the client died holding the lease
        }
        if rng.chance(workload.release) {
            for _ in 0..5 {
                match caller.release(caller.pick(rng), key, &lease).await {
                    Reply::Failed { code, .. } if retryable(code) => pause(rng).await,
                    _ => break,
                }
            }
            continue;
        }
        if rng.chance(workload.renew) {
            let _ = caller
                .renew(caller.pick(rng), key, &lease, workload.lease_ttl)
                .await;
            tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
        }
        let body = format!(
            "{key}|fence={}|worker={}",
            lease.fencing_token, caller.worker
        );
        for _ in 0..5 {
            match caller
                .complete(caller.pick(rng), key, &lease, body.clone().into_bytes())
                .await
            {
                Reply::Stored { .. } => return,
                Reply::Failed { code, .. } if retryable(code) => pause(rng).await,
                _ => break, // lease lost: try to acquire again
            }
        }
    }
}
