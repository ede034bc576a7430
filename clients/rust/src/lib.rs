//! idemd's Rust client: make any piece of work idempotent in a few lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idemd_client::proto::idempotency::v1::Result as StoredResult;
//! use idemd_client::{fingerprint, IdempotencyClient, Options, WorkError};
//!
//! let client = IdempotencyClient::connect("http://127.0.0.1:50051").await?;
//! let request = serde_json::json!({"order": 4711, "amount": 1250});
//! let outcome = client
//!     .idempotent("payments", "order-4711", fingerprint(&request)?, Options::default(), |lease| async move {
//!         // charge the card, guarding the write with lease.fencing_token
//!         Ok::<_, WorkError<std::io::Error>>(StoredResult { body: b"charged".to_vec(), code: 201, ..Default::default() })
//!     })
//!     .await?;
//! println!("replayed: {}", outcome.replayed);
//! # Ok(()) }
//! ```
//!
//! The behaviour is the same in every idemd client (Rust, Python, Node):
//! Acquire → ACQUIRED: run the work while the lease is renewed in the background, then Complete
//! (or Release on a retryable failure); IN_PROGRESS: Wait, then replay or try again;
//! COMPLETED: return the stored result without running the work. idemd unreachable: an error,
//! unless `fail_open` is set.

use std::{future::Future, time::Duration};

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::proto::idempotency::v1 as pb;
use crate::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;

/// Client stubs and messages generated from the repository's `proto/` (by `build.rs`): the
/// [`IdempotencyClient`] is built on them, and they are there for calling an RPC directly.
pub mod proto {
    pub mod idempotency {
        pub mod v1 {
            #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
            tonic::include_proto!("idempotency.v1");
        }
        /// The operators' admin API (`idempotency.admin.v1.AdminService`), for scripts and tools.
        pub mod admin {
            pub mod v1 {
                #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
                tonic::include_proto!("idempotency.admin.v1");
            }
        }
    }
}

/// The canonical fingerprint of a request: SHA-256 of its RFC 8785 (JCS) canonical JSON. Every
/// idemd client computes the same bytes (see `clients/fingerprint-vectors.json`).
pub fn fingerprint<T: serde::Serialize>(request: &T) -> Result<Vec<u8>, serde_json::Error> {
    let canonical = serde_json_canonicalizer::to_vec(request)?;
    Ok(Sha256::digest(&canonical).to_vec())
}

/// How `idempotent` behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lease length; renewed every third of it while the work runs.
    pub lease_ttl: Duration,
    /// How long the result is kept; `None`: the server's default.
    pub retention: Option<Duration>,
    /// Shown in the record, for debugging.
    pub holder: String,
    /// How many times to wait for an in-flight duplicate before giving up.
    pub max_waits: u32,
    /// Longest single Wait.
    pub wait_timeout: Duration,
    /// Run the work unprotected when idemd cannot be reached (default: fail closed).
    pub fail_open: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            retention: None,
            holder: format!(
                "{}:{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "rust-client".into()),
                std::process::id()
            ),
            max_waits: 10,
            wait_timeout: Duration::from_secs(30),
            fail_open: false,
        }
    }
}

/// What the work sees of its lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Strictly increasing per grant: pass it to downstream writes so they can refuse a caller
    /// whose lease was taken over.
    pub fencing_token: u64,
    /// The lease's secret token.
    pub token: String,
}

/// How the work failed.
#[derive(Debug)]
pub enum WorkError<E> {
    /// Try again later: the key is released, so the next attempt runs the work again.
    Retryable(E),
    /// Final: with `result`, that result is stored and replayed to every retry; without, the key
    /// is released.
    Terminal {
        error: E,
        result: Option<pb::Result>,
    },
}

/// What `idempotent` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub result: pb::Result,
    /// The work did not run here: this is the stored result of an earlier run.
    pub replayed: bool,
    /// False only when `fail_open` ran the work without idemd.
    pub protected: bool,
}

/// Why `idempotent` failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError<E: std::fmt::Debug> {
    #[error("idemd is unreachable: {0}")]
    Unavailable(Status),
    #[error("the key was used before with a different request (fingerprint mismatch)")]
    FingerprintMismatch,
    #[error("another caller is still working on the key after {0} waits")]
    InProgress(u32),
    #[error("the work failed: {0:?}")]
    Work(E),
    #[error("idemd refused: {0}")]
    Rpc(Status),
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Whether idemd could not be reached or did not answer: the call may be retried. A connection
/// that breaks under a call (a replica restarting) reaches us as UNKNOWN "transport error" or
/// CANCELLED "operation was canceled", with the transport error as the source.
fn unreachable_status(status: &Status) -> bool {
    use std::error::Error;
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
        || (status.code() == Code::Unknown && reason(status).is_empty())
        || status
            .source()
            .is_some_and(|source| source.is::<tonic::transport::Error>())
}

fn duration(value: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(value).ok()
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection to idemd.
#[derive(Clone)]
pub struct IdempotencyClient {
    inner: IdempotencyServiceClient<Channel>,
    token: Option<MetadataValue<Ascii>>,
}

impl IdempotencyClient {
    /// Connects lazily: an unreachable idemd surfaces on the first call.
    pub async fn connect(target: impl Into<String>) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(target.into())?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self::new(channel))
    }

    pub fn new(channel: Channel) -> Self {
        Self {
            inner: IdempotencyServiceClient::new(channel),
            token: None,
        }
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn with_token(
        mut self,
        token: &str,
    ) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        self.token = Some(format!("Bearer {token}").parse()?);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    /// The raw gRPC client, for the other RPCs.
    pub fn raw(&self) -> IdempotencyServiceClient<Channel> {
        self.inner.clone()
    }

    /// Runs `work` at most once for (namespace, key) — see the module documentation.
    pub async fn idempotent<F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        fingerprint: Vec<u8>,
        options: Options,
        work: F,
    ) -> Result<Outcome, ClientError<E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<pb::Result, WorkError<E>>>,
        E: std::fmt::Debug,
    {
        let mut client = self.inner.clone();
        let mut waits = 0;
        loop {
            let acquire = pb::AcquireRequest {
                namespace: namespace.into(),
                key: key.into(),
                fingerprint: fingerprint.clone(),
                lease_ttl: duration(options.lease_ttl),
                retention: options.retention.and_then(duration),
                holder: options.holder.clone(),
            };
            let response = match client.acquire(self.request(acquire)).await {
                Ok(response) => response.into_inner(),
                Err(status) if unreachable_status(&status) => {
                    if !options.fail_open {
                        return Err(ClientError::Unavailable(status));
                    }
                    let lease = Lease {
                        fencing_token: 0,
                        token: String::new(),
                    };
                    return match work(lease).await {
                        Ok(result) => Ok(Outcome {
                            result,
                            replayed: false,
                            protected: false,
                        }),
                        Err(WorkError::Retryable(error) | WorkError::Terminal { error, .. }) => {
                            Err(ClientError::Work(error))
                        }
                    };
                }
                Err(status) if reason(&status) == "FINGERPRINT_MISMATCH" => {
                    return Err(ClientError::FingerprintMismatch)
                }
                Err(status) => return Err(ClientError::Rpc(status)),
            };
            match response.outcome() {
                pb::Outcome::Completed => {
                    let result = response.record.and_then(|r| r.result).unwrap_or_default();
                    return Ok(Outcome {
                        result,
                        replayed: true,
                        protected: true,
                    });
                }
                pb::Outcome::Acquired => {
                    let lease = response.lease.unwrap_or_default();
                    return self.run_leased(namespace, key, lease, &options, work).await;
                }
                _ => {
                    if waits >= options.max_waits {
                        return Err(ClientError::InProgress(waits));
                    }
                    waits += 1;
                    let retry_after = response
                        .retry_after
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or(options.wait_timeout);
                    let wait = pb::WaitRequest {
                        namespace: namespace.into(),
                        key: key.into(),
                        timeout: duration(
                            retry_after
                                .min(options.wait_timeout)
                                .max(Duration::from_millis(1)),
                        ),
                    };
                    match client.wait(self.request(wait)).await {
                        Ok(waited) => {
                            let waited = waited.into_inner();
                            if waited.outcome() == pb::WaitOutcome::Completed {
                                let result =
                                    waited.record.and_then(|r| r.result).unwrap_or_default();
                                return Ok(Outcome {
                                    result,
                                    replayed: true,
                                    protected: true,
                                });
                            }
                            // FREE or TIMED_OUT: try to acquire again.
                        }
                        Err(status) if unreachable_status(&status) => {
                            return Err(ClientError::Unavailable(status))
                        }
                        Err(status) => return Err(ClientError::Rpc(status)),
                    }
                }
            }
        }
    }

    async fn run_leased<F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        lease: pb::Lease,
        options: &Options,
        work: F,
    ) -> Result<Outcome, ClientError<E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<pb::Result, WorkError<E>>>,
        E: std::fmt::Debug,
    {
        // Keep the lease alive while the work runs: renew every third of its length.
        let renewer = {
            let mut client = self.inner.clone();
            let renew = self.request(pb::RenewRequest {
                namespace: namespace.into(),
                key: key.into(),
                lease_token: lease.token.clone(),
                lease_ttl: duration(options.lease_ttl),
            });
            let (metadata, _, message) = renew.into_parts();
            let every = (options.lease_ttl / 3).max(Duration::from_millis(10));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    let request =
                        Request::from_parts(metadata.clone(), Default::default(), message.clone());
                    if let Err(status) = client.renew(request).await {
                        tracing::warn!(%status, "could not renew the lease");
                    }
                }
            })
        };
        // Stops renewing when the work ends, and also if this future is dropped mid-work.
        let renewer = AbortOnDrop(renewer);
        let outcome = work(Lease {
            fencing_token: lease.fencing_token,
            token: lease.token.clone(),
        })
        .await;
        drop(renewer);
        let mut client = self.inner.clone();
        let release = |client: &mut IdempotencyServiceClient<Channel>| {
            let request = self.request(pb::ReleaseRequest {
                namespace: namespace.into(),
                key: key.into(),
                lease_token: lease.token.clone(),
            });
            let mut client = client.clone();
            async move { client.release(request).await }
        };
        let complete = |client: &mut IdempotencyServiceClient<Channel>, result: pb::Result| {
            let request = self.request(pb::CompleteRequest {
                namespace: namespace.into(),
                key: key.into(),
                lease_token: lease.token.clone(),
                result: Some(result),
                retention: options.retention.and_then(duration),
            });
            let mut client = client.clone();
            async move { client.complete(request).await }
        };
        match outcome {
            Ok(result) => {
                let record = complete(&mut client, result)
                    .await
                    .map_err(|status| {
                        if unreachable_status(&status) {
                            ClientError::Unavailable(status)
                        } else {
                            ClientError::Rpc(status)
                        }
                    })?
                    .into_inner()
                    .record
                    .unwrap_or_default();
                Ok(Outcome {
                    result: record.result.unwrap_or_default(),
                    replayed: false,
                    protected: true,
                })
            }
            Err(WorkError::Retryable(error)) => {
                if let Err(status) = release(&mut client).await {
                    tracing::warn!(%status, "could not release the lease; it expires by itself");
                }
                Err(ClientError::Work(error))
            }
            Err(WorkError::Terminal { error, result }) => {
                let settled = match result {
                    Some(result) => complete(&mut client, result).await.map(|_| ()),
                    None => release(&mut client).await.map(|_| ()),
                };
                if let Err(status) = settled {
                    tracing::warn!(%status, "could not settle the lease after a failure");
                }
                Err(ClientError::Work(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_match_the_shared_vectors() {
        let text = include_str!("../../fingerprint-vectors.json");
        let document: serde_json::Value = serde_json::from_str(text).expect("vectors");
        let vectors = document["vectors"].as_array().expect("vector list");
        assert!(vectors.len() >= 10);
        for vector in vectors {
            let canonical =
                serde_json_canonicalizer::to_string(&vector["input"]).expect("canonical");
            assert_eq!(
                canonical,
                vector["canonical"].as_str().expect("string"),
                "{vector}"
            );
            let hex: String = fingerprint(&vector["input"])
                .expect("fingerprint")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, vector["sha256"].as_str().expect("string"));
        }
    }
}
