//! `idempotency.admin.v1.AdminService`: the same path as the data plane — the `authenticate`
//! layer establishes the caller before its message is decoded, then the caller's limits, this
//! API's own admission bound, decoding into domain values, authorisation by the policy's admin
//! grants, and only then the store — with one span and the same metrics per call.
//!
//! The web console calls the same code in-process: each RPC is also a public method taking the
//! caller, so the console gets no other way to the store.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::serve::{audit, Call};
use super::{authenticate, encode, page_token, status};
use crate::auth::{AdminAccess, AuthState, Caller, Rpc, Throttled};
use crate::domain::admin::{
    Actor, AuditAction, AuditEntry, BulkPurge, ListAuditQuery, ListRecordsQuery, Reason,
    RecordChange, RecordFilter, DEFAULT_PAGE_SIZE, DEFAULT_STATS_WINDOW, MAX_PAGE_SIZE,
    MAX_PURGE_LIMIT, MAX_STATS_WINDOW,
};
use crate::domain::{FieldViolation, Holder, Key, Namespace, Record, RecordState};
use crate::proto::idempotency::admin::v1 as admin;
use crate::proto::idempotency::admin::v1::admin_service_server::{
    AdminService, AdminServiceServer,
};
use crate::proto::idempotency::v1 as pb;
use crate::store::{AdminStore, StoreError};
use crate::telemetry::metrics;

/// Admin calls served at once; more are shed with RESOURCE_EXHAUSTED. Listings and bulk purges
/// can be heavy: a few at a time keep them from crowding out the data plane's connections.
pub const MAX_CONCURRENT_ADMIN_RPCS: usize = 8;

/// The admin API over any store.
pub struct AdminApi<S> {
    store: Arc<S>,
    /// The access policy; `None` when auth is off (every caller may do everything).
    auth: Option<Arc<AuthState>>,
    admission: Arc<Semaphore>,
    metrics: Arc<metrics::RpcMetrics>,
}

// By hand: a derive would ask `S: Clone`, and the store is shared through its `Arc`. The console
// holds a clone, so its calls share the admission bound and metrics of the gRPC service.
impl<S> Clone for AdminApi<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            auth: self.auth.clone(),
            admission: self.admission.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Who is calling, as the commands need to know it: for the audit log, for result bodies, and
/// for ListNamespaces' filter.
pub struct View {
    caller: Option<Arc<Caller>>,
}

impl View {
    fn actor(&self) -> Actor {
        Actor(
            self.caller
                .as_ref()
                .map_or_else(|| "-".to_string(), |caller| caller.name.clone()),
        )
    }

    fn may(&self, access: AdminAccess, namespace: &Namespace) -> bool {
        self.caller
            .as_ref()
            .is_none_or(|caller| caller.has_admin(access, namespace))
    }

    /// A record as this caller may see it: without its result body unless admin_read_results.
    fn record(&self, record: Record) -> pb::Record {
        let shows_body = self.may(AdminAccess::ReadResults, &record.namespace);
        let mut record = encode::record(record);
        if !shows_body {
            if let Some(result) = record.result.as_mut() {
                result.body.clear();
            }
        }
        record
    }
}

/// One RPC of the admin service: how it decodes, what access it needs where, what it runs.
pub trait AdminCommand: Sized + Send {
    const RPC: Rpc;
    const ACCESS: AdminAccess;
    type Request: Send;
    type Response;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>>;

    /// The namespace the command reads or changes; `None` for ListNamespaces, which lists only
    /// what the caller may read.
    fn namespace(&self) -> Option<&Namespace>;

    fn run<S: AdminStore>(
        self,
        store: &S,
        view: &View,
    ) -> impl Future<Output = Result<Self::Response, StoreError>> + Send;
}

impl<S: AdminStore> AdminApi<S> {
    pub fn new(store: Arc<S>, auth: Option<Arc<AuthState>>) -> Self {
        Self {
            store,
            auth,
            admission: Arc::new(Semaphore::new(MAX_CONCURRENT_ADMIN_RPCS)),
            metrics: Arc::new(metrics::RpcMetrics::new(&Rpc::ADMIN.map(Rpc::name))),
        }
    }

    /// The service as the server mounts it, behind the same authentication as the data plane.
    pub fn into_service(
        self,
        max_message_bytes: usize,
    ) -> authenticate::Authenticate<AdminServiceServer<Self>> {
        let auth = self.auth.clone();
        let metrics = self.metrics.clone();
        let server = AdminServiceServer::new(self).max_decoding_message_size(max_message_bytes);
        authenticate::Authenticate::new(server, auth, metrics)
    }

    /// Runs one admin RPC for `caller` (as authenticated by the policy; `None` with auth off):
    /// the path every admin call takes, over gRPC or from the console.
    pub async fn call<C: AdminCommand>(
        &self,
        caller: Option<Arc<Caller>>,
        request: C::Request,
    ) -> Result<C::Response, Status> {
        let headers = tonic::codegen::http::HeaderMap::new();
        self.account::<C>(&headers, caller, request).await
    }

    async fn account<C: AdminCommand>(
        &self,
        headers: &tonic::codegen::http::HeaderMap,
        caller: Option<Arc<Caller>>,
        request: C::Request,
    ) -> Result<C::Response, Status> {
        let call = Call::begin(C::RPC, headers, &self.metrics);
        let _in_flight = self.metrics.in_flight();
        let span = call.span().clone();
        let result = self
            .admit_and_run::<C>(&call, caller, request)
            .instrument(span)
            .await;
        call.finish(&result);
        result
    }

    async fn admit_and_run<C: AdminCommand>(
        &self,
        call: &Call<'_>,
        caller: Option<Arc<Caller>>,
        request: C::Request,
    ) -> Result<C::Response, Status> {
        let _caller_permit = match (&self.auth, &caller) {
            (None, _) => None,
            (Some(_), None) => return Err(status::unauthenticated()),
            (Some(auth), Some(caller)) => {
                call.span().record("caller", caller.name.as_str());
                match auth.limiter.admit(&caller.name, caller.limits) {
                    Ok(permit) => Some(permit),
                    Err(throttled) => {
                        let why = match throttled {
                            Throttled::Rate => "rate limit",
                            Throttled::Concurrency => "concurrency limit",
                        };
                        audit(
                            &caller.name,
                            None,
                            C::RPC,
                            status::reason::CALLER_LIMITED,
                            why,
                        );
                        metrics::auth_denied("caller_limited");
                        return Err(status::caller_limited(&caller.name, why));
                    }
                }
            }
        };
        let _permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| status::overloaded())?;
        let command = C::decode(request).map_err(status::invalid_argument)?;
        let view = View { caller };
        if let Some(caller) = &view.caller {
            let allowed = match command.namespace() {
                Some(namespace) => {
                    call.span().record("namespace", namespace.as_str());
                    caller.has_admin(C::ACCESS, namespace)
                }
                // ListNamespaces: needs admin_read somewhere.
                None => caller.has_any_admin(C::ACCESS),
            };
            if !allowed {
                audit(
                    &caller.name,
                    command.namespace(),
                    C::RPC,
                    status::reason::PERMISSION_DENIED,
                    "not granted",
                );
                metrics::auth_denied("permission_denied");
                return Err(match command.namespace() {
                    Some(namespace) => status::permission_denied(&caller.name, C::RPC, namespace),
                    None => status::admin_denied(&caller.name, C::RPC),
                });
            }
        }
        command
            .run(self.store.as_ref(), &view)
            .await
            .map_err(status::from_store)
    }
}

fn caller_of<T>(request: &mut Request<T>) -> Option<Arc<Caller>> {
    request
        .extensions_mut()
        .remove::<authenticate::Authenticated>()
        .map(|authenticated| authenticated.0)
}

macro_rules! rpcs {
    ($($method:ident: $command:ty;)+) => {
        #[tonic::async_trait]
        impl<S: AdminStore> AdminService for AdminApi<S> {
            $(
                async fn $method(
                    &self,
                    mut request: Request<<$command as AdminCommand>::Request>,
                ) -> Result<Response<<$command as AdminCommand>::Response>, Status> {
                    let caller = caller_of(&mut request);
                    let headers = request.metadata().clone().into_headers();
                    self.account::<$command>(&headers, caller, request.into_inner())
                        .await
                        .map(Response::new)
                }
            )+
        }
    };
}

rpcs! {
    list_records: ListRecords;
    list_namespaces: ListNamespaces;
    get_namespace_stats: GetNamespaceStats;
    purge_record: PurgeRecord;
    force_release: ForceRelease;
    purge_records: PurgeRecords;
    list_audit_entries: ListAuditEntries;
}

// ---- Decoding: wire → validated domain values, every broken rule collected. ----

#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn check<T>(&mut self, field: &str, parsed: Result<T, String>) -> Option<T> {
        parsed
            .map_err(|description| self.0.push(FieldViolation::new(field, description)))
            .ok()
    }

    fn finish<T>(self, value: Option<T>) -> Result<T, Vec<FieldViolation>> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ if !self.0.is_empty() => Err(self.0),
            _ => Err(vec![FieldViolation::new("request", "invalid request")]),
        }
    }
}

fn page_size(value: i32) -> Result<u32, String> {
    match u32::try_from(value) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) if size <= MAX_PAGE_SIZE => Ok(size),
        _ => Err(format!(
            "must be 0 (for {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}, got {value}"
        )),
    }
}

fn timestamp(value: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, String> {
    let Some(value) = value else { return Ok(None) };
    if !(0..=999_999_999).contains(&value.nanos) {
        return Err(format!("nanos must be 0-999999999, got {}", value.nanos));
    }
    SystemTime::try_from(value)
        .map(Some)
        .map_err(|_| "must be a valid timestamp (nanos 0-999999999, after year 0)".to_string())
}

fn states(values: &[i32]) -> Result<Vec<RecordState>, String> {
    values
        .iter()
        .map(|value| match pb::RecordState::try_from(*value) {
            Ok(pb::RecordState::InProgress) => Ok(RecordState::InProgress),
            Ok(pb::RecordState::Completed) => Ok(RecordState::Completed),
            _ => Err(format!(
                "must list RECORD_STATE_IN_PROGRESS (1) or RECORD_STATE_COMPLETED (2), got {value}"
            )),
        })
        .collect()
}

fn key_prefix(value: String) -> Result<String, String> {
    if value.is_empty() {
        return Ok(value);
    }
    // A prefix obeys a key's rules, except that it may be empty.
    Key::parse(value).map(Key::into_string)
}

fn holder(value: String) -> Result<Option<String>, String> {
    Holder::parse(value).map(|holder| {
        let holder = holder.into_string();
        (!holder.is_empty()).then_some(holder)
    })
}

/// The fields every record filter has, with their wire names.
struct FilterFields {
    namespace: String,
    states: Vec<i32>,
    key_prefix: String,
    holder: String,
    stuck_only: bool,
    created_after: Option<prost_types::Timestamp>,
    created_before: Option<prost_types::Timestamp>,
}

fn filter(v: &mut Violations, fields: FilterFields) -> Option<RecordFilter> {
    let namespace = v.check("namespace", Namespace::parse(fields.namespace));
    let states = v.check("states", states(&fields.states));
    let key_prefix = v.check("key_prefix", key_prefix(fields.key_prefix));
    let holder = v.check("holder", holder(fields.holder));
    let created_after = v.check("created_after", timestamp(fields.created_after));
    let created_before = v.check("created_before", timestamp(fields.created_before));
    Some(RecordFilter {
        namespace: namespace?,
        states: states?,
        key_prefix: key_prefix?,
        holder: holder?,
        stuck_only: fields.stuck_only,
        created_after: created_after?,
        created_before: created_before?,
    })
}

fn window(value: Option<prost_types::Duration>) -> Result<Duration, String> {
    let Some(value) = value else {
        return Ok(DEFAULT_STATS_WINDOW);
    };
    if value.seconds < 0 || value.nanos < 0 || value.nanos > 999_999_999 {
        return Err("must be a non-negative duration".into());
    }
    let window = Duration::new(
        u64::try_from(value.seconds).unwrap_or_default(),
        u32::try_from(value.nanos).unwrap_or_default(),
    );
    if window.is_zero() {
        return Ok(DEFAULT_STATS_WINDOW);
    }
    if window > MAX_STATS_WINDOW {
        return Err(format!("must be at most 24h, got {}s", value.seconds));
    }
    Ok(window)
}

fn limit(value: i32) -> Result<u32, String> {
    match u32::try_from(value) {
        Ok(limit) if (1..=MAX_PURGE_LIMIT).contains(&limit) => Ok(limit),
        _ => Err(format!("must be 1-{MAX_PURGE_LIMIT}, got {value}")),
    }
}

fn record_change(
    namespace: String,
    key: String,
    reason: String,
    expected_fencing_token: u64,
) -> Result<RecordChange, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(namespace));
    let key = v.check("key", Key::parse(key));
    let reason = v.check("reason", Reason::parse(reason));
    let change = (|| {
        Some(RecordChange {
            namespace: namespace?,
            key: key?,
            reason: reason?,
            expected_fencing_token: (expected_fencing_token != 0).then_some(expected_fencing_token),
            actor: Actor(String::new()),
        })
    })();
    v.finish(change)
}

/// The audit log's line of a change, on the `idemd::audit` target. Never result bodies or
/// tokens.
fn log_change(
    action: AuditAction,
    actor: &Actor,
    namespace: &Namespace,
    what: &str,
    reason: &Reason,
    count: u64,
) {
    tracing::info!(
        target: "idemd::audit",
        caller = actor.0.as_str(),
        action = action.name(),
        namespace = namespace.as_str(),
        target_records = what,
        reason = reason.as_str(),
        count,
        "admin change"
    );
}

// ---- The commands. ----

pub struct ListRecords(ListRecordsQuery);

impl AdminCommand for ListRecords {
    const RPC: Rpc = Rpc::ListRecords;
    const ACCESS: AdminAccess = AdminAccess::Read;
    type Request = admin::ListRecordsRequest;
    type Response = admin::ListRecordsResponse;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        let mut v = Violations::default();
        let filter = filter(
            &mut v,
            FilterFields {
                namespace: request.namespace,
                states: request.states,
                key_prefix: request.key_prefix,
                holder: request.holder,
                stuck_only: request.stuck_only,
                created_after: request.created_after,
                created_before: request.created_before,
            },
        );
        let page_size = v.check("page_size", page_size(request.page_size));
        // A token is checked against the listing's filters, so only when they are valid.
        let after = filter.as_ref().and_then(|filter| {
            v.check(
                "page_token",
                page_token::records_position(&request.page_token, filter),
            )
        });
        let query = (|| {
            Some(ListRecordsQuery {
                filter: filter?,
                after: after?,
                page_size: page_size?,
            })
        })();
        v.finish(query).map(ListRecords)
    }

    fn namespace(&self) -> Option<&Namespace> {
        Some(&self.0.filter.namespace)
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        view: &View,
    ) -> Result<Self::Response, StoreError> {
        let filter = self.0.filter.clone();
        let page = store.list_records(self.0).await?;
        Ok(admin::ListRecordsResponse {
            next_page_token: page
                .next
                .map(|next| page_token::records_token(&filter, &next))
                .unwrap_or_default(),
            records: page.records.into_iter().map(|r| view.record(r)).collect(),
        })
    }
}

pub struct ListNamespaces;

impl AdminCommand for ListNamespaces {
    const RPC: Rpc = Rpc::ListNamespaces;
    const ACCESS: AdminAccess = AdminAccess::Read;
    type Request = admin::ListNamespacesRequest;
    type Response = admin::ListNamespacesResponse;

    fn decode(_request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        Ok(ListNamespaces)
    }

    fn namespace(&self) -> Option<&Namespace> {
        None
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        view: &View,
    ) -> Result<Self::Response, StoreError> {
        let namespaces = store.list_namespaces().await?;
        Ok(admin::ListNamespacesResponse {
            namespaces: namespaces
                .into_iter()
                .filter(|summary| view.may(AdminAccess::Read, &summary.namespace))
                .map(|summary| admin::NamespaceSummary {
                    namespace: summary.namespace.into_string(),
                    in_progress: summary.in_progress,
                    completed: summary.completed,
                    stuck: summary.stuck,
                    oldest_in_progress: summary
                        .oldest_in_progress
                        .map(prost_types::Timestamp::from),
                })
                .collect(),
        })
    }
}

pub struct GetNamespaceStats {
    namespace: Namespace,
    window: Duration,
}

impl AdminCommand for GetNamespaceStats {
    const RPC: Rpc = Rpc::GetNamespaceStats;
    const ACCESS: AdminAccess = AdminAccess::Read;
    type Request = admin::GetNamespaceStatsRequest;
    type Response = admin::GetNamespaceStatsResponse;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        let mut v = Violations::default();
        let namespace = v.check("namespace", Namespace::parse(request.namespace));
        let window = v.check("window", window(request.window));
        let stats = (|| {
            Some(GetNamespaceStats {
                namespace: namespace?,
                window: window?,
            })
        })();
        v.finish(stats)
    }

    fn namespace(&self) -> Option<&Namespace> {
        Some(&self.namespace)
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        _view: &View,
    ) -> Result<Self::Response, StoreError> {
        let minutes = store.namespace_stats(self.namespace, self.window).await?;
        Ok(admin::GetNamespaceStatsResponse {
            minutes: minutes
                .into_iter()
                .map(|minute| admin::MinuteCounts {
                    minute: Some(prost_types::Timestamp::from(minute.minute)),
                    created: minute.created,
                    completed: minute.completed,
                    taken_over: minute.taken_over,
                })
                .collect(),
        })
    }
}

pub struct PurgeRecord(RecordChange);

impl AdminCommand for PurgeRecord {
    const RPC: Rpc = Rpc::PurgeRecord;
    const ACCESS: AdminAccess = AdminAccess::Write;
    type Request = admin::PurgeRecordRequest;
    type Response = admin::PurgeRecordResponse;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        record_change(
            request.namespace,
            request.key,
            request.reason,
            request.expected_fencing_token,
        )
        .map(PurgeRecord)
    }

    fn namespace(&self) -> Option<&Namespace> {
        Some(&self.0.namespace)
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        view: &View,
    ) -> Result<Self::Response, StoreError> {
        let mut change = self.0;
        change.actor = view.actor();
        let (actor, namespace, key, reason) = (
            change.actor.clone(),
            change.namespace.clone(),
            change.key.clone(),
            change.reason.clone(),
        );
        let record = store.purge_record(change).await?;
        log_change(
            AuditAction::PurgeRecord,
            &actor,
            &namespace,
            key.as_str(),
            &reason,
            1,
        );
        Ok(admin::PurgeRecordResponse {
            record: Some(view.record(record)),
        })
    }
}

pub struct ForceRelease(RecordChange);

impl AdminCommand for ForceRelease {
    const RPC: Rpc = Rpc::ForceRelease;
    const ACCESS: AdminAccess = AdminAccess::Write;
    type Request = admin::ForceReleaseRequest;
    type Response = admin::ForceReleaseResponse;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        record_change(
            request.namespace,
            request.key,
            request.reason,
            request.expected_fencing_token,
        )
        .map(ForceRelease)
    }

    fn namespace(&self) -> Option<&Namespace> {
        Some(&self.0.namespace)
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        view: &View,
    ) -> Result<Self::Response, StoreError> {
        let mut change = self.0;
        change.actor = view.actor();
        let (actor, namespace, key, reason) = (
            change.actor.clone(),
            change.namespace.clone(),
            change.key.clone(),
            change.reason.clone(),
        );
        let record = store.force_release(change).await?;
        log_change(
            AuditAction::ForceRelease,
            &actor,
            &namespace,
            key.as_str(),
            &reason,
            1,
        );
        Ok(admin::ForceReleaseResponse {
            record: Some(view.record(record)),
        })
    }
}

pub struct PurgeRecords(BulkPurge);

impl AdminCommand for PurgeRecords {
    const RPC: Rpc = Rpc::PurgeRecords;
    const ACCESS: AdminAccess = AdminAccess::Write;
    type Request = admin::PurgeRecordsRequest;
    type Response = admin::PurgeRecordsResponse;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        let mut v = Violations::default();
        let filter = filter(
            &mut v,
            FilterFields {
                namespace: request.namespace,
                states: request.states,
                key_prefix: request.key_prefix,
                holder: request.holder,
                stuck_only: request.stuck_only,
                created_after: request.created_after,
                created_before: request.created_before,
            },
        );
        let reason = v.check("reason", Reason::parse(request.reason));
        let limit = v.check("limit", limit(request.limit));
        let purge = (|| {
            Some(BulkPurge {
                filter: filter?,
                reason: reason?,
                dry_run: request.dry_run,
                limit: limit?,
                actor: Actor(String::new()),
            })
        })();
        v.finish(purge).map(PurgeRecords)
    }

    fn namespace(&self) -> Option<&Namespace> {
        Some(&self.0.filter.namespace)
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        view: &View,
    ) -> Result<Self::Response, StoreError> {
        let mut purge = self.0;
        purge.actor = view.actor();
        let (actor, namespace, filter, reason, dry_run) = (
            purge.actor.clone(),
            purge.filter.namespace.clone(),
            purge.filter.describe(),
            purge.reason.clone(),
            purge.dry_run,
        );
        let count = store.purge_records(purge).await?;
        if !dry_run {
            log_change(
                AuditAction::PurgeRecords,
                &actor,
                &namespace,
                &filter,
                &reason,
                count,
            );
        }
        Ok(admin::PurgeRecordsResponse { count })
    }
}

pub struct ListAuditEntries(ListAuditQuery);

impl AdminCommand for ListAuditEntries {
    const RPC: Rpc = Rpc::ListAuditEntries;
    const ACCESS: AdminAccess = AdminAccess::Read;
    type Request = admin::ListAuditEntriesRequest;
    type Response = admin::ListAuditEntriesResponse;

    fn decode(request: Self::Request) -> Result<Self, Vec<FieldViolation>> {
        let mut v = Violations::default();
        let namespace = v.check("namespace", Namespace::parse(request.namespace));
        let page_size = v.check("page_size", page_size(request.page_size));
        let before_id = namespace.as_ref().and_then(|namespace| {
            v.check(
                "page_token",
                page_token::audit_position(&request.page_token, namespace),
            )
        });
        let query = (|| {
            Some(ListAuditQuery {
                namespace: namespace?,
                before_id: before_id?,
                page_size: page_size?,
            })
        })();
        v.finish(query).map(ListAuditEntries)
    }

    fn namespace(&self) -> Option<&Namespace> {
        Some(&self.0.namespace)
    }

    async fn run<S: AdminStore>(
        self,
        store: &S,
        _view: &View,
    ) -> Result<Self::Response, StoreError> {
        let namespace = self.0.namespace.clone();
        let page = store.list_audit(self.0).await?;
        Ok(admin::ListAuditEntriesResponse {
            entries: page.entries.into_iter().map(audit_entry).collect(),
            next_page_token: page
                .next_before_id
                .map(|id| page_token::audit_token(&namespace, id))
                .unwrap_or_default(),
        })
    }
}

fn wire_state(state: RecordState) -> pb::RecordState {
    match state {
        RecordState::InProgress => pb::RecordState::InProgress,
        RecordState::Completed => pb::RecordState::Completed,
    }
}

fn audit_entry(entry: AuditEntry) -> admin::AuditEntry {
    admin::AuditEntry {
        id: entry.id,
        time: Some(prost_types::Timestamp::from(entry.time)),
        caller: entry.caller,
        action: match entry.action {
            AuditAction::PurgeRecord => admin::AuditAction::PurgeRecord,
            AuditAction::ForceRelease => admin::AuditAction::ForceRelease,
            AuditAction::PurgeRecords => admin::AuditAction::PurgeRecords,
        } as i32,
        namespace: entry.namespace.into_string(),
        key: entry.key.map(Key::into_string).unwrap_or_default(),
        filter: entry.filter.unwrap_or_default(),
        reason: entry.reason,
        count: entry.count,
        state_before: entry
            .state_before
            .map_or(pb::RecordState::Unspecified, wire_state) as i32,
        fencing_token_before: entry.fencing_token_before.unwrap_or_default(),
    }
}
