//! The caller's deadline, from the `grpc-timeout` request header, so stores can stop (and cancel
//! their database work) when the caller has stopped waiting.

use std::time::Duration;

use tokio::time::Instant;
use tonic::codegen::http::HeaderMap;

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = value.strip_suffix(unit)?;
    let unit = unit.to_string();
    let unit = unit.as_str();
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// When idemd must have answered, if the caller set a deadline: a little before the caller's
/// own (5 %, at most 20 ms), so the store's DEADLINE_EXCEEDED — with its database work cancelled —
/// wins the race against tonic abandoning the call.
pub fn from_headers(headers: &HeaderMap, received: Instant) -> Option<Instant> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    let margin = (timeout / 20).min(Duration::from_millis(20));
    received.checked_add(timeout - margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", "ééS"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
