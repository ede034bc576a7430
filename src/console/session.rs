//! Console sessions, kept on the server: the browser holds only a random 256-bit id in an
//! HttpOnly cookie, so the bearer token it signed in with never reaches a URL, a script or
//! browser storage. Each session has its own CSRF token for the forms that change something.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// Name of the session cookie.
pub const COOKIE: &str = "idemd_console";
/// A session ends this long after sign-in, however busy.
pub const MAX_AGE: Duration = Duration::from_secs(8 * 3600);
/// A session ends after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Most sessions held at once; signing in past it ends the least recently used one, so a flood
/// of sign-ins cannot grow memory without bound.
pub const MAX_SESSIONS: usize = 1_000;

/// What a session signed in with, checked against the policy in force on every request (so a
/// token or certificate removed from the policy ends its sessions).
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Auth is off: nothing to check.
    Open,
    /// A bearer token.
    Token(String),
    /// The identities of a client certificate; the session holds only on a connection with it.
    Certificate(Vec<String>),
}

/// What the server remembers of a signed-in browser.
#[derive(Clone)]
pub struct Session {
    pub credential: Credential,
    /// The synchronizer token every state-changing form carries.
    pub csrf: String,
    signed_in: Instant,
    last_seen: Instant,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }

    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.signed_in) < MAX_AGE
            && now.duration_since(self.last_seen) < IDLE_TIMEOUT
    }
}

/// The sessions of one console listener.
#[derive(Default)]
pub struct Sessions {
    // A std Mutex, not tokio's: nothing is awaited while it is held.
    by_id: Mutex<HashMap<String, Session>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the system's random number generator failed: {0}")]
pub struct RandomFailed(String);

/// 32 random bytes as 64 hex digits.
fn random_id() -> Result<String, RandomFailed> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| RandomFailed(error.to_string()))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

impl Sessions {
    /// Starts a session for `credential`; returns its id (the cookie's value).
    pub fn create(&self, credential: Credential) -> Result<String, RandomFailed> {
        self.create_at(credential, Instant::now())
    }

    fn create_at(&self, credential: Credential, now: Instant) -> Result<String, RandomFailed> {
        let id = random_id()?;
        let session = Session {
            credential,
            csrf: random_id()?,
            signed_in: now,
            last_seen: now,
        };
        let mut sessions = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, session| session.live(now));
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, session)| session.last_seen)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session);
        Ok(id)
    }

    /// The live session `id` names, marked as seen now; an expired one is forgotten.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let mut sessions = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let session = sessions.get_mut(id)?;
        if !session.live(now) {
            sessions.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Ends session `id` (sign-out, or its token no longer in the policy).
    pub fn end(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_256_bits() {
        let sessions = Sessions::default();
        let a = sessions.create(Credential::Open).expect("random");
        let b = sessions.create(Credential::Open).expect("random");
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        let session = sessions.get(&a).expect("live");
        assert_ne!(session.csrf, a, "the CSRF token is not the session id");
    }

    #[test]
    fn sessions_expire_when_idle_and_at_their_maximum_age() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let idle = sessions.create_at(Credential::Open, start).expect("random");
        assert!(sessions
            .get_at(&idle, start + IDLE_TIMEOUT - Duration::from_secs(1))
            .is_some());
        assert!(sessions
            .get_at(&idle, start + 2 * IDLE_TIMEOUT - Duration::from_secs(2))
            .is_some());
        assert!(sessions.get_at(&idle, start + 3 * IDLE_TIMEOUT).is_none());

        let busy = sessions.create_at(Credential::Open, start).expect("random");
        let mut now = start;
        while now + Duration::from_secs(600) < start + MAX_AGE {
            now += Duration::from_secs(600);
            assert!(sessions.get_at(&busy, now).is_some());
        }
        assert!(sessions.get_at(&busy, start + MAX_AGE).is_none());
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let sessions = Sessions::default();
        let id = sessions.create(Credential::Open).expect("random");
        let session = sessions.get(&id).expect("live");
        assert!(session.csrf_matches(&session.csrf.clone()));
        assert!(!session.csrf_matches(""));
        assert!(!session.csrf_matches(&session.csrf[1..]));
        assert!(!session.csrf_matches(&id));
    }

    #[test]
    fn the_store_is_bounded() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let first = sessions.create_at(Credential::Open, start).expect("random");
        for n in 1..=MAX_SESSIONS {
            let at = start + Duration::from_millis(n as u64);
            sessions.create_at(Credential::Open, at).expect("random");
        }
        assert!(
            sessions.get(&first).is_none(),
            "the oldest session made room"
        );
        let held = sessions.by_id.lock().expect("lock").len();
        assert_eq!(held, MAX_SESSIONS);
    }
}
