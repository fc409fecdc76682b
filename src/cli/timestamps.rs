//! Time for the CLI's output: now, and the engine's RFC 3339 timestamps.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses the engine's timestamps (`2024-05-01T12:34:56.123456789Z`, or with an offset) to
/// seconds since the epoch. The zero time (`0001-01-01T00:00:00Z`), or any before 1970, is `None`.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    if t.year() < 1970 {
        return None;
    }
    Some(t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:34:56.123456789Z"),
            Some(1714566896)
        );
        assert_eq!(parse_rfc3339("2024-05-01T14:34:56+02:00"), Some(1714566896));
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), None);
        // Docker's forms: nanoseconds or fewer digits, `Z` or an offset either side of UTC.
        assert_eq!(parse_rfc3339("2024-05-01T12:34:56.5Z"), Some(1714566896));
        assert_eq!(
            parse_rfc3339("2024-05-01T10:04:56.000000001-02:30"),
            Some(1714566896)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(parse_rfc3339("2024-05-01T12:34:56"), None);
    }
}
