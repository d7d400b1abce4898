//! Rate limit and daily quota per token and location, as the real API applies them ("per app
//! per location").
//!
//! Each (token, location) pair has its own counters. The real API binds a location token to
//! its location, so there a token is one app at one location; the simulator accepts any
//! static bearer token for any location, so it keys by both: one token used for 200
//! locations (a pipeline whose `[auth]` token serves every location) gets 200 budgets, as
//! 200 location tokens of one app would, not one budget shared by all. A request whose
//! location is unknown (an undecodable contact id, say) counts under the token with an empty
//! location. With one location served, this is exactly a limit per token.
//!
//! Burst limit: a fixed window of `interval` that opens at the pair's first request after
//! the previous window ended; at most `max` requests are accepted in it. A client that fires
//! `max` requests at the end of one window and `max` at the start of the next is accepted
//! both times, so [`Limiter::max_in_window`] measures separately, over a *sliding* window,
//! the most requests ever accepted within `interval` for one pair: a client that paces
//! itself correctly keeps it at or below `max`.
//!
//! Daily quota: a count per pair, reset 24 hours after the day's first request or by
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
    /// token -> location -> counters (nested so that a lookup allocates nothing).
    tokens: Mutex<HashMap<String, HashMap<String, PairState>>>,
}

/// The counters of one (token, location) pair.
struct PairState {
    window_start: Instant,
    in_window: u32,
    day_start: Instant,
    today: u64,
    /// Accepted request times within the last interval (sliding), oldest first.
    recent: VecDeque<Instant>,
    max_in_window: u64,
    /// Accepted requests, and when the first and the last of them came.
    accepted: u64,
    first: Instant,
    last: Instant,
}

/// What one location was served, over all tokens: [`Limiter::by_location`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LocationTraffic {
    /// Requests accepted (not refused by the burst limit or the quota).
    pub accepted: u64,
    /// Seconds from the first accepted request to the last.
    pub span_secs: f64,
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

    /// Decides whether `token` may make a request to `location` at `now`, and counts it if
    /// so; the headers describe that pair's window and day.
    pub(crate) fn admit(
        &self,
        token: &str,
        location: &str,
        now: Instant,
    ) -> (Verdict, RateHeaders) {
        let interval = self.interval();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if !tokens.contains_key(token) {
            tokens.insert(token.to_string(), HashMap::new());
        }
        let Some(locations) = tokens.get_mut(token) else {
            return (Verdict::Allowed, self.untouched());
        };
        if !locations.contains_key(location) {
            locations.insert(
                location.to_string(),
                PairState {
                    window_start: now,
                    in_window: 0,
                    day_start: now,
                    today: 0,
                    recent: VecDeque::new(),
                    max_in_window: 0,
                    accepted: 0,
                    first: now,
                    last: now,
                },
            );
        }
        let Some(st) = locations.get_mut(location) else {
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
                if st.accepted == 0 {
                    st.first = now;
                }
                st.accepted += 1;
                st.last = now;
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
        for st in tokens.values_mut().flat_map(HashMap::values_mut) {
            st.today = 0;
        }
    }

    /// Per location (the empty string: requests naming none), the requests accepted and the
    /// time between the first and the last: a paced client's share of its limit as the server
    /// sees it, free of the client's own start-up and final writes.
    pub(crate) fn by_location(&self) -> std::collections::BTreeMap<String, LocationTraffic> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let mut spans: HashMap<&str, (u64, Instant, Instant)> = HashMap::new();
        for (location, st) in tokens.values().flat_map(|l| l.iter()) {
            if st.accepted == 0 {
                continue;
            }
            let e = spans
                .entry(location.as_str())
                .or_insert((0, st.first, st.last));
            *e = (e.0 + st.accepted, e.1.min(st.first), e.2.max(st.last));
        }
        spans
            .into_iter()
            .map(|(location, (accepted, first, last))| {
                let span_secs = last.duration_since(first).as_secs_f64();
                (
                    location.to_owned(),
                    LocationTraffic {
                        accepted,
                        span_secs,
                    },
                )
            })
            .collect()
    }

    /// The most requests accepted for one (token, location) pair within any sliding window
    /// of `interval`.
    pub(crate) fn max_in_window(&self) -> u64 {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .values()
            .flat_map(HashMap::values)
            .map(|s| s.max_in_window)
            .max()
            .unwrap_or(0)
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
            assert_eq!(lim.admit("a", "L", t0).0, Verdict::Allowed);
        }
        let (v, h) = lim.admit("a", "L", t0 + Duration::from_secs(4));
        assert_eq!(v, Verdict::Burst(Duration::from_secs(6)));
        assert_eq!(h.burst, Some((3, 0, 10_000)));
        // Another token has its own window.
        assert_eq!(lim.admit("b", "L", t0).0, Verdict::Allowed);
        assert_eq!(
            lim.admit("a", "L", t0 + Duration::from_secs(10)).0,
            Verdict::Allowed
        );
    }

    #[test]
    fn max_in_window_is_sliding() {
        let lim = Limiter::new(Some((3, Duration::from_secs(10))), None);
        let t0 = Instant::now();
        lim.admit("a", "L", t0);
        for _ in 0..3 {
            lim.admit("a", "L", t0 + Duration::from_secs(9)); // the third is rejected
        }
        assert_eq!(lim.max_in_window(), 3);
        // The fixed window reopens at 10 s, but 9 s..11 s holds 2 + 2 accepted requests.
        for _ in 0..2 {
            lim.admit("a", "L", t0 + Duration::from_secs(11));
        }
        assert_eq!(lim.max_in_window(), 4);
    }

    #[test]
    fn daily_quota_until_reset() {
        let lim = Limiter::new(None, Some(2));
        let t0 = Instant::now();
        assert_eq!(lim.admit("a", "L", t0).0, Verdict::Allowed);
        let (_, h) = lim.admit("a", "L", t0);
        assert_eq!(h.daily, Some((2, 0)));
        assert!(matches!(lim.admit("a", "L", t0).0, Verdict::Daily(_)));
        lim.reset_daily();
        assert_eq!(lim.admit("a", "L", t0).0, Verdict::Allowed);
    }

    /// The defect: one token used for many locations (a pipeline's shared `[auth]` token)
    /// had one window for all of them, so 200 locations together got one location's limit;
    /// the API counts per app per location.
    #[test]
    fn one_token_at_many_locations_has_a_limit_per_location() {
        let lim = Limiter::new(Some((3, Duration::from_secs(10))), Some(5));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(lim.admit("t", "A", t0).0, Verdict::Allowed);
        }
        assert!(matches!(lim.admit("t", "A", t0).0, Verdict::Burst(_)));
        // Location B's window and day are its own: full, whatever A used.
        let (v, h) = lim.admit("t", "B", t0);
        assert_eq!(v, Verdict::Allowed);
        assert_eq!(h.burst, Some((3, 2, 10_000)));
        assert_eq!(h.daily, Some((5, 4)));
        assert_eq!(lim.max_in_window(), 3);
    }

    #[test]
    fn traffic_per_location_counts_accepted_requests_over_all_tokens() {
        let lim = Limiter::new(Some((2, Duration::from_secs(10))), None);
        let t0 = Instant::now();
        lim.admit("t", "A", t0);
        lim.admit("t", "A", t0 + Duration::from_secs(1));
        lim.admit("t", "A", t0 + Duration::from_secs(2)); // refused: not counted
        lim.admit("u", "A", t0 + Duration::from_secs(4));
        lim.admit("t", "B", t0 + Duration::from_secs(3));
        let by = lim.by_location();
        assert_eq!(
            by.get("A"),
            Some(&LocationTraffic {
                accepted: 3,
                span_secs: 4.0
            })
        );
        assert_eq!(
            by.get("B"),
            Some(&LocationTraffic {
                accepted: 1,
                span_secs: 0.0
            })
        );
    }
}
