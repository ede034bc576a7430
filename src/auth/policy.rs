//! The access policy: which callers exist, how each proves who it is, and what it may do where.
//!
//! ```toml
//! [[callers]]
//! name = "payments-api"
//! token_sha256 = ["<64 hex: SHA-256 of the bearer token>"]   # never the token itself
//! tls_identities = ["payments-api.payments.svc"]             # client certificate SAN DNS or CN
//! max_concurrent_rpcs = 64                                     # optional
//! rate_per_second = 500                                        # optional (burst: one second's worth)
//!
//!   [[callers.grants]]
//!   namespaces = ["payments", "payments-eu-*"]   # exact names, or prefixes ending in "*"
//!   rpcs = ["*"]                                 # or some of Acquire, Complete, Release, Renew, Get, Wait
//!
//!   # The admin API (idempotency.admin.v1), granted apart: "*" in `rpcs` never includes it.
//!   [[callers.admin_grants]]
//!   namespaces = ["payments*"]
//!   access = ["admin_read", "admin_write"]       # admin_read, admin_read_results, admin_write
//! ```

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::Namespace;

/// The RPCs idemd serves: the data plane's, which a grant's `rpcs` can allow, and the admin
/// API's, which only admin grants allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rpc {
    Acquire,
    Complete,
    Release,
    Renew,
    Get,
    Wait,
    ListRecords,
    ListNamespaces,
    GetNamespaceStats,
    PurgeRecord,
    ForceRelease,
    PurgeRecords,
    ListAuditEntries,
}

/// The gRPC service of the data plane.
pub const DATA_PLANE_SERVICE: &str = "idempotency.v1.IdempotencyService";
/// The gRPC service of the admin API.
pub const ADMIN_SERVICE: &str = "idempotency.admin.v1.AdminService";

impl Rpc {
    /// The data plane's RPCs: what `rpcs = ["*"]` grants.
    pub const ALL: [Rpc; 6] = [
        Rpc::Acquire,
        Rpc::Complete,
        Rpc::Release,
        Rpc::Renew,
        Rpc::Get,
        Rpc::Wait,
    ];

    /// The admin API's RPCs.
    pub const ADMIN: [Rpc; 7] = [
        Rpc::ListRecords,
        Rpc::ListNamespaces,
        Rpc::GetNamespaceStats,
        Rpc::PurgeRecord,
        Rpc::ForceRelease,
        Rpc::PurgeRecords,
        Rpc::ListAuditEntries,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::Acquire => "Acquire",
            Rpc::Complete => "Complete",
            Rpc::Release => "Release",
            Rpc::Renew => "Renew",
            Rpc::Get => "Get",
            Rpc::Wait => "Wait",
            Rpc::ListRecords => "ListRecords",
            Rpc::ListNamespaces => "ListNamespaces",
            Rpc::GetNamespaceStats => "GetNamespaceStats",
            Rpc::PurgeRecord => "PurgeRecord",
            Rpc::ForceRelease => "ForceRelease",
            Rpc::PurgeRecords => "PurgeRecords",
            Rpc::ListAuditEntries => "ListAuditEntries",
        }
    }

    /// The full gRPC method name, `idempotency.v1.IdempotencyService/Acquire`: the name of the
    /// RPC's trace span, as the gRPC conventions name server spans.
    pub fn path(self) -> &'static str {
        match self {
            Rpc::Acquire => "idempotency.v1.IdempotencyService/Acquire",
            Rpc::Complete => "idempotency.v1.IdempotencyService/Complete",
            Rpc::Release => "idempotency.v1.IdempotencyService/Release",
            Rpc::Renew => "idempotency.v1.IdempotencyService/Renew",
            Rpc::Get => "idempotency.v1.IdempotencyService/Get",
            Rpc::Wait => "idempotency.v1.IdempotencyService/Wait",
            Rpc::ListRecords => "idempotency.admin.v1.AdminService/ListRecords",
            Rpc::ListNamespaces => "idempotency.admin.v1.AdminService/ListNamespaces",
            Rpc::GetNamespaceStats => "idempotency.admin.v1.AdminService/GetNamespaceStats",
            Rpc::PurgeRecord => "idempotency.admin.v1.AdminService/PurgeRecord",
            Rpc::ForceRelease => "idempotency.admin.v1.AdminService/ForceRelease",
            Rpc::PurgeRecords => "idempotency.admin.v1.AdminService/PurgeRecords",
            Rpc::ListAuditEntries => "idempotency.admin.v1.AdminService/ListAuditEntries",
        }
    }

    /// The gRPC service the RPC belongs to.
    pub fn service(self) -> &'static str {
        if Rpc::ADMIN.contains(&self) {
            ADMIN_SERVICE
        } else {
            DATA_PLANE_SERVICE
        }
    }

    /// The data-plane RPC of a method name (`Acquire`), as in policy files' `rpcs`.
    pub fn parse(name: &str) -> Option<Self> {
        Rpc::ALL.into_iter().find(|rpc| rpc.name() == name)
    }

    /// The RPC a gRPC path names (`/idempotency.v1.IdempotencyService/Acquire`), if any.
    pub fn of_path(path: &str) -> Option<Self> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        Rpc::ALL
            .into_iter()
            .chain(Rpc::ADMIN)
            .find(|rpc| rpc.name() == method && rpc.service() == service)
    }
}

/// What an admin grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdminAccess {
    /// ListRecords, ListNamespaces, GetNamespaceStats, ListAuditEntries, without result bodies.
    Read,
    /// As `Read`, with result bodies.
    ReadResults,
    /// PurgeRecord, ForceRelease, PurgeRecords.
    Write,
}

impl AdminAccess {
    pub fn name(self) -> &'static str {
        match self {
            AdminAccess::Read => "admin_read",
            AdminAccess::ReadResults => "admin_read_results",
            AdminAccess::Write => "admin_write",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [
            AdminAccess::Read,
            AdminAccess::ReadResults,
            AdminAccess::Write,
        ]
        .into_iter()
        .find(|access| access.name() == name)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    callers: Vec<CallerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerFile {
    name: String,
    #[serde(default)]
    token_sha256: Vec<String>,
    #[serde(default)]
    tls_identities: Vec<String>,
    max_concurrent_rpcs: Option<u32>,
    rate_per_second: Option<f64>,
    #[serde(default)]
    grants: Vec<GrantFile>,
    #[serde(default)]
    admin_grants: Vec<AdminGrantFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminGrantFile {
    namespaces: Vec<String>,
    access: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    namespaces: Vec<String>,
    rpcs: Vec<String>,
}

/// A namespace pattern: an exact namespace, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamespacePattern {
    Exact(String),
    Prefix(String),
}

impl NamespacePattern {
    fn matches(&self, namespace: &Namespace) -> bool {
        match self {
            NamespacePattern::Exact(name) => namespace.as_str() == name,
            NamespacePattern::Prefix(prefix) => namespace.as_str().starts_with(prefix.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
struct Grant {
    namespaces: Vec<NamespacePattern>,
    rpcs: BTreeSet<Rpc>,
}

#[derive(Debug, Clone)]
struct AdminGrant {
    namespaces: Vec<NamespacePattern>,
    access: BTreeSet<AdminAccess>,
}

/// Per-caller limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallerLimits {
    pub max_concurrent_rpcs: Option<u32>,
    pub rate_per_second: Option<f64>,
}

/// One known caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub limits: CallerLimits,
    grants: Vec<Grant>,
    admin_grants: Vec<AdminGrant>,
}

impl Caller {
    /// Whether this caller may call the data-plane `rpc` in `namespace`.
    pub fn allows(&self, rpc: Rpc, namespace: &Namespace) -> bool {
        self.grants.iter().any(|grant| {
            grant.rpcs.contains(&rpc) && grant.namespaces.iter().any(|p| p.matches(namespace))
        })
    }

    /// Whether some admin grant of this caller gives `access` (ListNamespaces then shows only
    /// the namespaces it covers).
    pub fn has_any_admin(&self, access: AdminAccess) -> bool {
        self.admin_grants.iter().any(|grant| {
            grant.access.contains(&access)
                || (access == AdminAccess::Read && grant.access.contains(&AdminAccess::ReadResults))
        })
    }

    /// Whether this caller has `access` to `namespace` in the admin API. `admin_read_results`
    /// includes `admin_read`.
    pub fn has_admin(&self, access: AdminAccess, namespace: &Namespace) -> bool {
        self.admin_grants.iter().any(|grant| {
            let granted = grant.access.contains(&access)
                || (access == AdminAccess::Read
                    && grant.access.contains(&AdminAccess::ReadResults));
            granted && grant.namespaces.iter().any(|p| p.matches(namespace))
        })
    }
}

/// The parsed policy. Construct with `Policy::parse`; it is valid once it exists.
#[derive(Debug, Clone)]
pub struct Policy {
    callers: Vec<Arc<Caller>>,
    /// (token hash, index into `callers`).
    token_hashes: Vec<([u8; 32], usize)>,
    /// TLS identity → index into `callers`.
    identities: HashMap<String, usize>,
}

/// How a request identified itself.
#[derive(Debug, Clone, Copy)]
pub enum Credentials<'a> {
    Bearer(&'a str),
    Certificate(&'a [String]),
    None,
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

fn parse_pattern(text: &str) -> Result<NamespacePattern, String> {
    let (body, prefix) = match text.strip_suffix('*') {
        Some(body) => (body, true),
        None => (text, false),
    };
    let valid = !body.is_empty() || prefix;
    if !valid
        || !body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "namespace pattern {text:?} must be a namespace ([A-Za-z0-9._-]) optionally ending in *"
        ));
    }
    Ok(if prefix {
        NamespacePattern::Prefix(body.to_string())
    } else {
        NamespacePattern::Exact(body.to_string())
    })
}

impl Policy {
    /// Parses and checks a policy file's text; the error names what to fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut callers = Vec::new();
        let mut token_hashes = Vec::new();
        let mut identities = HashMap::new();
        let mut names = BTreeSet::new();
        for (index, caller) in file.callers.into_iter().enumerate() {
            let name = caller.name.trim().to_string();
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(format!(
                    "callers[{index}].name must be 1-128 printable characters"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("caller {name:?} is defined twice"));
            }
            if caller.token_sha256.is_empty() && caller.tls_identities.is_empty() {
                return Err(format!(
                    "caller {name:?} needs token_sha256 or tls_identities to be recognised"
                ));
            }
            for text in &caller.token_sha256 {
                let hash = parse_hash(text).ok_or_else(|| {
                    format!("caller {name:?}: token_sha256 entries must be 64 hex characters (sha256sum of the token)")
                })?;
                if token_hashes.iter().any(|(known, _)| known == &hash) {
                    return Err(format!(
                        "caller {name:?}: a token hash is used by two callers"
                    ));
                }
                token_hashes.push((hash, callers.len()));
            }
            for identity in &caller.tls_identities {
                if identity.is_empty() {
                    return Err(format!(
                        "caller {name:?}: tls_identities entries must not be empty"
                    ));
                }
                if identities.insert(identity.clone(), callers.len()).is_some() {
                    return Err(format!("TLS identity {identity:?} is given to two callers"));
                }
            }
            if caller.max_concurrent_rpcs == Some(0) {
                return Err(format!(
                    "caller {name:?}: max_concurrent_rpcs must be at least 1"
                ));
            }
            if let Some(rate) = caller.rate_per_second {
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(format!(
                        "caller {name:?}: rate_per_second must be a positive number"
                    ));
                }
            }
            let mut grants = Vec::new();
            for grant in caller.grants {
                if grant.namespaces.is_empty() || grant.rpcs.is_empty() {
                    return Err(format!(
                        "caller {name:?}: every grant needs namespaces and rpcs"
                    ));
                }
                let namespaces = grant
                    .namespaces
                    .iter()
                    .map(|pattern| parse_pattern(pattern))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| format!("caller {name:?}: {error}"))?;
                let mut rpcs = BTreeSet::new();
                for rpc in &grant.rpcs {
                    if rpc == "*" {
                        rpcs.extend(Rpc::ALL);
                    } else {
                        rpcs.insert(Rpc::parse(rpc).ok_or_else(|| {
                            format!("caller {name:?}: unknown rpc {rpc:?} (use *, Acquire, Complete, Release, Renew, Get, Wait)")
                        })?);
                    }
                }
                grants.push(Grant { namespaces, rpcs });
            }
            let mut admin_grants = Vec::new();
            for grant in caller.admin_grants {
                if grant.namespaces.is_empty() || grant.access.is_empty() {
                    return Err(format!(
                        "caller {name:?}: every admin grant needs namespaces and access"
                    ));
                }
                let namespaces = grant
                    .namespaces
                    .iter()
                    .map(|pattern| parse_pattern(pattern))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| format!("caller {name:?}: {error}"))?;
                let access = grant
                    .access
                    .iter()
                    .map(|access| {
                        AdminAccess::parse(access).ok_or_else(|| {
                            format!("caller {name:?}: unknown admin access {access:?} (use admin_read, admin_read_results, admin_write)")
                        })
                    })
                    .collect::<Result<BTreeSet<_>, _>>()?;
                admin_grants.push(AdminGrant { namespaces, access });
            }
            callers.push(Arc::new(Caller {
                name,
                limits: CallerLimits {
                    max_concurrent_rpcs: caller.max_concurrent_rpcs,
                    rate_per_second: caller.rate_per_second,
                },
                grants,
                admin_grants,
            }));
        }
        if callers.is_empty() {
            return Err("the policy defines no callers".into());
        }
        Ok(Self {
            callers,
            token_hashes,
            identities,
        })
    }

    /// The caller these credentials belong to. A bearer token is hashed and compared with every
    /// known hash in constant time, so timing tells nothing about which hashes exist.
    pub fn authenticate(&self, credentials: Credentials<'_>) -> Option<Arc<Caller>> {
        match credentials {
            Credentials::Bearer(token) => {
                let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                let mut found = None;
                for (hash, index) in &self.token_hashes {
                    if bool::from(hash.ct_eq(&presented)) {
                        found = Some(*index);
                    }
                }
                found.and_then(|index| self.callers.get(index)).cloned()
            }
            Credentials::Certificate(names) => {
                // Every name on the certificate that the policy knows must belong to the same
                // caller; a certificate naming two callers authenticates as neither.
                let mut callers = names.iter().filter_map(|name| self.identities.get(name));
                let first = callers.next()?;
                if callers.any(|other| other != first) {
                    return None;
                }
                self.callers.get(*first).cloned()
            }
            Credentials::None => None,
        }
    }

    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.callers.iter().map(|caller| caller.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_path_is_its_service_and_name() {
        for rpc in Rpc::ALL.into_iter().chain(Rpc::ADMIN) {
            assert_eq!(rpc.path(), format!("{}/{}", rpc.service(), rpc.name()));
            assert_eq!(Rpc::of_path(&format!("/{}", rpc.path())), Some(rpc));
        }
    }

    fn sha(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn sample() -> Policy {
        Policy::parse(&format!(
            r#"
            [[callers]]
            name = "payments-api"
            token_sha256 = ["{}"]
            [[callers.grants]]
            namespaces = ["payments", "pay-eu-*"]
            rpcs = ["*"]

            [[callers]]
            name = "operator"
            tls_identities = ["ops.example"]
            [[callers.grants]]
            namespaces = ["*"]
            rpcs = ["Get"]
            "#,
            sha("s3cret")
        ))
        .expect("valid policy")
    }

    #[test]
    fn authenticates_and_authorises() {
        let policy = sample();
        let ns = |name: &str| Namespace::parse(name.to_string()).expect("namespace");
        let payments = policy
            .authenticate(Credentials::Bearer("s3cret"))
            .expect("known token");
        assert_eq!(payments.name, "payments-api");
        assert!(payments.allows(Rpc::Complete, &ns("payments")));
        assert!(payments.allows(Rpc::Acquire, &ns("pay-eu-1")));
        assert!(!payments.allows(Rpc::Get, &ns("orders")));
        assert!(!payments.allows(Rpc::Get, &ns("paymentsx")));
        assert!(policy.authenticate(Credentials::Bearer("wrong")).is_none());
        assert!(policy.authenticate(Credentials::None).is_none());
        let names = vec!["other".to_string(), "ops.example".to_string()];
        let operator = policy
            .authenticate(Credentials::Certificate(&names))
            .expect("known identity");
        assert!(operator.allows(Rpc::Get, &ns("payments")));
        assert!(!operator.allows(Rpc::Release, &ns("payments")));
    }

    #[test]
    fn admin_grants_are_apart_from_data_plane_grants() {
        let policy = Policy::parse(
            "[[callers]]\nname = \"app\"\ntls_identities = [\"app\"]\n\
             [[callers.grants]]\nnamespaces = [\"*\"]\nrpcs = [\"*\"]\n\
             [[callers]]\nname = \"oncall\"\ntls_identities = [\"oncall\"]\n\
             [[callers.admin_grants]]\nnamespaces = [\"pay*\"]\naccess = [\"admin_read_results\"]\n\
             [[callers.admin_grants]]\nnamespaces = [\"payments\"]\naccess = [\"admin_write\"]\n",
        )
        .expect("valid");
        let ns = |name: &str| Namespace::parse(name.to_string()).expect("namespace");
        let who = |name: &str| {
            let names = vec![name.to_string()];
            policy
                .authenticate(Credentials::Certificate(&names))
                .expect("known")
        };
        let app = who("app");
        assert!(app.allows(Rpc::Acquire, &ns("payments")));
        assert!(!app.has_any_admin(AdminAccess::Read));
        assert!(!app.has_admin(AdminAccess::Read, &ns("payments")));
        let oncall = who("oncall");
        assert!(!oncall.allows(Rpc::Get, &ns("payments")));
        assert!(
            oncall.has_admin(AdminAccess::Read, &ns("pay-eu")),
            "read_results includes read"
        );
        assert!(oncall.has_admin(AdminAccess::ReadResults, &ns("payments")));
        assert!(oncall.has_admin(AdminAccess::Write, &ns("payments")));
        assert!(!oncall.has_admin(AdminAccess::Write, &ns("pay-eu")));
        assert!(!oncall.has_admin(AdminAccess::Read, &ns("orders")));
        // An admin RPC is no data-plane rpc.
        let error = Policy::parse(
            "[[callers]]\nname = \"a\"\ntls_identities = [\"x\"]\n[[callers.grants]]\nnamespaces = [\"n\"]\nrpcs = [\"PurgeRecord\"]\n",
        )
        .expect_err("admin rpc in rpcs");
        assert!(error.contains("unknown rpc"), "{error}");
        let error = Policy::parse(
            "[[callers]]\nname = \"a\"\ntls_identities = [\"x\"]\n[[callers.admin_grants]]\nnamespaces = [\"n\"]\naccess = [\"admin_everything\"]\n",
        )
        .expect_err("unknown access");
        assert!(error.contains("unknown admin access"), "{error}");
    }

    #[test]
    fn a_certificate_naming_two_callers_is_nobody() {
        let policy = Policy::parse(
            "[[callers]]\nname = \"a\"\ntls_identities = [\"a.example\"]\n\
             [[callers]]\nname = \"b\"\ntls_identities = [\"b.example\"]\n",
        )
        .expect("valid");
        let both = vec!["a.example".to_string(), "b.example".to_string()];
        assert!(policy
            .authenticate(Credentials::Certificate(&both))
            .is_none());
        let one = vec!["unknown".to_string(), "b.example".to_string()];
        let caller = policy
            .authenticate(Credentials::Certificate(&one))
            .expect("b");
        assert_eq!(caller.name, "b");
    }

    #[test]
    fn rejects_bad_policies() {
        for (text, fragment) in [
            ("", "no callers"),
            ("[[callers]]\nname = \"a\"\n", "needs token_sha256"),
            ("[[callers]]\nname = \"a\"\ntoken_sha256 = [\"abc\"]\n", "64 hex"),
            ("[[callers]]\nname = \"a\"\ntls_identities = [\"x\"]\n[[callers.grants]]\nnamespaces = [\"n\"]\nrpcs = [\"Delete\"]\n", "unknown rpc"),
            ("[[callers]]\nname = \"a\"\ntls_identities = [\"x\"]\n[[callers.grants]]\nnamespaces = [\"bad ns\"]\nrpcs = [\"*\"]\n", "namespace pattern"),
            ("[[callers]]\nname = \"a\"\ntls_identities = [\"x\"]\n[[callers]]\nname = \"a\"\ntls_identities = [\"y\"]\n", "twice"),
            ("[[callers]]\nname = \"a\"\ntls_identities = [\"x\"]\nsurprise = 1\n", "unknown field"),
            ("not toml at all", "expected"),
        ] {
            let error = Policy::parse(text).expect_err(text);
            assert!(error.contains(fragment), "{text:?}: {error}");
        }
    }
}
