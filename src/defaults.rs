//! Every setting's default, written once. `config` gives them to clap (so `--help` shows them and
//! a flag left unset takes them), and the `Default` impls of `ServerSettings` and `Limits`, and
//! `PostgresConfig::new`, use the same values: a server built in code runs as one started with no
//! flags.

use std::time::Duration;

/// A default duration: the text clap shows and parses, and the same value typed, worked out from
/// the text when the crate is compiled (a text that is not digits followed by `ms`, `s`, `m`, `h`
/// or `d` fails the build), so the two cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationDefault {
    pub text: &'static str,
    pub value: Duration,
}

impl DurationDefault {
    const fn new(text: &'static str) -> Self {
        Self {
            text,
            value: parse_duration(text),
        }
    }
}

/// `<digits><unit>`, read as humantime reads it (`m` is minutes).
const fn parse_duration(text: &str) -> Duration {
    let bytes = text.as_bytes();
    let mut digits = 0;
    let mut amount: u64 = 0;
    while digits < bytes.len() && bytes[digits].is_ascii_digit() {
        amount = amount * 10 + (bytes[digits] - b'0') as u64;
        digits += 1;
    }
    assert!(digits > 0, "a default duration starts with digits");
    let (_, unit) = bytes.split_at(digits);
    match unit {
        [b'm', b's'] => Duration::from_millis(amount),
        [b's'] => Duration::from_secs(amount),
        [b'm'] => Duration::from_secs(amount * 60),
        [b'h'] => Duration::from_secs(amount * 3600),
        [b'd'] => Duration::from_secs(amount * 86_400),
        _ => panic!("a default duration ends in ms, s, m, h or d"),
    }
}

// Listeners.
pub const LISTEN: &str = "127.0.0.1:50051";
pub const METRICS_LISTEN: &str = "127.0.0.1:9464";

// Logs.
pub const LOG_FORMAT: &str = "text";
pub const LOG_LEVEL: &str = "info";

// What callers may ask for (`domain::Limits`).
pub const DEFAULT_LEASE_TTL: DurationDefault = DurationDefault::new("30s");
pub const MIN_LEASE_TTL: DurationDefault = DurationDefault::new("1s");
pub const MAX_LEASE_TTL: DurationDefault = DurationDefault::new("1h");
pub const DEFAULT_RETENTION: DurationDefault = DurationDefault::new("24h");
pub const MIN_RETENTION: DurationDefault = DurationDefault::new("1s");
pub const MAX_RETENTION: DurationDefault = DurationDefault::new("30d");
pub const DEFAULT_WAIT_TIMEOUT: DurationDefault = DurationDefault::new("30s");
pub const MAX_WAIT_TIMEOUT: DurationDefault = DurationDefault::new("5m");
/// Shortest Wait timeout; not a flag.
pub const MIN_WAIT_TIMEOUT: Duration = Duration::from_millis(1);
pub const MAX_RESULT_BYTES: u32 = 1024 * 1024;

// The server (`server::ServerSettings`).
pub const REAPER_INTERVAL: DurationDefault = DurationDefault::new("10s");
pub const REAPER_BATCH: u32 = 1000;
/// Pause between readiness checks of the store; not a flag.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(2);
/// How often a replica adds its per-minute event counts into the database (GetNamespaceStats):
/// what a replica killed with SIGKILL loses at most.
pub const COUNTS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
pub const SHUTDOWN_GRACE: DurationDefault = DurationDefault::new("10s");
pub const MAX_CONCURRENT_RPCS: u32 = 1024;
pub const MAX_WAITERS: u32 = 10_000;
pub const MAX_MESSAGE_BYTES: u32 = 4 * 1024 * 1024;
pub const METRICS_INTERVAL: DurationDefault = DurationDefault::new("15s");
pub const RELOAD_INTERVAL: DurationDefault = DurationDefault::new("5s");

// The memory store.
/// Most records the memory store holds: about 1 KiB each with small results, so the default
/// bounds it near 1 GiB.
pub const MAX_RECORDS: u64 = 1_000_000;

// The PostgreSQL store (`store::postgres::PostgresConfig`).
pub const POOL_SIZE: u16 = 16;
pub const DB_CONNECT_TIMEOUT: DurationDefault = DurationDefault::new("3s");
pub const DB_QUERY_TIMEOUT: DurationDefault = DurationDefault::new("5s");
/// How often a Wait re-reads its record without a notification; not a flag.
pub const DB_WAIT_POLL: Duration = Duration::from_secs(2);
pub const DB_BATCH: u16 = 32;
pub const DB_BATCH_SLOTS: u16 = 2;
pub const REPLAY_CACHE_BYTES: u64 = 16 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// clap reads the text with humantime; the typed value must be what it reads.
    #[test]
    fn duration_texts_mean_their_values() {
        for default in [
            DEFAULT_LEASE_TTL,
            MIN_LEASE_TTL,
            MAX_LEASE_TTL,
            DEFAULT_RETENTION,
            MIN_RETENTION,
            MAX_RETENTION,
            DEFAULT_WAIT_TIMEOUT,
            MAX_WAIT_TIMEOUT,
            REAPER_INTERVAL,
            SHUTDOWN_GRACE,
            METRICS_INTERVAL,
            RELOAD_INTERVAL,
            DB_CONNECT_TIMEOUT,
            DB_QUERY_TIMEOUT,
        ] {
            assert_eq!(
                humantime::parse_duration(default.text).ok(),
                Some(default.value),
                "{}",
                default.text
            );
        }
        assert_eq!(parse_duration("250ms"), Duration::from_millis(250));
        assert_eq!(parse_duration("2m"), Duration::from_secs(120));
    }
}
