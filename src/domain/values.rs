//! Validated value types. They are parsed, not validated: once a `Namespace` or `Key` exists it
//! obeys the contract's rules, so code past the wire layer never re-checks strings.

use std::{collections::BTreeMap, fmt, time::Duration};

use crate::defaults;

/// One broken rule of a request: which field, and what the caller must fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path as named in the proto, e.g. `result.metadata`.
    pub field: String,
    /// The rule, phrased as what the field must be.
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// True for the Unicode control characters the contract forbids (C0, DEL and C1).
fn is_forbidden_control(c: char) -> bool {
    matches!(c, '\u{0000}'..='\u{001F}' | '\u{007F}'..='\u{009F}')
}

/// Tenant scope of a key: 1–64 bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(String);

impl Namespace {
    pub const MAX_BYTES: usize = 64;

    pub fn parse(value: String) -> Result<Self, String> {
        if value.is_empty() {
            return Err("is required (1-64 bytes of A-Z a-z 0-9 . _ -)".into());
        }
        if value.len() > Self::MAX_BYTES {
            return Err(format!(
                "must be at most {} bytes, got {}",
                Self::MAX_BYTES,
                value.len()
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "may contain only A-Z a-z 0-9 . _ - (found {:?})",
                bad
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Free text with a byte bound and no control characters: the one rule keys and holders share
/// (a key must also not be empty).
struct BoundedText {
    /// Whether the empty string is refused.
    required: bool,
    max_bytes: usize,
}

impl BoundedText {
    fn parse(&self, value: String) -> Result<String, String> {
        if self.required && value.is_empty() {
            return Err(format!(
                "is required (1-{} bytes of UTF-8 without control characters)",
                self.max_bytes
            ));
        }
        if value.len() > self.max_bytes {
            return Err(format!(
                "must be at most {} bytes, got {}",
                self.max_bytes,
                value.len()
            ));
        }
        if value.chars().any(is_forbidden_control) {
            return Err(
                "must not contain control characters (U+0000-U+001F, U+007F-U+009F)".into(),
            );
        }
        Ok(value)
    }
}

/// An idempotency key: 1–255 bytes of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    pub const MAX_BYTES: usize = 255;
    const RULE: BoundedText = BoundedText {
        required: true,
        max_bytes: Self::MAX_BYTES,
    };

    pub fn parse(value: String) -> Result<Self, String> {
        Self::RULE.parse(value).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Digest of the request a key stands for; at most 64 bytes, empty allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<u8>);

impl Fingerprint {
    pub const MAX_BYTES: usize = 64;

    pub fn parse(value: Vec<u8>) -> Result<Self, String> {
        if value.len() > Self::MAX_BYTES {
            return Err(format!(
                "must be at most {} bytes, got {}",
                Self::MAX_BYTES,
                value.len()
            ));
        }
        Ok(Self(value))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Free-form name of a lease holder; at most 128 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder(String);

impl Holder {
    pub const MAX_BYTES: usize = 128;
    const RULE: BoundedText = BoundedText {
        required: false,
        max_bytes: Self::MAX_BYTES,
    };

    pub fn parse(value: String) -> Result<Self, String> {
        Self::RULE.parse(value).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The secret of one lease: 128 random bits, written on the wire as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LeaseToken([u8; 16]);

impl LeaseToken {
    /// A fresh token from a ChaCha12 CSPRNG per thread, seeded from the operating system's on
    /// first use (a system call per token cost about 1 % of the server's CPU). Fails only if the
    /// operating system cannot seed it.
    pub fn generate() -> Result<Self, getrandom::Error> {
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        thread_local! {
            static RNG: std::cell::RefCell<Option<StdRng>> = const { std::cell::RefCell::new(None) };
        }
        RNG.with_borrow_mut(|rng| {
            let rng = match rng {
                Some(rng) => rng,
                None => {
                    let mut seed = [0u8; 32];
                    getrandom::fill(&mut seed)?;
                    rng.insert(StdRng::from_seed(seed))
                }
            };
            let mut bytes = [0u8; 16];
            rng.fill_bytes(&mut bytes);
            Ok(Self(bytes))
        })
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() {
            return Err(
                "is required: pass Lease.token from the Acquire that granted the lease".into(),
            );
        }
        let raw = value.as_bytes();
        if raw.len() != 32 {
            return Err(format!(
                "must be the 32 hex characters returned in Lease.token, got {} bytes",
                raw.len()
            ));
        }
        let mut bytes = [0u8; 16];
        for (i, pair) in raw.chunks_exact(2).enumerate() {
            let high = hex_value(pair[0]);
            let low = hex_value(pair[1]);
            match (high, low) {
                (Some(h), Some(l)) => bytes[i] = h << 4 | l,
                _ => return Err("must be the 32 hex characters returned in Lease.token".into()),
            }
        }
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Wire form: 32 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(32);
        for byte in self.0 {
            out.push(DIGITS[usize::from(byte >> 4)] as char);
            out.push(DIGITS[usize::from(byte & 0x0f)] as char);
        }
        out
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Lease tokens are secrets: never print them, not even in debug output.
impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(<redacted>)")
    }
}

/// The caller's stored response, replayed verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredResult {
    pub body: Vec<u8>,
    pub code: i32,
    pub metadata: BTreeMap<String, String>,
}

impl StoredResult {
    pub const MAX_METADATA_ENTRIES: usize = 64;
    pub const MAX_METADATA_KEY_BYTES: usize = 256;
    pub const MAX_METADATA_VALUE_BYTES: usize = 16 * 1024;

    /// Checks the result against the limits; every broken rule is reported.
    pub fn parse(
        body: Vec<u8>,
        code: i32,
        metadata: BTreeMap<String, String>,
        max_body_bytes: usize,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if body.len() > max_body_bytes {
            violations.push(FieldViolation::new(
                "result.body",
                format!(
                    "must be at most {} bytes, got {}",
                    max_body_bytes,
                    body.len()
                ),
            ));
        }
        if metadata.len() > Self::MAX_METADATA_ENTRIES {
            violations.push(FieldViolation::new(
                "result.metadata",
                format!(
                    "must have at most {} entries, got {}",
                    Self::MAX_METADATA_ENTRIES,
                    metadata.len()
                ),
            ));
        }
        for (name, value) in &metadata {
            if name.is_empty()
                || name.len() > Self::MAX_METADATA_KEY_BYTES
                || name.chars().any(is_forbidden_control)
            {
                violations.push(FieldViolation::new(
                    "result.metadata",
                    format!(
                        "keys must be 1-{} bytes without control characters (key {:?})",
                        Self::MAX_METADATA_KEY_BYTES,
                        truncate_for_message(name)
                    ),
                ));
            }
            if value.len() > Self::MAX_METADATA_VALUE_BYTES || value.contains('\0') {
                violations.push(FieldViolation::new(
                    "result.metadata",
                    format!(
                        "values must be at most {} bytes without U+0000 (key {:?})",
                        Self::MAX_METADATA_VALUE_BYTES,
                        truncate_for_message(name)
                    ),
                ));
            }
        }
        if violations.is_empty() {
            Ok(Self {
                body,
                code,
                metadata,
            })
        } else {
            Err(violations)
        }
    }
}

fn truncate_for_message(text: &str) -> String {
    text.chars()
        .take(32)
        .filter(|c| !is_forbidden_control(*c))
        .collect()
}

/// Server-side defaults and bounds for the durations callers may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationPolicy {
    pub default: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl DurationPolicy {
    /// `None` (unset or zero on the wire) means the default; anything else must lie in the bounds.
    pub fn resolve(&self, requested: Option<Duration>) -> Result<Duration, String> {
        match requested {
            None => Ok(self.default),
            Some(value) if value < self.min || value > self.max => Err(format!(
                "must be between {:?} and {:?} (unset or zero means {:?}), got {:?}",
                self.min, self.max, self.default, value
            )),
            Some(value) => Ok(value),
        }
    }
}

/// Everything the server lets callers ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub lease_ttl: DurationPolicy,
    pub retention: DurationPolicy,
    pub max_result_body_bytes: usize,
    /// How long one Wait may last.
    pub wait_timeout: DurationPolicy,
}

impl Default for Limits {
    /// What `idemd serve` allows when no flag is given.
    fn default() -> Self {
        Self {
            lease_ttl: DurationPolicy {
                default: defaults::DEFAULT_LEASE_TTL.value,
                min: defaults::MIN_LEASE_TTL.value,
                max: defaults::MAX_LEASE_TTL.value,
            },
            retention: DurationPolicy {
                default: defaults::DEFAULT_RETENTION.value,
                min: defaults::MIN_RETENTION.value,
                max: defaults::MAX_RETENTION.value,
            },
            max_result_body_bytes: defaults::MAX_RESULT_BYTES as usize,
            wait_timeout: DurationPolicy {
                default: defaults::DEFAULT_WAIT_TIMEOUT.value,
                min: defaults::MIN_WAIT_TIMEOUT,
                max: defaults::MAX_WAIT_TIMEOUT.value,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_rules() {
        assert!(Namespace::parse("payments.v2-eu_1".into()).is_ok());
        assert!(Namespace::parse(String::new()).is_err());
        assert!(Namespace::parse("a".repeat(64)).is_ok());
        assert!(Namespace::parse("a".repeat(65)).is_err());
        assert!(Namespace::parse("pay ments".into()).is_err());
        assert!(Namespace::parse("paymënts".into()).is_err());
    }

    #[test]
    fn key_rules() {
        assert!(Key::parse("order-4711/ü".into()).is_ok());
        assert!(Key::parse("k".repeat(255)).is_ok());
        assert!(Key::parse("k".repeat(256)).is_err());
        assert!(Key::parse("a\u{0000}b".into()).is_err());
        assert!(Key::parse("a\u{0085}b".into()).is_err());
        assert!(Key::parse("a\u{007f}".into()).is_err());
        assert!(Key::parse(String::new()).is_err());
    }

    #[test]
    fn holder_rules() {
        assert_eq!(Holder::parse(String::new()), Ok(Holder::default()));
        assert!(Holder::parse("worker-7/ü".into()).is_ok());
        assert!(Holder::parse("h".repeat(128)).is_ok());
        assert!(Holder::parse("h".repeat(129)).is_err());
        assert!(Holder::parse("h\n".into()).is_err());
        assert!(Holder::parse("h\u{009f}".into()).is_err());
    }

    #[test]
    fn lease_token_round_trips_and_rejects_garbage() {
        let token = LeaseToken::generate().expect("os rng");
        let hex = token.to_hex();
        assert_eq!(hex.len(), 32);
        assert_eq!(LeaseToken::parse(&hex).expect("parses"), token);
        assert_eq!(
            LeaseToken::parse(&hex.to_uppercase()).expect("parses"),
            token
        );
        assert!(LeaseToken::parse("").is_err());
        assert!(LeaseToken::parse(&"g".repeat(32)).is_err());
        assert!(LeaseToken::parse(&"é".repeat(16)).is_err());
        assert!(LeaseToken::parse(&"a".repeat(31)).is_err());
        assert_ne!(LeaseToken::generate().expect("os rng"), token);
        assert!(!format!("{token:?}").contains(&hex));
    }

    #[test]
    fn duration_policy() {
        let policy = Limits::default().lease_ttl;
        assert_eq!(policy.resolve(None), Ok(Duration::from_secs(30)));
        assert!(policy.resolve(Some(Duration::from_millis(999))).is_err());
        assert!(policy.resolve(Some(Duration::from_secs(3601))).is_err());
        assert_eq!(
            policy.resolve(Some(Duration::from_secs(3600))),
            Ok(Duration::from_secs(3600))
        );
    }

    #[test]
    fn result_limits() {
        let mut metadata = BTreeMap::new();
        metadata.insert("content-type".to_string(), "application/json".to_string());
        assert!(StoredResult::parse(vec![0; 10], 200, metadata.clone(), 10).is_ok());
        assert!(StoredResult::parse(vec![0; 11], 200, metadata.clone(), 10).is_err());
        metadata.insert(String::new(), "x".into());
        assert!(StoredResult::parse(vec![], 0, metadata, 10).is_err());
        let many = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(StoredResult::parse(vec![], 0, many, 10).is_err());
    }
}
