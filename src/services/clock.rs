//! Wall-clock formats the time services share.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Local, Utc};

/// Which time zone the text formats use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Zone {
    /// The server's local time zone (`TZ`, `/etc/localtime`).
    #[default]
    Local,
    /// Coordinated Universal Time.
    Utc,
}

/// `now` in C's `ctime` format without the newline:
/// `Sat Nov 21 20:23:00 2026` (day of month padded with a space).
pub fn ctime(now: SystemTime, zone: Zone) -> String {
    const FORMAT: &str = "%a %b %e %H:%M:%S %Y";
    let utc: DateTime<Utc> = now.into();
    match zone {
        Zone::Utc => utc.format(FORMAT).to_string(),
        Zone::Local => utc.with_timezone(&Local).format(FORMAT).to_string(),
    }
}

/// Seconds from 1900-01-01 00:00 UTC to the Unix epoch (RFC 868).
pub const SECONDS_1900_TO_1970: u64 = 2_208_988_800;

/// `now` as RFC 868 time: seconds since 1900 as a 32-bit big-endian
/// number, wrapping modulo 2^32 (first in February 2036).
pub fn rfc868(now: SystemTime) -> [u8; 4] {
    let unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let since_1900 = (unix + SECONDS_1900_TO_1970) % (1 << 32);
    (since_1900 as u32).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ctime_matches_c() {
        // 2026-11-21 20:23:00 UTC, and a single-digit day.
        let t = UNIX_EPOCH + Duration::from_secs(1_795_292_580);
        assert_eq!(ctime(t, Zone::Utc), "Sat Nov 21 20:23:00 2026");
        let t = UNIX_EPOCH + Duration::from_secs(1_793_491_200);
        assert_eq!(ctime(t, Zone::Utc), "Sun Nov  1 00:00:00 2026");
    }

    #[test]
    fn rfc868_counts_from_1900_and_wraps() {
        assert_eq!(rfc868(UNIX_EPOCH), 2_208_988_800u32.to_be_bytes());
        // 2036-02-07 06:28:16 UTC is 2^32 seconds after 1900: wraps to 0.
        let wrap = UNIX_EPOCH + Duration::from_secs((1 << 32) - SECONDS_1900_TO_1970);
        assert_eq!(rfc868(wrap), [0, 0, 0, 0]);
    }
}
