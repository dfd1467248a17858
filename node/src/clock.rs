//! Wall-clock time where it must be shared between nodes. Timers and timeouts go through
//! tokio's clock (`clippy.toml` bans `std::time::Instant`); this module is only for
//! absolute times that other nodes read: a binding's expiry, a nonce's issue time.

/// Unix time in milliseconds. Binding expiry is absolute and replicated, so every node
/// must read it against the same clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
