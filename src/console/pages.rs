//! The console's HTML, written with maud: every `(value)` is escaped, so keys, holders, reasons
//! and metadata that callers chose render as text. Nothing here uses `PreEscaped` on input.

use std::time::SystemTime;

use maud::{html, Markup, DOCTYPE};

use crate::proto::idempotency::admin::v1 as admin;
use crate::proto::idempotency::v1 as pb;

/// Who is signed in, for the page header.
pub struct Header<'a> {
    pub caller: &'a str,
    pub csrf: &'a str,
    pub auth_off: bool,
}

/// A whole page.
pub fn layout(title: &str, header: Option<&Header<'_>>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · idemd console" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/namespaces" { "idemd console" }
                    @if let Some(header) = header {
                        nav {
                            a href="/namespaces" { "Namespaces" }
                        }
                        span.who { "signed in as " strong { (header.caller) } }
                        form.inline method="post" action="/sign-out" {
                            input type="hidden" name="csrf" value=(header.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                @if header.is_some_and(|header| header.auth_off) {
                    p.banner { "Authentication is off: anyone who reaches this port may read and change every namespace." }
                }
                main { (body) }
            }
        }
    }
}

/// A time in UTC; the console's script adds the browser's own zone beside it.
pub fn time(value: Option<&prost_types::Timestamp>) -> Markup {
    match value.and_then(|value| SystemTime::try_from(*value).ok()) {
        Some(time) => {
            let utc = humantime::format_rfc3339_seconds(time).to_string();
            html! { time datetime=(utc) { (utc.replace('T', " ").replace('Z', " UTC")) } }
        }
        None => html! { span.none { "—" } },
    }
}

pub fn state_name(state: i32) -> &'static str {
    match pb::RecordState::try_from(state) {
        Ok(pb::RecordState::InProgress) => "IN_PROGRESS",
        Ok(pb::RecordState::Completed) => "COMPLETED",
        _ => "—",
    }
}

/// Stuck: in progress with its lease over (the admin API's `stuck_only` rule, as far as the
/// wire record shows it).
pub fn is_stuck(record: &pb::Record, now: SystemTime) -> bool {
    record.state == pb::RecordState::InProgress as i32
        && record
            .lease_expires_at
            .and_then(|at| SystemTime::try_from(at).ok())
            .is_some_and(|at| at <= now)
}

/// A query string of `pairs`, each part percent-encoded.
pub fn query(path: &str, pairs: &[(&str, &str)]) -> String {
    let encoded: Vec<String> = pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect();
    if encoded.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", encoded.join("&"))
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// `certificate`: the name on the connection's client certificate, if it presented one.
pub fn sign_in(message: Option<&str>, auth_off: bool, certificate: Option<&String>) -> Markup {
    html! {
        h1 { "Sign in" }
        @if let Some(message) = message { p.error { (message) } }
        @if let (false, Some(name)) = (auth_off, certificate) {
            form.card method="post" action="/sign-in" {
                input type="hidden" name="with" value="certificate";
                p { "Your browser presented a client certificate for " strong { (name) } "." }
                button type="submit" { "Sign in with this certificate" }
            }
        }
        form.card method="post" action="/sign-in" autocomplete="off" {
            @if auth_off {
                p { "Authentication is off on this idemd: no token is needed." }
            } @else {
                label for="token" { "Bearer token with an admin grant" }
                input #token type="password" name="token" required autocomplete="off";
                p.hint { "The token stays on the server: the browser gets only a session cookie." }
            }
            button type="submit" { "Sign in" }
        }
    }
}

pub fn namespaces(summaries: &[admin::NamespaceSummary], charts: &[(String, Markup)]) -> Markup {
    html! {
        h1 { "Namespaces" }
        @if summaries.is_empty() {
            p { "No namespace you may read has live records." }
        } @else {
            table {
                thead { tr {
                    th { "Namespace" } th.num { "In progress" } th.num { "Completed" }
                    th.num { "Stuck" } th { "Oldest in progress" } th {}
                } }
                tbody {
                    @for summary in summaries {
                        tr.stuck[summary.stuck > 0] {
                            td { a href=(query("/records", &[("namespace", &summary.namespace)])) { (summary.namespace) } }
                            td.num { (summary.in_progress) }
                            td.num { (summary.completed) }
                            td.num {
                                @if summary.stuck > 0 {
                                    a.badge href=(query("/records", &[("namespace", &summary.namespace), ("stuck", "on")])) { (summary.stuck) " stuck" }
                                } @else { "0" }
                            }
                            td { (time(summary.oldest_in_progress.as_ref())) }
                            td { a href=(query("/audit", &[("namespace", &summary.namespace)])) { "Audit" } }
                        }
                    }
                }
            }
            @for (namespace, chart) in charts {
                section.namespace-chart {
                    h2 { (namespace) }
                    (chart)
                }
            }
        }
    }
}

/// The filters of the records view, as the form shows them again.
#[derive(Default, Clone)]
pub struct FilterForm {
    pub namespace: String,
    pub state: String,
    pub key_prefix: String,
    pub holder: String,
    pub stuck: bool,
    pub created_after: String,
    pub created_before: String,
}

impl FilterForm {
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        vec![
            ("namespace", self.namespace.as_str()),
            ("state", self.state.as_str()),
            ("key_prefix", self.key_prefix.as_str()),
            ("holder", self.holder.as_str()),
            ("stuck", if self.stuck { "on" } else { "" }),
            ("created_after", self.created_after.as_str()),
            ("created_before", self.created_before.as_str()),
        ]
    }

    fn hidden(&self) -> Markup {
        html! {
            @for (name, value) in self.pairs() {
                @if !value.is_empty() { input type="hidden" name=(name) value=(value); }
            }
        }
    }
}

fn filter_form(filters: &FilterForm) -> Markup {
    html! {
        form.filters method="get" action="/records" {
            input type="hidden" name="namespace" value=(filters.namespace);
            label { "State "
                select name="state" {
                    option value="" selected[filters.state.is_empty()] { "any" }
                    option value="in_progress" selected[filters.state == "in_progress"] { "in progress" }
                    option value="completed" selected[filters.state == "completed"] { "completed" }
                }
            }
            label { "Key prefix " input type="text" name="key_prefix" value=(filters.key_prefix); }
            label { "Holder " input type="text" name="holder" value=(filters.holder); }
            label { "Created after " input type="text" name="created_after" placeholder="2026-01-31T12:00:00Z" value=(filters.created_after); }
            label { "Created before " input type="text" name="created_before" placeholder="RFC 3339, UTC" value=(filters.created_before); }
            label.check { input type="checkbox" name="stuck" checked[filters.stuck]; " stuck only" }
            button type="submit" { "Filter" }
        }
    }
}

pub fn records(
    filters: &FilterForm,
    records: &[pb::Record],
    page_size: &str,
    next_page_token: &str,
    now: SystemTime,
) -> Markup {
    let mut next = filters.pairs();
    next.push(("page_size", page_size));
    next.push(("page_token", next_page_token));
    html! {
        h1 { "Records in " (filters.namespace) }
        p.links {
            a href=(query("/audit", &[("namespace", &filters.namespace)])) { "Audit of this namespace" }
            " · "
            a href=(query("/bulk-purge", &filters.pairs())) { "Purge every matching record…" }
        }
        (filter_form(filters))
        @if records.is_empty() {
            p { "No record matches." }
        } @else {
            table.records {
                thead { tr {
                    th { "Key" } th { "State" } th.num { "Fencing token" } th.num { "Attempts" }
                    th { "Holder" } th { "Created" } th { "Lease expires" }
                } }
                tbody {
                    @for record in records {
                        @let stuck = is_stuck(record, now);
                        tr.stuck[stuck] {
                            td.key { a href=(query("/record", &[("namespace", &record.namespace), ("key", &record.key)])) { (record.key) } }
                            td { (state_name(record.state)) @if stuck { " " span.badge { "STUCK" } } }
                            td.num { (record.fencing_token) }
                            td.num { (record.attempts) }
                            td { (record.holder) }
                            td { (time(record.created_at.as_ref())) }
                            td { (time(record.lease_expires_at.as_ref())) }
                        }
                    }
                }
            }
        }
        @if !next_page_token.is_empty() {
            p { a.next href=(query("/records", &next)) { "Next page →" } }
        }
    }
}

/// How a result body is shown.
pub enum Body {
    /// The caller lacks admin_read_results.
    Hidden,
    Empty,
    Json(String),
    Text(String),
    Hex(String),
}

impl Body {
    pub fn of(bytes: &[u8]) -> Body {
        if bytes.is_empty() {
            return Body::Empty;
        }
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
            if let Ok(pretty) = serde_json::to_string_pretty(&value) {
                return Body::Json(pretty);
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(text) if !text.chars().any(|c| c.is_control() && !c.is_whitespace()) => {
                Body::Text(text.to_string())
            }
            _ => Body::Hex(
                bytes
                    .chunks(16)
                    .map(|line| {
                        line.iter()
                            .map(|byte| format!("{byte:02x}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        }
    }
}

pub fn record(record: &pb::Record, body: &Body, may_write: bool, now: SystemTime) -> Markup {
    let stuck = is_stuck(record, now);
    let fencing = record.fencing_token.to_string();
    let target = [
        ("namespace", record.namespace.as_str()),
        ("key", record.key.as_str()),
        ("fencing_token", fencing.as_str()),
    ];
    html! {
        h1 { "Record" }
        p.links { a href=(query("/records", &[("namespace", &record.namespace)])) { "← Records in " (record.namespace) } }
        dl.record.stuck[stuck] {
            dt { "Namespace" } dd { (record.namespace) }
            dt { "Key" } dd.key { (record.key) }
            dt { "State" } dd { (state_name(record.state)) @if stuck { " " span.badge { "STUCK: lease expired, nobody holds it" } } }
            dt { "Fencing token" } dd { (record.fencing_token) }
            dt { "Attempts" } dd { (record.attempts) }
            dt { "Holder" } dd { @if record.holder.is_empty() { span.none { "—" } } @else { (record.holder) } }
            dt { "Fingerprint" } dd.mono { @if record.fingerprint.is_empty() { span.none { "—" } } @else { (hex(&record.fingerprint)) } }
            dt { "Created" } dd { (time(record.created_at.as_ref())) }
            dt { "Lease expires" } dd { (time(record.lease_expires_at.as_ref())) }
            dt { "Completed" } dd { (time(record.completed_at.as_ref())) }
            dt { "Expires" } dd { (time(record.expires_at.as_ref())) }
            @if let Some(result) = &record.result {
                dt { "Result code" } dd { (result.code) }
                dt { "Result metadata" }
                dd {
                    @if result.metadata.is_empty() { span.none { "none" } } @else {
                        table.metadata { tbody {
                            @let entries: std::collections::BTreeMap<_, _> = result.metadata.iter().collect();
                            @for (name, value) in entries { tr { td { (name) } td { (value) } } }
                        } }
                    }
                }
                dt { "Result body" }
                dd {
                    @match body {
                        Body::Hidden => span.none { "hidden: showing result bodies needs the admin_read_results grant" },
                        Body::Empty => span.none { "empty" },
                        Body::Json(text) => { span.hint { "JSON" } pre.body { (text) } },
                        Body::Text(text) => { span.hint { "text" } pre.body { (text) } },
                        Body::Hex(text) => { span.hint { "bytes, hex" } pre.body { (text) } },
                    }
                }
            }
        }
        @if may_write {
            section.actions {
                h2 { "Actions" }
                @if record.state == pb::RecordState::InProgress as i32 {
                    a.button href=(query("/confirm/force-release", &target)) { "Force release…" }
                    " "
                }
                a.button.danger href=(query("/confirm/purge", &target)) { "Purge…" }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What a confirmation changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ForceRelease,
    Purge,
}

impl Action {
    pub fn path(self) -> &'static str {
        match self {
            Action::ForceRelease => "force-release",
            Action::Purge => "purge",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Action::ForceRelease => "Force release",
            Action::Purge => "Purge",
        }
    }

    fn consequence(self) -> &'static str {
        match self {
            Action::ForceRelease => {
                "The holder's lease ends now: its Complete or Renew will fail with \
                 LEASE_NOT_HELD, and the next Acquire takes the key over with a higher fencing token."
            }
            Action::Purge => {
                "The record is deleted: the key behaves as never seen, and a retry of the \
                 original request runs it again."
            }
        }
    }
}

pub fn confirm(action: Action, record: &pb::Record, csrf: &str) -> Markup {
    html! {
        h1 { (action.title()) " " span.key { (record.key) } }
        p { (action.consequence()) }
        dl.record {
            dt { "Namespace" } dd { (record.namespace) }
            dt { "Key" } dd.key { (record.key) }
            dt { "State" } dd { (state_name(record.state)) }
            dt { "Fencing token" } dd { (record.fencing_token) }
            dt { "Holder" } dd { (record.holder) }
        }
        form.card method="post" action=(format!("/actions/{}", action.path())) {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="namespace" value=(record.namespace);
            input type="hidden" name="key" value=(record.key);
            input type="hidden" name="expected_fencing_token" value=(record.fencing_token);
            label for="reason" { "Reason (required, recorded in the audit log)" }
            textarea #reason name="reason" required maxlength="500" rows="3" {}
            button.danger type="submit" { (action.title()) }
            " "
            a href=(query("/record", &[("namespace", &record.namespace), ("key", &record.key)])) { "Cancel" }
        }
    }
}

pub fn changed(action: Action, record: &pb::Record) -> Markup {
    let done = match action {
        Action::ForceRelease => "Force-released",
        Action::Purge => "Purged",
    };
    html! {
        h1 { (done) }
        p.done { (done) " " span.key { (record.key) } " in " (record.namespace)
            " (fencing token " (record.fencing_token) ")." }
        p.links {
            a href=(query("/audit", &[("namespace", &record.namespace)])) { "See the audit log" }
            " · "
            a href=(query("/records", &[("namespace", &record.namespace)])) { "Back to records" }
        }
    }
}

pub fn bulk_confirm(filters: &FilterForm, description: &str, count: u64, csrf: &str) -> Markup {
    let limit = count.clamp(1, u64::from(crate::domain::admin::MAX_PURGE_LIMIT));
    html! {
        h1 { "Purge matching records" }
        p { "Namespace " strong { (filters.namespace) } ", filter: " code { (description) } }
        p.count { strong { (count) } " records match now (a dry run: nothing was deleted)." }
        @if count == 0 {
            p { a href=(query("/records", &filters.pairs())) { "Back to records" } }
        } @else {
            form.card method="post" action="/actions/purge-records" {
                input type="hidden" name="csrf" value=(csrf);
                (filters.hidden())
                label { "Delete at most " input type="number" name="limit" min="1" max=(crate::domain::admin::MAX_PURGE_LIMIT) value=(limit); " records" }
                label for="reason" { "Reason (required, recorded in the audit log)" }
                textarea #reason name="reason" required maxlength="500" rows="3" {}
                button.danger type="submit" { "Purge" }
                " "
                a href=(query("/records", &filters.pairs())) { "Cancel" }
            }
        }
    }
}

pub fn bulk_done(namespace: &str, count: u64) -> Markup {
    html! {
        h1 { "Purged" }
        p.done { "Purged " (count) " records in " (namespace) "." }
        p.links { a href=(query("/audit", &[("namespace", namespace)])) { "See the audit log" } }
    }
}

fn action_name(action: i32) -> &'static str {
    match admin::AuditAction::try_from(action) {
        Ok(admin::AuditAction::PurgeRecord) => "PurgeRecord",
        Ok(admin::AuditAction::ForceRelease) => "ForceRelease",
        Ok(admin::AuditAction::PurgeRecords) => "PurgeRecords",
        _ => "—",
    }
}

pub fn audit(namespace: &str, entries: &[admin::AuditEntry], next_page_token: &str) -> Markup {
    html! {
        h1 { "Audit of " (namespace) }
        p.hint { "Newest first. Every change made through the admin API or this console." }
        @if entries.is_empty() {
            p { "No admin change yet." }
        } @else {
            table.audit {
                thead { tr {
                    th { "Time" } th { "Caller" } th { "Action" } th { "Key or filter" }
                    th { "Reason" } th.num { "Count" } th { "State before" } th.num { "Fencing token before" }
                } }
                tbody {
                    @for entry in entries {
                        tr {
                            td { (time(entry.time.as_ref())) }
                            td { (entry.caller) }
                            td { (action_name(entry.action)) }
                            td.key { @if entry.key.is_empty() { code { (entry.filter) } } @else { (entry.key) } }
                            td.reason { (entry.reason) }
                            td.num { (entry.count) }
                            td { (state_name(entry.state_before)) }
                            td.num { @if entry.fencing_token_before > 0 { (entry.fencing_token_before) } @else { "—" } }
                        }
                    }
                }
            }
        }
        @if !next_page_token.is_empty() {
            p { a.next href=(query("/audit", &[("namespace", namespace), ("page_token", next_page_token)])) { "Older entries →" } }
        }
    }
}

/// The page of a refused request: what was wrong, in words, and a way back.
pub fn problem(title: &str, message: &str, violations: &[(String, String)]) -> Markup {
    html! {
        h1 { (title) }
        p.error { (message) }
        @if !violations.is_empty() {
            ul.violations {
                @for (field, description) in violations {
                    li { code { (field) } ": " (description) }
                }
            }
        }
        p { a href="/namespaces" { "Back to the namespaces" } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_encode_everything_but_unreserved_characters() {
        assert_eq!(
            query(
                "/record",
                &[("namespace", "orders"), ("key", "a b&c=<d>/é")]
            ),
            "/record?namespace=orders&key=a%20b%26c%3D%3Cd%3E%2F%C3%A9"
        );
        assert_eq!(query("/records", &[("state", "")]), "/records");
    }

    #[test]
    fn bodies_show_as_json_text_or_hex() {
        assert!(matches!(Body::of(b""), Body::Empty));
        match Body::of(br#"{"a":1}"#) {
            Body::Json(text) => assert_eq!(text, "{\n  \"a\": 1\n}"),
            _ => panic!("JSON expected"),
        }
        assert!(matches!(Body::of(b"plain words\n"), Body::Text(_)));
        match Body::of(&[0, 159, 146, 150]) {
            Body::Hex(text) => assert_eq!(text, "00 9f 92 96"),
            _ => panic!("hex expected"),
        }
    }

    #[test]
    fn every_page_says_when_auth_is_off() {
        let header = |auth_off| Header {
            caller: "anyone",
            csrf: "t",
            auth_off,
        };
        let open = layout("x", Some(&header(true)), html! {}).into_string();
        assert!(open.contains("Authentication is off"));
        let closed = layout("x", Some(&header(false)), html! {}).into_string();
        assert!(!closed.contains("Authentication is off"));
    }

    #[test]
    fn caller_text_is_escaped() {
        let record = pb::Record {
            namespace: "orders".into(),
            key: "<img src=x onerror=alert(1)>".into(),
            holder: "<script>alert(2)</script>".into(),
            ..Default::default()
        };
        let page = super::record(&record, &Body::Hidden, true, SystemTime::now()).into_string();
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(!page.contains("<img"));
        assert!(!page.contains("<script>"));
    }
}
