//! Per-caller limits, so one noisy or hostile caller cannot starve the others: a concurrency cap
//! and a token-bucket rate. Their state outlives policy reloads.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::policy::CallerLimits;

/// Why a caller was held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Concurrency,
    Rate,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

struct CallerState {
    limits: CallerLimits,
    concurrency: Option<Arc<Semaphore>>,
    bucket: Mutex<Bucket>,
}

impl CallerState {
    fn new(limits: CallerLimits) -> Self {
        Self {
            limits,
            concurrency: limits
                .max_concurrent_rpcs
                .map(|max| Arc::new(Semaphore::new(max as usize))),
            bucket: Mutex::new(Bucket {
                tokens: limits.rate_per_second.unwrap_or(0.0).max(1.0),
                refilled: Instant::now(),
            }),
        }
    }

    fn take_token(&self) -> bool {
        let Some(rate) = self.limits.rate_per_second else {
            return true;
        };
        let burst = rate.max(1.0);
        // A std Mutex: held for a few arithmetic operations, never across an await.
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Holds a caller's concurrency slot for the life of one RPC.
pub struct CallerPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Limiter state of every caller, by name.
#[derive(Default)]
pub struct CallerLimiter {
    callers: Mutex<HashMap<String, Arc<CallerState>>>,
}

impl CallerLimiter {
    /// Admits one RPC of `caller`, or says which limit it hit. Never waits.
    pub fn admit(&self, caller: &str, limits: CallerLimits) -> Result<CallerPermit, Throttled> {
        let state = {
            let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
            let state = callers
                .entry(caller.to_string())
                .or_insert_with(|| Arc::new(CallerState::new(limits)));
            if state.limits != limits {
                // The policy changed this caller's limits: start afresh with the new ones.
                *state = Arc::new(CallerState::new(limits));
            }
            state.clone()
        };
        if !state.take_token() {
            return Err(Throttled::Rate);
        }
        match &state.concurrency {
            None => Ok(CallerPermit(None)),
            Some(semaphore) => semaphore
                .clone()
                .try_acquire_owned()
                .map(|permit| CallerPermit(Some(permit)))
                .map_err(|_| Throttled::Concurrency),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_and_concurrency() {
        let limiter = CallerLimiter::default();
        let limits = CallerLimits {
            max_concurrent_rpcs: Some(2),
            rate_per_second: Some(3.0),
        };
        let first = limiter.admit("a", limits).expect("1");
        let second = limiter.admit("a", limits).expect("2");
        assert_eq!(
            limiter.admit("a", limits).err(),
            Some(Throttled::Concurrency)
        );
        drop((first, second));
        assert_eq!(limiter.admit("a", limits).err(), Some(Throttled::Rate));
        tokio::time::advance(std::time::Duration::from_millis(400)).await;
        assert!(limiter.admit("a", limits).is_ok());
        // Another caller has its own budget.
        assert!(limiter.admit("b", limits).is_ok());
    }
}
