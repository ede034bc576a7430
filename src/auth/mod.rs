//! Who may do what: callers authenticate with a bearer token (its SHA-256 is in the policy) or a
//! client certificate (mTLS), and each is confined to the namespaces and RPCs its grants name.
//! The policy file is reloaded without a restart; a bad new file is rejected and the old policy
//! stays.

mod limits;
mod policy;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

pub use limits::{CallerLimiter, CallerPermit, Throttled};
pub use policy::{
    AdminAccess, Caller, CallerLimits, Credentials, Policy, Rpc, ADMIN_SERVICE, DATA_PLANE_SERVICE,
};

use crate::telemetry::metrics;

/// The identities of a TLS client certificate (SAN DNS names, then the CN), attached to each
/// request on an mTLS connection.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentities(pub Arc<Vec<String>>);

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("path", &self.path)
            .finish()
    }
}

/// The live policy, where it came from, and the callers' limiter state.
pub struct AuthState {
    path: PathBuf,
    policy: RwLock<Arc<Policy>>,
    /// The file content the current policy was parsed from, to notice changes.
    loaded: Mutex<Vec<u8>>,
    pub limiter: CallerLimiter,
}

impl AuthState {
    /// Loads the policy file; the error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|error| format!("cannot read auth policy {}: {error}", path.display()))?;
        let policy = parse(path, &bytes)?;
        Ok(Self {
            path: path.to_path_buf(),
            policy: RwLock::new(Arc::new(policy)),
            loaded: Mutex::new(bytes),
            limiter: CallerLimiter::default(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Re-reads the file. Ok(true) when a changed, valid policy took effect; Ok(false) when the
    /// file is unchanged; Err when it is unreadable or invalid (the old policy stays).
    pub fn reload(&self) -> Result<bool, String> {
        let bytes = std::fs::read(&self.path)
            .map_err(|error| format!("cannot read auth policy {}: {error}", self.path.display()))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded == bytes {
            return Ok(false);
        }
        let policy = parse(&self.path, &bytes)?;
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        *loaded = bytes;
        Ok(true)
    }

    /// Reloads and logs the result; for the periodic watch and SIGHUP.
    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(true) => {
                metrics::reloaded("auth_policy", "applied");
                tracing::info!(path = %self.path.display(), "auth policy reloaded")
            }
            Ok(false) => {}
            Err(error) => {
                metrics::reloaded("auth_policy", "rejected");
                tracing::error!(%error, "auth policy NOT reloaded; the previous policy stays in force")
            }
        }
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Policy, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("auth policy {} is not UTF-8", path.display()))?;
    Policy::parse(text).map_err(|error| format!("auth policy {}: {error}", path.display()))
}
