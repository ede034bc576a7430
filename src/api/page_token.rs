//! Page tokens of the admin API's listings: opaque to callers, and checked on the way back in.
//!
//! A token carries the position the next page starts after, and a digest of the listing it
//! belongs to (namespace and every filter). A token of another listing (another namespace, other
//! filters, the audit list), a truncated or altered one, or text that was never a token, is
//! refused with INVALID_ARGUMENT. Tokens are not secret and not signed: they only say where to
//! go on in a listing the caller is already authorised to read, so a forged position shows
//! nothing the caller could not page to; the checks make mistakes loud, not forgery impossible.
//! Unsigned, they stay valid on every replica and across restarts.
//!
//! Layout, hex-encoded: version (1 byte), listing digest (8), position (records: created_at in
//! nanoseconds since the Unix epoch, 8 bytes big-endian, then the key's bytes; audit: the entry
//! id, 8 bytes), checksum (the first 8 bytes of SHA-256 over everything before it).

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::domain::admin::{RecordFilter, RecordPosition};
use crate::domain::{Key, Namespace, RecordState};

const VERSION: u8 = 1;
const DIGEST_BYTES: usize = 8;
const CHECKSUM_BYTES: usize = 8;
/// Longest token accepted: a key of 255 bytes and the fixed parts, hex-encoded.
const MAX_TOKEN_CHARS: usize = 2 * (1 + DIGEST_BYTES + 8 + Key::MAX_BYTES + CHECKSUM_BYTES);

/// What a token that is not one of this listing's says.
pub const NOT_THIS_LISTING: &str = "is not a page token of this listing: pass the previous page's next_page_token, with the same namespace and filters";

fn first8(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// Digest of a records listing: its namespace and filters.
fn records_digest(filter: &RecordFilter) -> [u8; 8] {
    let mut text = format!("records\0{}\0", filter.namespace);
    let mut states: Vec<u8> = filter
        .states
        .iter()
        .map(|state| match state {
            RecordState::InProgress => 1,
            RecordState::Completed => 2,
        })
        .collect();
    states.sort_unstable();
    states.dedup();
    text.push_str(&format!("{states:?}\0{:?}\0", filter.key_prefix));
    text.push_str(&format!("{:?}\0{}\0", filter.holder, filter.stuck_only));
    text.push_str(&format!(
        "{:?}\0{:?}",
        filter.created_after.map(nanos),
        filter.created_before.map(nanos)
    ));
    first8(text.as_bytes())
}

fn audit_digest(namespace: &Namespace) -> [u8; 8] {
    first8(format!("audit\0{namespace}").as_bytes())
}

fn seal(digest: [u8; 8], position: &[u8]) -> String {
    let mut bytes = vec![VERSION];
    bytes.extend_from_slice(&digest);
    bytes.extend_from_slice(position);
    let checksum = first8(&bytes);
    bytes.extend_from_slice(&checksum);
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The position inside a token of the listing with `digest`, or why it is refused.
fn open(token: &str, digest: [u8; 8]) -> Result<Vec<u8>, String> {
    if token.len() > MAX_TOKEN_CHARS || !token.len().is_multiple_of(2) {
        return Err(NOT_THIS_LISTING.into());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| NOT_THIS_LISTING.to_string())?;
    if bytes.len() < 1 + DIGEST_BYTES + CHECKSUM_BYTES {
        return Err(NOT_THIS_LISTING.into());
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
    if first8(body) != checksum || body[0] != VERSION || body[1..1 + DIGEST_BYTES] != digest {
        return Err(NOT_THIS_LISTING.into());
    }
    Ok(body[1 + DIGEST_BYTES..].to_vec())
}

/// The token of the records listing `filter` going on after `position`.
pub fn records_token(filter: &RecordFilter, position: &RecordPosition) -> String {
    let mut bytes = nanos(position.created_at).to_be_bytes().to_vec();
    bytes.extend_from_slice(position.key.as_str().as_bytes());
    seal(records_digest(filter), &bytes)
}

/// The position a records token of listing `filter` names; empty token: the first page.
pub fn records_position(
    token: &str,
    filter: &RecordFilter,
) -> Result<Option<RecordPosition>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    let position = open(token, records_digest(filter))?;
    let (time, key) = position.split_at_checked(8).ok_or(NOT_THIS_LISTING)?;
    let time = u64::from_be_bytes(time.try_into().map_err(|_| NOT_THIS_LISTING)?);
    let key = String::from_utf8(key.to_vec()).map_err(|_| NOT_THIS_LISTING)?;
    let key = Key::parse(key).map_err(|_| NOT_THIS_LISTING)?;
    Ok(Some(RecordPosition {
        created_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(time),
        key,
    }))
}

/// The token of `namespace`'s audit listing going on after entry `id`.
pub fn audit_token(namespace: &Namespace, id: u64) -> String {
    seal(audit_digest(namespace), &id.to_be_bytes())
}

/// The entry id an audit token names; empty token: the first page.
pub fn audit_position(token: &str, namespace: &Namespace) -> Result<Option<u64>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    let position = open(token, audit_digest(namespace))?;
    let id: [u8; 8] = position
        .as_slice()
        .try_into()
        .map_err(|_| NOT_THIS_LISTING)?;
    Ok(Some(u64::from_be_bytes(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(namespace: &str) -> RecordFilter {
        RecordFilter {
            namespace: Namespace::parse(namespace.into()).expect("namespace"),
            states: vec![],
            key_prefix: String::new(),
            holder: None,
            stuck_only: false,
            created_after: None,
            created_before: None,
        }
    }

    #[test]
    fn tokens_round_trip_and_belong_to_their_listing() {
        let position = RecordPosition {
            created_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            key: Key::parse("order/42 é".into()).expect("key"),
        };
        let payments = filter("payments");
        let token = records_token(&payments, &position);
        assert_eq!(
            records_position(&token, &payments).expect("valid"),
            Some(position.clone())
        );
        // Another namespace, other filters, the audit listing: refused.
        assert!(records_position(&token, &filter("orders")).is_err());
        let mut stuck = payments.clone();
        stuck.stuck_only = true;
        assert!(records_position(&token, &stuck).is_err());
        let namespace = Namespace::parse("payments".into()).expect("namespace");
        assert!(audit_position(&token, &namespace).is_err());
        // Any altered character: refused.
        for index in 0..token.len() {
            let mut altered = token.clone().into_bytes();
            altered[index] = if altered[index] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(altered).expect("ascii");
            assert!(records_position(&altered, &payments).is_err(), "{index}");
        }
        for junk in ["x", "00", "zz", &"0".repeat(4000), "ab\u{e9}"] {
            assert!(records_position(junk, &payments).is_err(), "{junk:?}");
        }
        let audit = audit_token(&namespace, 7);
        assert_eq!(audit_position(&audit, &namespace), Ok(Some(7)));
        assert!(records_position(&audit, &payments).is_err());
    }
}
