//! Send-side rate limit (like QEMU's `max-bandwidth`), so a migration can share a link.
//! Sans-IO: the caller passes the time.

use std::time::{Duration, Instant};

/// A token bucket over bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `bytes_per_sec` sustained, bursts up to `burst` bytes (at least one frame).
    pub fn new(bytes_per_sec: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate: bytes_per_sec.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `bytes` if the bucket holds them; otherwise says how long until it will.
    pub fn take(&mut self, bytes: usize, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let want = (bytes as f64).min(self.burst);
        if self.tokens >= want {
            self.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((want - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sustained_rate_is_the_configured_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, 100_000, t0);
        // Simulate a sender that always waits exactly as told, for 10 simulated seconds.
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            match b.take(65_536, now) {
                Ok(()) => sent += 65_536,
                Err(wait) => now += wait,
            }
        }
        // Burst plus 10 s at 1 MB/s, within one frame.
        let expected = 100_000 + 10_000_000;
        assert!(sent.abs_diff(expected) <= 65_536, "sent {sent}");
    }

    #[test]
    fn frames_larger_than_the_burst_still_pass() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 10, t0);
        assert!(b.take(1000, t0).is_ok());
        // Now in debt: the next one waits for the debt to be repaid.
        let wait = b.take(1, t0).unwrap_err();
        assert!(wait >= Duration::from_millis(990), "{wait:?}");
    }
}
