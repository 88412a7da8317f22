//! A connection's command rate: max_commands_per_second as a token bucket holding two
//! seconds' worth. Past it the connection is closed with 4005.

/// max_commands_per_second as a token bucket holding two seconds' worth.
pub(crate) struct CommandRate {
    rate: f64,
    tokens: f64,
    refilled: std::time::Instant,
}

impl CommandRate {
    pub(crate) fn new(rate: usize) -> CommandRate {
        CommandRate {
            rate: rate as f64,
            tokens: 2.0 * rate as f64,
            refilled: std::time::Instant::now(),
        }
    }

    /// Takes one command's token; false when the connection is over its rate.
    pub(crate) fn take(&mut self, now: std::time::Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_burst_of_two_seconds_then_the_rate() {
        let t = Instant::now();
        let mut rate = CommandRate::new(10);
        rate.refilled = t;
        assert_eq!((0..25).filter(|_| rate.take(t)).count(), 20);
        assert!(!rate.take(t));
        assert!(
            rate.take(t + Duration::from_millis(100)),
            "one more after 0.1 s"
        );
        assert!(!rate.take(t + Duration::from_millis(100)));
        let mut unlimited = CommandRate::new(0);
        assert!((0..1000).all(|_| unlimited.take(t)));
    }
}
