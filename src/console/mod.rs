//! The web console (`--console-listen`): server-rendered pages over the admin API's own code.
//!
//! Every page calls `AdminApi::call` with the caller that its session's bearer token (or client
//! certificate) resolves to in the policy in force, so the console has the admin API's
//! authorisation, limits, metrics and audit, and no other way to the store. Pages are plain HTML
//! that work without scripts; the one script (`static/console.js`) only adds the browser's time
//! zone and keeps a confirmation from being sent twice. Pages, styles and the script are compiled
//! into the binary.
//!
//! Defences: sessions on the server (`session`), a CSRF synchronizer token in every form that
//! changes something plus a same-origin check of `Origin` / `Sec-Fetch-Site` on every POST, a
//! Content-Security-Policy without `unsafe-inline`, and maud's escaping of every value.

mod chart;
mod pages;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use maud::Markup;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;

use crate::api::admin::{
    ForceRelease, GetNamespaceStats, ListAuditEntries, ListNamespaces, ListRecords, PurgeRecord,
    PurgeRecords,
};
use crate::api::AdminApi;
use crate::auth::{AdminAccess, AuthState, Caller, Credentials};
use crate::domain::Namespace;
use crate::proto::idempotency::admin::v1 as admin;
use crate::proto::idempotency::v1 as pb;
use crate::store::AdminStore;
use crate::tls::{TlsConnection, TlsState};
use pages::{Action, Body, FilterForm, Header};
use session::{Credential, Session, Sessions};

/// The Content-Security-Policy of every response: only the console's own stylesheet and script,
/// no inline script or style, no framing, forms only to the console itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     frame-ancestors 'none'; form-action 'self'";

/// Namespaces whose chart the namespaces view draws (each is one GetNamespaceStats call).
const MAX_CHARTS: usize = 12;
/// Pages of a key-prefix listing searched for one record's exact key.
const MAX_LOOKUP_PAGES: usize = 20;

const STYLESHEET: &str = include_str!("static/console.css");
const SCRIPT: &str = include_str!("static/console.js");

struct Console<S> {
    admin: AdminApi<S>,
    auth: Option<Arc<AuthState>>,
    sessions: Sessions,
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
}

/// The console's routes over `admin` (the same `AdminApi` the gRPC server mounts).
/// `secure`: the listener has TLS, so the session cookie is `Secure`.
pub fn router<S: AdminStore>(
    admin: AdminApi<S>,
    auth: Option<Arc<AuthState>>,
    secure: bool,
) -> Router {
    let console = Arc::new(Console {
        admin,
        auth,
        sessions: Sessions::default(),
        secure,
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/namespaces") }))
        .route("/sign-in", get(sign_in_page::<S>).post(sign_in::<S>))
        .route("/sign-out", post(sign_out::<S>))
        .route("/namespaces", get(namespaces::<S>))
        .route("/records", get(records::<S>))
        .route("/record", get(record::<S>))
        .route("/confirm/force-release", get(confirm_force_release::<S>))
        .route("/confirm/purge", get(confirm_purge::<S>))
        .route("/actions/force-release", post(force_release::<S>))
        .route("/actions/purge", post(purge::<S>))
        .route("/bulk-purge", get(bulk_purge_page::<S>))
        .route("/actions/purge-records", post(purge_records::<S>))
        .route("/audit", get(audit::<S>))
        .route("/static/console.css", get(stylesheet))
        .route("/static/console.js", get(script))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(same_origin_posts))
        .layer(middleware::map_response(security_headers))
        .with_state(console)
}

/// Longest a console client may take to send a request's headers, counted from when the server
/// waits for them (so also how long an idle keep-alive connection stays open). A client that
/// opens connections and sends its headers a byte at a time is cut off rather than holding them.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most console connections open at once. Past that the console stops accepting (clients wait in
/// the listen backlog), so a flood of console connections cannot use up the file descriptors the
/// API needs.
const MAX_CONNECTIONS: u32 = 256;

/// Serves the console on `listener` (over TLS with `tls`) until `shutdown` resolves, then lets
/// the requests in progress finish and returns once every connection has closed.
pub async fn serve<S: AdminStore>(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
    admin: AdminApi<S>,
    auth: Option<Arc<AuthState>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let routes = router(admin, auth, tls.is_some());
    let mut incoming = match tls {
        None => Incoming::Plain(listener),
        Some(tls) => Incoming::Tls(crate::tls::incoming_http1(listener, tls)),
    };
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS as usize));
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let next = async {
            // A free place first: while all are taken, nobody new is accepted.
            let permit = open.clone().acquire_owned().await.ok()?;
            Some((permit, incoming.next().await?))
        };
        let (permit, (io, peer)) = tokio::select! {
            _ = &mut shutdown => break,
            next = next => match next {
                Some(accepted) => accepted,
                // The TLS accept loop ended: nothing more will come.
                None => break,
            },
        };
        let service = {
            let routes = routes.clone();
            let peer = ConnectInfo(peer);
            hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(peer.clone());
                // A Router is always ready (axum documents `poll_ready` as such): called as is.
                tower::Service::call(&mut routes.clone(), request)
            })
        };
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                // (The borrow `wait_for` returns is dropped before anything awaits.)
                _ = async { stop.wait_for(|stopping| *stopping).await.is_ok() } => {
                    // Finish the request in progress (an idle connection closes now).
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "console connection ended with an error");
            }
        });
    }
    // No more connections: the listening socket closes (over TLS, the accept loop ends).
    drop(incoming);
    let _ = stopping.send(true);
    // Every connection holds a place until it closes: having them all back means all closed.
    let _ = open.acquire_many(MAX_CONNECTIONS).await;
    Ok(())
}

/// Where console connections come from: the listener itself, or the TLS accept loop's
/// connections that completed their handshake (`tls::incoming_http1`).
enum Incoming {
    Plain(TcpListener),
    Tls(ReceiverStream<std::io::Result<TlsConnection>>),
}

/// One accepted console connection, plain or TLS.
trait ConsoleIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ConsoleIo for T {}

impl Incoming {
    /// The next connection and its client certificate's identities (none over plain TCP);
    /// `None` once no more can come.
    async fn next(&mut self) -> Option<(Box<dyn ConsoleIo>, ConsolePeer)> {
        loop {
            match self {
                Incoming::Plain(listener) => match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        return Some((Box::new(stream), ConsolePeer::default()));
                    }
                    Err(error) => {
                        // E.g. out of file descriptors: back off rather than spin.
                        tracing::warn!(%error, "console accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Incoming::Tls(connections) => match connections.next().await? {
                    Ok(connection) => {
                        let peer = ConsolePeer(connection.peer().0.clone());
                        return Some((Box::new(connection), peer));
                    }
                    Err(error) => tracing::debug!(%error, "console TLS accept failed"),
                },
            }
        }
    }
}

// ---- Errors: one place turns every refusal into a readable page. ----

/// Why a console request was not answered with its page.
enum Refusal {
    /// No live session: sign in first.
    SignIn,
    /// The input was wrong; each (field, what is wrong).
    BadInput(String, Vec<(String, String)>),
    /// The CSRF token or origin check failed.
    Forbidden(&'static str),
    NotFound(String),
    /// What the admin API answered.
    Api(tonic::Status),
    /// The server could not make a session id.
    Internal(String),
}

impl From<tonic::Status> for Refusal {
    fn from(status: tonic::Status) -> Self {
        Refusal::Api(status)
    }
}

fn bad_input(message: impl Into<String>) -> Refusal {
    Refusal::BadInput(message.into(), Vec::new())
}

fn page(status: StatusCode, title: &str, header: Option<&Header<'_>>, body: Markup) -> Response {
    let mut response = Html(pages::layout(title, header, body).into_string()).into_response();
    *response.status_mut() = status;
    response
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, title, message, violations) = match self {
            Refusal::SignIn => return Redirect::to("/sign-in").into_response(),
            Refusal::BadInput(message, violations) => {
                (StatusCode::BAD_REQUEST, "Bad request", message, violations)
            }
            Refusal::Forbidden(why) => (
                StatusCode::FORBIDDEN,
                "Refused",
                why.to_string(),
                Vec::new(),
            ),
            Refusal::NotFound(what) => (StatusCode::NOT_FOUND, "Not found", what, Vec::new()),
            Refusal::Internal(why) => {
                tracing::error!(error = why.as_str(), "console: internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error",
                    "idemd could not answer; its log says why.".to_string(),
                    Vec::new(),
                )
            }
            Refusal::Api(status) => {
                let violations: Vec<(String, String)> = status
                    .get_details_bad_request()
                    .map(|bad| {
                        bad.field_violations
                            .into_iter()
                            .map(|violation| (violation.field, violation.description))
                            .collect()
                    })
                    .unwrap_or_default();
                let (code, title) = match status.code() {
                    Code::InvalidArgument => (StatusCode::BAD_REQUEST, "Bad request"),
                    Code::NotFound => (StatusCode::NOT_FOUND, "Not found"),
                    Code::PermissionDenied => (StatusCode::FORBIDDEN, "Not permitted"),
                    Code::Unauthenticated => return Redirect::to("/sign-in").into_response(),
                    Code::FailedPrecondition => (StatusCode::CONFLICT, "Not changed"),
                    Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "Busy"),
                    Code::Unavailable | Code::DeadlineExceeded => {
                        (StatusCode::SERVICE_UNAVAILABLE, "Unavailable")
                    }
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "Internal error"),
                };
                (code, title, status.message().to_string(), violations)
            }
        };
        page(
            status,
            title,
            None,
            pages::problem(title, &message, &violations),
        )
    }
}

// ---- Headers, origin checks, static files. ----

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not `no-referrer`: under it a browser sends `Origin: null` even on the console's own
        // forms, which the origin check must refuse. Addresses (with keys in them) still never
        // leave the console's origin.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Refuses a request that changes something (any method but GET and HEAD) from another origin:
/// a browser says where a request comes from in `Sec-Fetch-Site` and `Origin`. Requests without
/// either (not from a browser) still need the session's CSRF token.
async fn same_origin_posts(request: Request<axum::body::Body>, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    if let Err(why) = check_origin(request.headers()) {
        return Refusal::Forbidden(why).into_response();
    }
    next.run(request).await
}

fn check_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" {
            return Err("a request from another site may not change anything here");
        }
    }
    if let Some(origin) = text("origin") {
        let host = text("host").unwrap_or_default();
        let same = ["http://", "https://"]
            .iter()
            .any(|scheme| origin.strip_prefix(scheme) == Some(host));
        if host.is_empty() || !same {
            return Err("a request from another origin may not change anything here");
        }
    }
    Ok(())
}

async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

async fn not_found() -> Response {
    Refusal::NotFound("No page here.".into()).into_response()
}

async fn method_not_allowed() -> Response {
    page(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        None,
        pages::problem(
            "Method not allowed",
            "This page does not take that method.",
            &[],
        ),
    )
}

// ---- Sessions. ----

fn cookie_session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == session::COOKIE)
        .map(|(_, value)| value)
}

/// Who sent a request: its headers (the session cookie) and the identities of the client
/// certificate its connection presented (none without TLS or without a certificate).
struct Requester {
    headers: HeaderMap,
    peer: Arc<Vec<String>>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Requester {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<ConsolePeer>>()
            .map(|info| info.0 .0.clone())
            .unwrap_or_default();
        Ok(Requester {
            headers: parts.headers.clone(),
            peer,
        })
    }
}

/// The client certificate's identities of a console connection, as axum's connect info.
#[derive(Clone, Default)]
struct ConsolePeer(Arc<Vec<String>>);

/// A signed-in request: its session and the caller the session's token resolves to now.
struct Signed {
    id: String,
    session: Session,
    /// `None` with auth off.
    caller: Option<Arc<Caller>>,
    auth_off: bool,
}

impl Signed {
    fn name(&self) -> &str {
        self.caller
            .as_ref()
            .map_or("anyone (auth off)", |caller| caller.name.as_str())
    }

    fn header(&self) -> Header<'_> {
        Header {
            caller: self.name(),
            csrf: &self.session.csrf,
            auth_off: self.auth_off,
        }
    }

    fn may(&self, access: AdminAccess, namespace: &str) -> bool {
        let Some(caller) = &self.caller else {
            return true;
        };
        Namespace::parse(namespace.to_string())
            .is_ok_and(|namespace| caller.has_admin(access, &namespace))
    }

    fn page(&self, title: &str, body: Markup) -> Response {
        page(StatusCode::OK, title, Some(&self.header()), body)
    }

    /// Refuses a form without this session's CSRF token.
    fn check_csrf(&self, presented: &str) -> Result<(), Refusal> {
        if self.session.csrf_matches(presented) {
            Ok(())
        } else {
            Err(Refusal::Forbidden(
                "this form is not from your session (a missing or wrong CSRF token); reload the page and try again",
            ))
        }
    }
}

impl<S: AdminStore> Console<S> {
    fn signed(&self, from: &Requester) -> Result<Signed, Refusal> {
        let id = cookie_session_id(&from.headers).ok_or(Refusal::SignIn)?;
        let session = self.sessions.get(id).ok_or(Refusal::SignIn)?;
        let credentials = match &session.credential {
            Credential::Token(token) => Credentials::Bearer(token),
            Credential::Certificate(names) => {
                // A certificate session is good only on a connection with that certificate: a
                // copied cookie is no use without the client's key.
                if from.peer.as_slice() != names.as_slice() {
                    return Err(Refusal::SignIn);
                }
                Credentials::Certificate(names)
            }
            Credential::Open => Credentials::None,
        };
        let caller = match &self.auth {
            None => None,
            Some(auth) => match auth.policy().authenticate(credentials) {
                Some(caller) => Some(caller),
                None => {
                    // The token or certificate left the policy: its sessions end with it.
                    self.sessions.end(id);
                    return Err(Refusal::SignIn);
                }
            },
        };
        Ok(Signed {
            id: id.to_string(),
            session,
            caller,
            auth_off: self.auth.is_none(),
        })
    }

    /// The record `key` of `namespace`, through ListRecords (the admin API lists; it has no
    /// single-record read): the key as a prefix, pages searched for the exact key.
    async fn find_record(
        &self,
        signed: &Signed,
        namespace: &str,
        key: &str,
    ) -> Result<pb::Record, Refusal> {
        if key.is_empty() {
            return Err(Refusal::BadInput(
                "Which record?".into(),
                vec![("key".into(), "is required".into())],
            ));
        }
        let mut page_token = String::new();
        for _ in 0..MAX_LOOKUP_PAGES {
            let page = self
                .admin
                .call::<ListRecords>(
                    signed.caller.clone(),
                    admin::ListRecordsRequest {
                        namespace: namespace.to_string(),
                        key_prefix: key.to_string(),
                        page_size: 500,
                        page_token,
                        ..Default::default()
                    },
                )
                .await?;
            if let Some(record) = page.records.into_iter().find(|record| record.key == key) {
                return Ok(record);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Err(Refusal::NotFound(format!(
            "No live record with this key in {namespace}."
        )))
    }
}

type Shared<S> = State<Arc<Console<S>>>;

#[derive(Deserialize, Default)]
#[serde(default)]
struct SignInForm {
    token: String,
    /// `certificate`: sign in as the connection's client certificate.
    with: String,
}

async fn sign_in_page<S: AdminStore>(State(console): Shared<S>, from: Requester) -> Response {
    page(
        StatusCode::OK,
        "Sign in",
        None,
        pages::sign_in(None, console.auth.is_none(), from.peer.first()),
    )
}

/// Logs a refused sign-in on the audit target, as refused RPCs are. Never the token.
fn refused_sign_in(caller: &str, reason: &str) {
    tracing::warn!(
        target: "idemd::audit",
        caller,
        reason,
        "console sign-in refused"
    );
}

/// The session cookie; `max_age` 0 ends it.
fn session_cookie(id: &str, max_age: u64, secure: bool) -> String {
    format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        session::COOKIE,
        if secure { "; Secure" } else { "" }
    )
}

async fn sign_in<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return bad_input("The sign-in form could not be read.").into_response();
    };
    let token = form.token.trim().to_string();
    let refused = |message: &str| {
        page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            None,
            pages::sign_in(Some(message), false, from.peer.first()),
        )
    };
    let credential = match &console.auth {
        None => Credential::Open,
        Some(auth) if form.with == "certificate" => {
            if from.peer.is_empty() {
                return refused("This connection has no client certificate.");
            }
            match auth
                .policy()
                .authenticate(Credentials::Certificate(&from.peer))
            {
                None => {
                    refused_sign_in("-", "unknown client certificate");
                    return refused("The policy does not know this certificate.");
                }
                Some(caller) if !caller.has_any_admin(AdminAccess::Read) => {
                    refused_sign_in(&caller.name, "no admin grant");
                    return refused(
                        "This certificate has no admin grant: the console needs admin_read.",
                    );
                }
                Some(_) => Credential::Certificate(from.peer.to_vec()),
            }
        }
        Some(auth) => {
            if token.is_empty() {
                return refused("Paste a bearer token.");
            }
            match auth.policy().authenticate(Credentials::Bearer(&token)) {
                None => {
                    refused_sign_in("-", "unknown bearer token");
                    return refused("The policy does not know this token.");
                }
                Some(caller) if !caller.has_any_admin(AdminAccess::Read) => {
                    refused_sign_in(&caller.name, "no admin grant");
                    return refused("This token has no admin grant: the console needs admin_read.");
                }
                Some(_) => Credential::Token(token),
            }
        }
    };
    match console.sessions.create(credential) {
        Ok(id) => {
            let mut response = Redirect::to("/namespaces").into_response();
            let cookie = session_cookie(&id, session::MAX_AGE.as_secs(), console.secure);
            match HeaderValue::from_str(&cookie) {
                Ok(cookie) => {
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                    response
                }
                Err(error) => Refusal::Internal(error.to_string()).into_response(),
            }
        }
        Err(error) => Refusal::Internal(error.to_string()).into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CsrfForm {
    csrf: String,
}

async fn sign_out<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let Form(form) = form.map_err(|_| bad_input("The form could not be read."))?;
    signed.check_csrf(&form.csrf)?;
    console.sessions.end(&signed.id);
    let mut response = Redirect::to("/sign-in").into_response();
    let cookie = HeaderValue::from_str(&session_cookie("", 0, console.secure))
        .map_err(|error| Refusal::Internal(error.to_string()))?;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

// ---- Views. ----

async fn namespaces<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let listing = console
        .admin
        .call::<ListNamespaces>(signed.caller.clone(), admin::ListNamespacesRequest {})
        .await?;
    let mut charts = Vec::new();
    for summary in listing.namespaces.iter().take(MAX_CHARTS) {
        let stats = console
            .admin
            .call::<GetNamespaceStats>(
                signed.caller.clone(),
                admin::GetNamespaceStatsRequest {
                    namespace: summary.namespace.clone(),
                    window: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                },
            )
            .await?;
        charts.push((
            summary.namespace.clone(),
            chart::minutes(&summary.namespace, &stats.minutes),
        ));
    }
    Ok(signed.page(
        "Namespaces",
        pages::namespaces(&listing.namespaces, &charts),
    ))
}

/// The records view's query: the admin API's filters, as a form sends them.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RecordsQuery {
    namespace: String,
    state: String,
    key_prefix: String,
    holder: String,
    stuck: String,
    created_after: String,
    created_before: String,
    page_size: String,
    page_token: String,
}

impl RecordsQuery {
    fn form(&self) -> FilterForm {
        FilterForm {
            namespace: self.namespace.clone(),
            state: self.state.clone(),
            key_prefix: self.key_prefix.clone(),
            holder: self.holder.clone(),
            stuck: !self.stuck.is_empty(),
            created_after: self.created_after.clone(),
            created_before: self.created_before.clone(),
        }
    }
}

/// The admin API's filter fields, from the form's text; what is wrong with them, per field.
struct Filters {
    states: Vec<i32>,
    created_after: Option<prost_types::Timestamp>,
    created_before: Option<prost_types::Timestamp>,
}

fn filters(form: &FilterForm) -> Result<Filters, Refusal> {
    let mut violations = Vec::new();
    let states = match form.state.as_str() {
        "" => Vec::new(),
        "in_progress" => vec![pb::RecordState::InProgress as i32],
        "completed" => vec![pb::RecordState::Completed as i32],
        _ => {
            violations.push((
                "state".into(),
                "must be in_progress, completed or empty".into(),
            ));
            Vec::new()
        }
    };
    let mut time = |field: &str, text: &str| {
        if text.trim().is_empty() {
            return None;
        }
        match humantime::parse_rfc3339_weak(text.trim()) {
            Ok(time) => Some(prost_types::Timestamp::from(time)),
            Err(_) => {
                violations.push((
                    field.to_string(),
                    "must be a UTC time like 2026-01-31T12:00:00Z".into(),
                ));
                None
            }
        }
    };
    let created_after = time("created_after", &form.created_after);
    let created_before = time("created_before", &form.created_before);
    if violations.is_empty() {
        Ok(Filters {
            states,
            created_after,
            created_before,
        })
    } else {
        Err(Refusal::BadInput(
            "Some filters are not valid.".into(),
            violations,
        ))
    }
}

fn query_input<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Refusal> {
    query.map(|Query(query)| query).map_err(|rejection| {
        bad_input(format!(
            "The address's query could not be read: {rejection}"
        ))
    })
}

fn form_input<T>(form: Result<Form<T>, FormRejection>) -> Result<T, Refusal> {
    form.map(|Form(form)| form)
        .map_err(|rejection| bad_input(format!("The form could not be read: {rejection}")))
}

async fn records<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    query: Result<Query<RecordsQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let query = query_input(query)?;
    let form = query.form();
    let parsed = filters(&form)?;
    // Empty: the console's 50 a page; the admin API checks the range.
    let page_size = match query.page_size.trim() {
        "" => 50,
        text => text.parse::<i32>().map_err(|_| {
            Refusal::BadInput(
                "How many records a page?".into(),
                vec![("page_size".into(), "must be a whole number".into())],
            )
        })?,
    };
    let page = console
        .admin
        .call::<ListRecords>(
            signed.caller.clone(),
            admin::ListRecordsRequest {
                namespace: form.namespace.clone(),
                states: parsed.states,
                key_prefix: form.key_prefix.clone(),
                holder: form.holder.clone(),
                stuck_only: form.stuck,
                created_after: parsed.created_after,
                created_before: parsed.created_before,
                page_size,
                page_token: query.page_token.clone(),
            },
        )
        .await?;
    Ok(signed.page(
        "Records",
        pages::records(
            &form,
            &page.records,
            &query.page_size,
            &page.next_page_token,
            SystemTime::now(),
        ),
    ))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RecordQuery {
    namespace: String,
    key: String,
}

async fn record<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    query: Result<Query<RecordQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let query = query_input(query)?;
    let record = console
        .find_record(&signed, &query.namespace, &query.key)
        .await?;
    let body = if signed.may(AdminAccess::ReadResults, &record.namespace) {
        Body::of(
            record
                .result
                .as_ref()
                .map_or(&[][..], |result| &result.body),
        )
    } else {
        Body::Hidden
    };
    let may_write = signed.may(AdminAccess::Write, &record.namespace);
    Ok(signed.page(
        "Record",
        pages::record(&record, &body, may_write, SystemTime::now()),
    ))
}

async fn confirm<S: AdminStore>(
    console: &Console<S>,
    from: &Requester,
    query: Result<Query<RecordQuery>, QueryRejection>,
    action: Action,
) -> Result<Response, Refusal> {
    let signed = console.signed(from)?;
    let query = query_input(query)?;
    let record = console
        .find_record(&signed, &query.namespace, &query.key)
        .await?;
    Ok(signed.page(
        action.title(),
        pages::confirm(action, &record, &signed.session.csrf),
    ))
}

async fn confirm_force_release<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    query: Result<Query<RecordQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    confirm(&console, &from, query, Action::ForceRelease).await
}

async fn confirm_purge<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    query: Result<Query<RecordQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    confirm(&console, &from, query, Action::Purge).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChangeForm {
    csrf: String,
    namespace: String,
    key: String,
    reason: String,
    expected_fencing_token: String,
}

/// The fencing token a confirmation saw, so the change applies only to that record.
fn expected_token(text: &str) -> Result<u64, Refusal> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    text.trim().parse().map_err(|_| {
        Refusal::BadInput(
            "The form's fencing token is not a number.".into(),
            vec![(
                "expected_fencing_token".into(),
                "must be a whole number".into(),
            )],
        )
    })
}

async fn force_release<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    form: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let form = form_input(form)?;
    signed.check_csrf(&form.csrf)?;
    let answer = console
        .admin
        .call::<ForceRelease>(
            signed.caller.clone(),
            admin::ForceReleaseRequest {
                expected_fencing_token: expected_token(&form.expected_fencing_token)?,
                namespace: form.namespace,
                key: form.key,
                reason: form.reason,
            },
        )
        .await?;
    let record = answer.record.unwrap_or_default();
    Ok(signed.page(
        "Force-released",
        pages::changed(Action::ForceRelease, &record),
    ))
}

async fn purge<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    form: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let form = form_input(form)?;
    signed.check_csrf(&form.csrf)?;
    let answer = console
        .admin
        .call::<PurgeRecord>(
            signed.caller.clone(),
            admin::PurgeRecordRequest {
                expected_fencing_token: expected_token(&form.expected_fencing_token)?,
                namespace: form.namespace,
                key: form.key,
                reason: form.reason,
            },
        )
        .await?;
    let record = answer.record.unwrap_or_default();
    Ok(signed.page("Purged", pages::changed(Action::Purge, &record)))
}

/// Reason of the dry run that counts before a bulk purge: a dry run changes nothing and writes
/// no audit entry, but the API asks every PurgeRecords for a reason.
const DRY_RUN_REASON: &str = "console: count before a bulk purge";

fn purge_request(form: &FilterForm, parsed: Filters) -> admin::PurgeRecordsRequest {
    admin::PurgeRecordsRequest {
        namespace: form.namespace.clone(),
        states: parsed.states,
        key_prefix: form.key_prefix.clone(),
        holder: form.holder.clone(),
        stuck_only: form.stuck,
        created_after: parsed.created_after,
        created_before: parsed.created_before,
        ..Default::default()
    }
}

fn describe(form: &FilterForm) -> String {
    let parts: Vec<String> = form
        .pairs()
        .into_iter()
        .skip(1)
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    if parts.is_empty() {
        "every record".into()
    } else {
        parts.join(" ")
    }
}

async fn bulk_purge_page<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    query: Result<Query<RecordsQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let form = query_input(query)?.form();
    let parsed = filters(&form)?;
    let counted = console
        .admin
        .call::<PurgeRecords>(
            signed.caller.clone(),
            admin::PurgeRecordsRequest {
                reason: DRY_RUN_REASON.into(),
                dry_run: true,
                limit: i32::try_from(crate::domain::admin::MAX_PURGE_LIMIT).unwrap_or(i32::MAX),
                ..purge_request(&form, parsed)
            },
        )
        .await?;
    Ok(signed.page(
        "Purge matching records",
        pages::bulk_confirm(&form, &describe(&form), counted.count, &signed.session.csrf),
    ))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BulkForm {
    csrf: String,
    #[serde(flatten)]
    filters: RecordsQuery,
    reason: String,
    limit: String,
}

async fn purge_records<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    form: Result<Form<BulkForm>, FormRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let bulk = form_input(form)?;
    signed.check_csrf(&bulk.csrf)?;
    let form = bulk.filters.form();
    let parsed = filters(&form)?;
    let limit = bulk.limit.trim().parse::<i32>().map_err(|_| {
        Refusal::BadInput(
            "How many records at most?".into(),
            vec![("limit".into(), "must be a whole number".into())],
        )
    })?;
    let purged = console
        .admin
        .call::<PurgeRecords>(
            signed.caller.clone(),
            admin::PurgeRecordsRequest {
                reason: bulk.reason,
                dry_run: false,
                limit,
                ..purge_request(&form, parsed)
            },
        )
        .await?;
    Ok(signed.page("Purged", pages::bulk_done(&form.namespace, purged.count)))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuditQuery {
    namespace: String,
    page_token: String,
}

async fn audit<S: AdminStore>(
    State(console): Shared<S>,
    from: Requester,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let signed = console.signed(&from)?;
    let query = query_input(query)?;
    let page = console
        .admin
        .call::<ListAuditEntries>(
            signed.caller.clone(),
            admin::ListAuditEntriesRequest {
                namespace: query.namespace.clone(),
                page_size: 50,
                page_token: query.page_token,
            },
        )
        .await?;
    Ok(signed.page(
        "Audit",
        pages::audit(&query.namespace, &page.entries, &page.next_page_token),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn only_same_origin_requests_may_change_anything() {
        assert!(check_origin(&headers(&[("host", "127.0.0.1:8080")])).is_ok());
        assert!(check_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
        ]))
        .is_ok());
        // Another port of the same host is the same site (SameSite=Strict cookies go along),
        // but not the same origin.
        assert!(check_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:9999"),
        ]))
        .is_err());
        assert!(check_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "same-site"),
        ]))
        .is_err());
        assert!(check_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "cross-site"),
        ]))
        .is_err());
        assert!(check_origin(&headers(&[("origin", "null")])).is_err());
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let found = headers(&[("cookie", "a=1; idemd_console=abc; b=2")]);
        assert_eq!(cookie_session_id(&found), Some("abc"));
        assert_eq!(cookie_session_id(&headers(&[("cookie", "x=1")])), None);
        let cookie = session_cookie("abc", 60, false);
        for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=60"] {
            assert!(cookie.contains(part), "{cookie} lacks {part}");
        }
        assert!(!cookie.contains("Secure"));
        assert!(session_cookie("abc", 60, true).ends_with("; Secure"));
    }

    #[test]
    fn bad_filters_are_named() {
        let form = FilterForm {
            state: "sideways".into(),
            created_after: "yesterday".into(),
            ..Default::default()
        };
        match filters(&form) {
            Err(Refusal::BadInput(_, violations)) => {
                let fields: Vec<&str> = violations.iter().map(|(f, _)| f.as_str()).collect();
                assert_eq!(fields, ["state", "created_after"]);
            }
            _ => panic!("bad filters were accepted"),
        }
    }
}
