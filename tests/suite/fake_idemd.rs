//! A scripted fake idemd for the client behaviour suite (clients/BEHAVIOUR.md): a real tonic
//! server on 127.0.0.1, port 0, that answers each RPC with the next answer its script lists for
//! that RPC (a response, an error status with an ErrorInfo reason, a connection that breaks, or
//! no answer at all), and records the RPCs it saw, in order.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_server::{
    IdempotencyService, IdempotencyServiceServer,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One scripted answer, as written in clients/behaviour/cases.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedAnswer {
    pub answer: AnswerKind,
    #[serde(default)]
    pub fencing_token: Option<u64>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// The answer stands for this many calls in a row.
    #[serde(default)]
    pub times: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    Acquired,
    InProgress,
    Completed,
    Ok,
    Free,
    TimedOut,
    Error,
    Drop,
    Hang,
}

/// The RPCs a script may name.
pub const RPCS: [&str; 6] = ["Acquire", "Complete", "Release", "Renew", "Get", "Wait"];

/// A gRPC code by its canonical name (as in cases.json).
pub fn code_named(name: &str) -> Option<Code> {
    let code = match name {
        "OK" => Code::Ok,
        "CANCELLED" => Code::Cancelled,
        "UNKNOWN" => Code::Unknown,
        "INVALID_ARGUMENT" => Code::InvalidArgument,
        "DEADLINE_EXCEEDED" => Code::DeadlineExceeded,
        "NOT_FOUND" => Code::NotFound,
        "ALREADY_EXISTS" => Code::AlreadyExists,
        "PERMISSION_DENIED" => Code::PermissionDenied,
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "FAILED_PRECONDITION" => Code::FailedPrecondition,
        "ABORTED" => Code::Aborted,
        "OUT_OF_RANGE" => Code::OutOfRange,
        "UNIMPLEMENTED" => Code::Unimplemented,
        "INTERNAL" => Code::Internal,
        "UNAVAILABLE" => Code::Unavailable,
        "DATA_LOSS" => Code::DataLoss,
        "UNAUTHENTICATED" => Code::Unauthenticated,
        _ => return None,
    };
    Some(code)
}

#[derive(Default)]
struct FakeState {
    scripts: BTreeMap<String, VecDeque<ScriptedAnswer>>,
    calls: Vec<String>,
    /// The fingerprint of the last Acquire: the records the fake returns carry it, as idemd's do.
    fingerprint: Vec<u8>,
    /// A clone of every accepted connection's socket, to break them on a `drop` answer.
    connections: Vec<std::net::TcpStream>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
}

/// A running fake; stops when dropped.
pub struct FakeIdemd {
    pub address: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    server: JoinHandle<()>,
}

impl FakeIdemd {
    /// Starts a fake that answers `script` (RPC name → answers in order). Fails on an answer the
    /// fake cannot give (an unknown RPC or gRPC code), so a typo in a case is not a silent pass.
    pub async fn start(script: &BTreeMap<String, Vec<ScriptedAnswer>>) -> Result<Self, String> {
        let mut scripts = BTreeMap::new();
        for (rpc, answers) in script {
            if !RPCS.contains(&rpc.as_str()) {
                return Err(format!("unknown RPC {rpc:?} in the script"));
            }
            let mut queue = VecDeque::new();
            for answer in answers {
                if answer.answer == AnswerKind::Error
                    && answer.code.as_deref().and_then(code_named).is_none()
                {
                    return Err(format!(
                        "an error answer needs a gRPC code name: {answer:?}"
                    ));
                }
                for _ in 0..answer.times.unwrap_or(1) {
                    queue.push_back(answer.clone());
                }
            }
            scripts.insert(rpc.clone(), queue);
        }
        let state = Arc::new(Mutex::new(FakeState {
            scripts,
            ..FakeState::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|error| format!("cannot bind the fake: {error}"))?;
        let address = listener
            .local_addr()
            .map_err(|error| format!("no address: {error}"))?;
        let registry = state.clone();
        // Keep a clone of each connection's socket so that a `drop` answer can shut it down
        // under the call: the client sees its connection break, as when a replica dies.
        let incoming = TcpListenerStream::new(listener).map(move |accepted| {
            let stream = accepted?;
            let std_stream = stream.into_std()?;
            let clone = std_stream.try_clone()?;
            registry
                .lock()
                .expect("fake state lock poisoned")
                .connections
                .push(clone);
            tokio::net::TcpStream::from_std(std_stream)
        });
        let service = IdempotencyServiceServer::new(Fake {
            state: state.clone(),
        });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            address,
            state,
            server,
        })
    }

    /// The RPCs the fake saw, in order (Renew left out: its timing is the client's background).
    pub fn calls(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("fake state lock poisoned")
            .calls
            .clone()
    }
}

impl Drop for FakeIdemd {
    fn drop(&mut self) {
        self.server.abort();
        if let Ok(mut state) = self.state.lock() {
            for connection in state.connections.drain(..) {
                let _ = connection.shutdown(Shutdown::Both);
            }
        }
    }
}

fn timestamp_in(offset: Duration) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(SystemTime::now() + offset))
}

fn millis(value: u64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_millis(value)).ok()
}

impl Fake {
    /// The next answer for `rpc`, recording the call. Past the end of the script: an error the
    /// client maps to no expected kind, so the case fails and shows the extra call.
    fn next(&self, rpc: &str, fingerprint: Option<&[u8]>) -> (ScriptedAnswer, Vec<u8>) {
        let mut state = self.state.lock().expect("fake state lock poisoned");
        if rpc != "Renew" {
            state.calls.push(rpc.to_string());
        }
        if let Some(fingerprint) = fingerprint {
            state.fingerprint = fingerprint.to_vec();
        }
        let scripted = state
            .scripts
            .get_mut(rpc)
            .and_then(|queue| queue.pop_front());
        let answer = match scripted {
            Some(answer) => answer,
            None if rpc == "Renew" => ScriptedAnswer::plain(AnswerKind::Ok),
            None => ScriptedAnswer {
                code: Some("FAILED_PRECONDITION".into()),
                reason: Some("SCRIPT_EXHAUSTED".into()),
                message: Some(format!("the case scripts no further {rpc}")),
                ..ScriptedAnswer::plain(AnswerKind::Error)
            },
        };
        (answer, state.fingerprint.clone())
    }

    /// Breaks every open connection (the one carrying this call among them).
    fn drop_connections(&self) {
        let mut state = self.state.lock().expect("fake state lock poisoned");
        for connection in state.connections.drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    /// What `answer` means for any RPC: an error, a broken connection, or no answer. `None`: a
    /// response, which the RPC builds itself.
    async fn failure(&self, answer: &ScriptedAnswer) -> Option<Status> {
        match answer.answer {
            AnswerKind::Error => {
                let code = answer
                    .code
                    .as_deref()
                    .and_then(code_named)
                    .unwrap_or(Code::Internal);
                let message = answer.message.clone().unwrap_or_default();
                Some(match &answer.reason {
                    Some(reason) => Status::with_error_details(
                        code,
                        message,
                        ErrorDetails::with_error_info(reason, "idemd", []),
                    ),
                    None => Status::new(code, message),
                })
            }
            AnswerKind::Drop => {
                self.drop_connections();
                // The connection is gone: this call never answers.
                std::future::pending::<()>().await;
                None
            }
            AnswerKind::Hang => {
                std::future::pending::<()>().await;
                None
            }
            _ => None,
        }
    }
}

impl ScriptedAnswer {
    fn plain(answer: AnswerKind) -> Self {
        Self {
            answer,
            fencing_token: None,
            retry_after_ms: None,
            body: None,
            code: None,
            reason: None,
            message: None,
            times: None,
        }
    }
}

fn record(
    namespace: &str,
    key: &str,
    fingerprint: Vec<u8>,
    state: pb::RecordState,
    result: Option<pb::Result>,
    fencing_token: u64,
) -> pb::Record {
    pb::Record {
        namespace: namespace.into(),
        key: key.into(),
        state: state as i32,
        fingerprint,
        result,
        fencing_token,
        attempts: 1,
        holder: "fake".into(),
        created_at: timestamp_in(Duration::ZERO),
        lease_expires_at: timestamp_in(Duration::from_secs(30)),
        completed_at: None,
        expires_at: timestamp_in(Duration::from_secs(3600)),
    }
}

fn stored(body: &Option<String>) -> pb::Result {
    pb::Result {
        body: body.clone().unwrap_or_default().into_bytes(),
        code: 0,
        metadata: Default::default(),
    }
}

fn lease(fencing_token: u64) -> pb::Lease {
    pb::Lease {
        token: format!("fake-lease-{fencing_token}"),
        fencing_token,
        expires_at: timestamp_in(Duration::from_secs(30)),
    }
}

fn unfit(rpc: &str, answer: &ScriptedAnswer) -> Status {
    Status::internal(format!(
        "the fake cannot answer {rpc} with {:?}",
        answer.answer
    ))
}

#[tonic::async_trait]
impl IdempotencyService for Fake {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let request = request.into_inner();
        let (answer, fingerprint) = self.next("Acquire", Some(&request.fingerprint));
        if let Some(status) = self.failure(&answer).await {
            return Err(status);
        }
        let fencing_token = answer.fencing_token.unwrap_or(1);
        let (ns, key) = (&request.namespace, &request.key);
        let response = match answer.answer {
            AnswerKind::Acquired => pb::AcquireResponse {
                outcome: pb::Outcome::Acquired as i32,
                lease: Some(lease(fencing_token)),
                record: Some(record(
                    ns,
                    key,
                    fingerprint,
                    pb::RecordState::InProgress,
                    None,
                    fencing_token,
                )),
                retry_after: None,
            },
            AnswerKind::InProgress => pb::AcquireResponse {
                outcome: pb::Outcome::InProgress as i32,
                lease: None,
                record: Some(record(
                    ns,
                    key,
                    fingerprint,
                    pb::RecordState::InProgress,
                    None,
                    fencing_token,
                )),
                retry_after: millis(answer.retry_after_ms.unwrap_or(10)),
            },
            AnswerKind::Completed => pb::AcquireResponse {
                outcome: pb::Outcome::Completed as i32,
                lease: None,
                record: Some(record(
                    ns,
                    key,
                    fingerprint,
                    pb::RecordState::Completed,
                    Some(stored(&answer.body)),
                    fencing_token,
                )),
                retry_after: None,
            },
            _ => return Err(unfit("Acquire", &answer)),
        };
        Ok(Response::new(response))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let request = request.into_inner();
        let (answer, fingerprint) = self.next("Complete", None);
        if let Some(status) = self.failure(&answer).await {
            return Err(status);
        }
        let result = match answer.answer {
            AnswerKind::Ok => request.result.unwrap_or_default(),
            AnswerKind::Completed => stored(&answer.body),
            _ => return Err(unfit("Complete", &answer)),
        };
        Ok(Response::new(pb::CompleteResponse {
            record: Some(record(
                &request.namespace,
                &request.key,
                fingerprint,
                pb::RecordState::Completed,
                Some(result),
                answer.fencing_token.unwrap_or(1),
            )),
        }))
    }

    async fn release(
        &self,
        _request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (answer, _) = self.next("Release", None);
        if let Some(status) = self.failure(&answer).await {
            return Err(status);
        }
        match answer.answer {
            AnswerKind::Ok => Ok(Response::new(pb::ReleaseResponse {})),
            _ => Err(unfit("Release", &answer)),
        }
    }

    async fn renew(
        &self,
        _request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let (answer, _) = self.next("Renew", None);
        if let Some(status) = self.failure(&answer).await {
            return Err(status);
        }
        match answer.answer {
            AnswerKind::Ok => Ok(Response::new(pb::RenewResponse {
                lease: Some(lease(answer.fencing_token.unwrap_or(1))),
            })),
            _ => Err(unfit("Renew", &answer)),
        }
    }

    async fn get(
        &self,
        _request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let (answer, _) = self.next("Get", None);
        if let Some(status) = self.failure(&answer).await {
            return Err(status);
        }
        Err(unfit("Get", &answer))
    }

    async fn wait(
        &self,
        request: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::WaitResponse>, Status> {
        let request = request.into_inner();
        let (answer, fingerprint) = self.next("Wait", None);
        if let Some(status) = self.failure(&answer).await {
            return Err(status);
        }
        let response = match answer.answer {
            AnswerKind::Completed => pb::WaitResponse {
                outcome: pb::WaitOutcome::Completed as i32,
                record: Some(record(
                    &request.namespace,
                    &request.key,
                    fingerprint,
                    pb::RecordState::Completed,
                    Some(stored(&answer.body)),
                    answer.fencing_token.unwrap_or(1),
                )),
            },
            AnswerKind::Free => pb::WaitResponse {
                outcome: pb::WaitOutcome::Free as i32,
                record: None,
            },
            AnswerKind::TimedOut => pb::WaitResponse {
                outcome: pb::WaitOutcome::TimedOut as i32,
                record: None,
            },
            _ => return Err(unfit("Wait", &answer)),
        };
        Ok(Response::new(response))
    }
}
