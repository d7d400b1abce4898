//! Per-token rate limit and daily quota, as the real API applies them.
//!
//! Burst limit: a fixed window of `interval` that opens at the token's first request after
//! the previous window ended; at most `max` requests are accepted in it. A client that fires
//! `max` requests at the end of one window and `max` at the start of the next is accepted
//! both times, so [`Limiter::max_in_window`] measures separately, over a *sliding* window,
//! the most requests ever accepted within `interval` for one token: a client that paces
//! itself correctly keeps it at or below `max`.
//!
//! Daily quota: a count per token, reset 24 hours after the day's first request or by
//! [`Limiter::reset_daily`]. Rejected requests count against neither limit.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const DAY: Duration = Duration::from_secs(86_400);
/// Window used for `max_in_window` when the burst limit is off.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) struct Limiter {
    burst: Option<(u32, Duration)>,
    daily: Option<u64>,
    tokens: Mutex<HashMap<String, TokenState>>,
}

struct TokenState {
    window_start: Instant,
    in_window: u32,
    day_start: Instant,
    today: u64,
    /// Accepted request times within the last interval (sliding), oldest first.
    recent: VecDeque<Instant>,
    max_in_window: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// Over the burst limit; the window reopens after the duration.
    Burst(Duration),
    /// Over the daily quota; the day resets after the duration.
    Daily(Duration),
}

/// Values for the `X-RateLimit-*` headers; `None` when that limit is off.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RateHeaders {
    /// (max, remaining, interval ms)
    pub burst: Option<(u32, u32, u128)>,
    /// (limit, remaining)
    pub daily: Option<(u64, u64)>,
}

impl Limiter {
    pub(crate) fn new(burst: Option<(u32, Duration)>, daily: Option<u64>) -> Limiter {
        Limiter {
            burst,
            daily,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn interval(&self) -> Duration {
        self.burst.map_or(DEFAULT_INTERVAL, |(_, i)| i)
    }

    /// Headers for a request that is not counted (no token): nothing used.
    pub(crate) fn untouched(&self) -> RateHeaders {
        RateHeaders {
            burst: self.burst.map(|(m, i)| (m, m, i.as_millis())),
            daily: self.daily.map(|d| (d, d)),
        }
    }

    /// Decides whether `token` may make a request at `now`, and counts it if so.
    pub(crate) fn admit(&self, token: &str, now: Instant) -> (Verdict, RateHeaders) {
        let interval = self.interval();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if !tokens.contains_key(token) {
            tokens.insert(
                token.to_string(),
                TokenState {
                    window_start: now,
                    in_window: 0,
                    day_start: now,
                    today: 0,
                    recent: VecDeque::new(),
                    max_in_window: 0,
                },
            );
        }
        let Some(st) = tokens.get_mut(token) else {
            return (Verdict::Allowed, self.untouched());
        };
        if now.duration_since(st.window_start) >= interval {
            st.window_start = now;
            st.in_window = 0;
        }
        if now.duration_since(st.day_start) >= DAY {
            st.day_start = now;
            st.today = 0;
        }
        let verdict = match (self.daily, self.burst) {
            (Some(d), _) if st.today >= d => Verdict::Daily(DAY - now.duration_since(st.day_start)),
            (_, Some((max, i))) if st.in_window >= max => {
                Verdict::Burst(i.saturating_sub(now.duration_since(st.window_start)))
            }
            _ => {
                st.in_window += 1;
                st.today += 1;
                while st
                    .recent
                    .front()
                    .is_some_and(|&t| now.duration_since(t) >= interval)
                {
                    st.recent.pop_front();
                }
                st.recent.push_back(now);
                st.max_in_window = st.max_in_window.max(st.recent.len() as u64);
                Verdict::Allowed
            }
        };
        let headers = RateHeaders {
            burst: self
                .burst
                .map(|(m, i)| (m, m.saturating_sub(st.in_window), i.as_millis())),
            daily: self.daily.map(|d| (d, d.saturating_sub(st.today))),
        };
        (verdict, headers)
    }

    pub(crate) fn reset_daily(&self) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for st in tokens.values_mut() {
            st.today = 0;
        }
    }

    /// The most requests accepted for one token within any sliding window of `interval`.
    pub(crate) fn max_in_window(&self) -> u64 {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.values().map(|s| s.max_in_window).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_window_rejects_over_max_and_reopens() {
        let lim = Limiter::new(Some((3, Duration::from_secs(10))), None);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(lim.admit("a", t0).0, Verdict::Allowed);
        }
        let (v, h) = lim.admit("a", t0 + Duration::from_secs(4));
        assert_eq!(v, Verdict::Burst(Duration::from_secs(6)));
        assert_eq!(h.burst, Some((3, 0, 10_000)));
        // Another token has its own window.
        assert_eq!(lim.admit("b", t0).0, Verdict::Allowed);
        assert_eq!(
            lim.admit("a", t0 + Duration::from_secs(10)).0,
            Verdict::Allowed
        );
    }

    #[test]
    fn max_in_window_is_sliding() {
        let lim = Limiter::new(Some((3, Duration::from_secs(10))), None);
        let t0 = Instant::now();
        lim.admit("a", t0);
        for _ in 0..3 {
            lim.admit("a", t0 + Duration::from_secs(9)); // the third is rejected
        }
        assert_eq!(lim.max_in_window(), 3);
        // The fixed window reopens at 10 s, but 9 s..11 s holds 2 + 2 accepted requests.
        for _ in 0..2 {
            lim.admit("a", t0 + Duration::from_secs(11));
        }
        assert_eq!(lim.max_in_window(), 4);
    }

    #[test]
    fn daily_quota_until_reset() {
        let lim = Limiter::new(None, Some(2));
        let t0 = Instant::now();
        assert_eq!(lim.admit("a", t0).0, Verdict::Allowed);
        let (_, h) = lim.admit("a", t0);
        assert_eq!(h.daily, Some((2, 0)));
        assert!(matches!(lim.admit("a", t0).0, Verdict::Daily(_)));
        lim.reset_daily();
        assert_eq!(lim.admit("a", t0).0, Verdict::Allowed);
    }
}
