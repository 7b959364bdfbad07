//! Jittered exponential backoff: the one retry schedule Keel uses.

use std::time::Duration;

/// Exponential backoff from `min` to `max`, each delay scaled by a random factor in
/// `[1 - jitter, 1]` so that a fleet reconnecting at once spreads out.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
    next: Duration,
    attempts: u32,
}

impl Backoff {
    /// A schedule starting at `min` and doubling up to `max`. `jitter` is clamped to `[0, 1]`.
    pub fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            jitter: jitter.clamp(0.0, 1.0),
            next: min,
            attempts: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the base, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        let factor = 1.0 - self.jitter * rand::random::<f64>();
        base.mul_f64(factor)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over at `min`, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_within_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 0.5);
        let expected = [1, 2, 4, 8, 8, 8];
        for secs in expected {
            let d = b.next_delay();
            let hi = Duration::from_secs(secs);
            assert!(d <= hi && d >= hi / 2, "delay {d:?} outside [{:?}, {hi:?}]", hi / 2);
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn no_jitter_is_exact() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(300), 0.0);
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        assert_eq!(b.next_delay(), Duration::from_millis(300));
    }
}
