//! The wall clock, in microseconds since the Unix epoch: event timestamps, tombstones, the
//! creation time of data keys. One function so every timestamp Kuma writes has one source.

/// Now, in µs since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
