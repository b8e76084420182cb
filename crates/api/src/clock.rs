//! Wall-clock time as the APIs carry it: seconds (or milliseconds) since the Unix
//! epoch. A clock set before 1970 reads as 0 rather than failing: timestamps here
//! describe, they never decide access (token expiry uses the JWT library's own check).

use std::time::{SystemTime, UNIX_EPOCH};

fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Whole seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

/// Seconds since the Unix epoch with a fraction (audit records).
pub fn unix_secs_f64() -> f64 {
    since_epoch().as_secs_f64()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}
