//! Request pacing for one location.
//!
//! The API allows `max` requests per `interval` (100 per 10 s) per app and location, and
//! answers 429 beyond it. Its window semantics are undocumented (fixed, sliding or a bucket),
//! so the pacer spaces requests evenly, `interval / max` apart plus a small safety margin, and
//! a guard over the actual release times keeps every window of the quota's length below
//! `max`: that never exceeds `max` in any window of any kind and sustains ~98.5% of the limit.
//! Slots missed in a stall (slow replies holding every permit, a busy thread) are made up
//! afterwards, faster than the even pace but within the window guard: the API calls its
//! 100 per 10 s a burst limit, and a stall must not cost the location its share.
//!
//! The pacer learns from every response: `X-RateLimit-Max` / `X-RateLimit-Interval-Milliseconds`
//! stricter than the configured quota replace it; `X-RateLimit-Remaining: 0` pauses briefly;
//! a 429 pauses for `Retry-After` (or a tenth of the window) and slows the pace by a factor
//! that decays once the 429s stop. The daily quota (`X-RateLimit-Daily-Remaining`) is recorded
//! for the caller, who decides when to stop.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// `max` requests per `interval`. A zero quota is unrepresentable.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub max: NonZeroU32,
    pub interval: Duration,
}

impl Quota {
    /// The API's documented burst limit: 100 requests per 10 seconds.
    pub const API_DEFAULT: Quota = Quota {
        max: match NonZeroU32::new(100) {
            Some(n) => n,
            None => unreachable!(),
        },
        interval: Duration::from_secs(10),
    };

    pub fn per_second(&self) -> f64 {
        f64::from(self.max.get()) / self.interval.as_secs_f64()
    }

    fn spacing(&self) -> Duration {
        self.interval / self.max.get()
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.interval.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}/{}s", self.max, ms / 1000)
        } else {
            write!(f, "{}/{}ms", self.max, ms)
        }
    }
}

/// Parses `100/10s`, `600/1m`, `5/500ms`, `10/s`.
impl FromStr for Quota {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("invalid rate limit '{s}': expected REQUESTS/INTERVAL such as 100/10s, 600/1m or 5/500ms (or 'off')")
        };
        let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let max: u32 = n.trim().parse().map_err(|_| bad())?;
        let max = NonZeroU32::new(max).ok_or_else(|| {
            format!("invalid rate limit '{s}': the request count must be at least 1")
        })?;
        let per = per.trim();
        let split = per
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(per.len());
        let (num, unit) = per.split_at(split);
        let num: f64 = if num.is_empty() {
            1.0
        } else {
            num.parse().map_err(|_| bad())?
        };
        let secs = match unit {
            "ms" => num / 1000.0,
            "s" | "sec" => num,
            "m" | "min" => num * 60.0,
            "h" => num * 3600.0,
            _ => return Err(bad()),
        };
        if !(secs > 0.0 && secs.is_finite()) {
            return Err(format!(
                "invalid rate limit '{s}': the interval must be positive"
            ));
        }
        Ok(Quota {
            max,
            interval: Duration::from_secs_f64(secs),
        })
    }
}

/// The rate-limit headers of one response; any may be missing.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub max: Option<u32>,
    pub remaining: Option<u32>,
    pub interval_ms: Option<u64>,
    pub daily_limit: Option<u64>,
    pub daily_remaining: Option<u64>,
}

impl RateHeaders {
    /// Reads the `X-RateLimit-*` headers (names are case-insensitive in `HeaderMap`).
    pub fn from_headers(h: &reqwest::header::HeaderMap) -> Self {
        fn num<T: FromStr>(h: &reqwest::header::HeaderMap, name: &str) -> Option<T> {
            h.get(name)?.to_str().ok()?.trim().parse().ok()
        }
        RateHeaders {
            max: num(h, "x-ratelimit-max"),
            remaining: num(h, "x-ratelimit-remaining"),
            interval_ms: num(h, "x-ratelimit-interval-milliseconds"),
            daily_limit: num(h, "x-ratelimit-limit-daily"),
            daily_remaining: num(h, "x-ratelimit-daily-remaining"),
        }
    }

    fn quota(&self) -> Option<Quota> {
        let max = NonZeroU32::new(self.max?)?;
        let interval = Duration::from_millis(self.interval_ms.filter(|&ms| ms > 0)?);
        Some(Quota { max, interval })
    }
}

/// Safety margin on the spacing: 1.5% keeps a window's count one or two below the limit when
/// requests arrive at the server with some jitter.
const MARGIN: f64 = 1.015;
/// Margin of the window guard, smaller than the spacing's: the difference (one request per
/// window of 100) is what a stall can be made up with.
const GUARD_MARGIN: f64 = 1.01;
/// The guard counts releases over the quota's window plus this much. The server counts
/// arrivals, and a request released earlier can reach it after one released later (a slower
/// connection, a busy thread on either side): releases that fit a window stretched by the
/// arrival jitter also fit every window of arrivals. Under 0.5% of a 10 s window, so the
/// even spacing clears the guard, narrowly: at 100 per 10 s, 99 slots span 10.0485 s, 8.5 ms
/// more than the guard's window. It holds catch-up bursts, and a request whose predecessor
/// one window earlier went out more than those 8.5 ms late.
const GUARD_JITTER: Duration = Duration::from_millis(40);
/// Most the 429 penalty may slow the pace.
const MAX_PENALTY: f64 = 8.0;

#[derive(Debug)]
struct State {
    configured: Option<Quota>,
    /// The quota the server announced, when stricter than the configured one.
    server: Option<Quota>,
    /// >= 1; multiplies the spacing after 429s, decays back to 1.
    penalty: f64,
    last_penalty_change: Option<Instant>,
    /// The earliest instant the next request may start.
    next: Instant,
    paused_until: Option<Instant>,
    /// When the most recent requests were actually released, newest last (at most `max`).
    sent: std::collections::VecDeque<Instant>,
    daily_remaining: Option<u64>,
    daily_limit: Option<u64>,
}

impl State {
    fn effective(&self) -> Option<Quota> {
        match (self.configured, self.server) {
            (Some(c), Some(s)) => Some(if s.per_second() < c.per_second() {
                s
            } else {
                c
            }),
            (c, s) => c.or(s),
        }
    }

    fn spacing(&self) -> Duration {
        match self.effective() {
            Some(q) => q.spacing().mul_f64(MARGIN * self.penalty),
            None if self.penalty > 1.0 => Duration::from_millis(10).mul_f64(self.penalty),
            None => Duration::ZERO,
        }
    }

    fn window(&self) -> Duration {
        self.effective()
            .map(|q| q.interval)
            .unwrap_or(Duration::from_secs(10))
    }
}

/// Paces the requests of one location. Shared by every task that calls the API for it.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<State>,
}

impl RateLimiter {
    /// `None`: no pacing of our own, but the server's announced limit is still honoured.
    pub fn new(quota: Option<Quota>) -> Self {
        RateLimiter {
            state: Mutex::new(State {
                configured: quota,
                server: None,
                penalty: 1.0,
                last_penalty_change: None,
                next: Instant::now(),
                paused_until: None,
                sent: std::collections::VecDeque::new(),
                daily_remaining: None,
                daily_limit: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this request's turn and returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        self.acquire_then(|| async {}).await.0
    }

    /// Like [`acquire`](Self::acquire), and takes `gate` (a concurrency permit shared with
    /// other limiters, say) once this request's pacing wait is over and before its release is
    /// recorded. A task waiting for its turn at one location's pace then holds no shared
    /// permit that another location could use now. Returns the whole wait and what `gate` gave.
    pub async fn acquire_then<G, F, Fut>(&self, mut gate: F) -> (Duration, G)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = G>,
    {
        let start = Instant::now();
        loop {
            self.pace().await;
            let held = gate().await;
            // A 429 seen while this task waited for the gate pauses it too. Whatever it waits
            // for next, it waits without the gate (dropped at the end of this iteration).
            if !self.paused() {
                match self.window_guard() {
                    None => return (start.elapsed(), held),
                    // The request gives up its slot and takes the next free one after the
                    // wait. That costs the location a slot whenever a request one window
                    // earlier went out late (by more than 8.5 ms at 100 per 10 s: a busy
                    // thread, a stopped process), at most about one a window, 1% of its limit.
                    // The slack it leaves is what keeps arrivals jittered beyond
                    // `GUARD_JITTER` mostly within the limit. Keeping the slot instead filled
                    // every window to the guard, and then a sliding 10 s of arrivals held 101
                    // to 103 (BENCHMARKS.md, "Share, seventh pass").
                    Some(until) => {
                        drop(held);
                        tokio::time::sleep_until(until).await;
                    }
                }
            }
        }
    }

    /// Whether a 429 pause is on now.
    fn paused(&self) -> bool {
        self.lock().paused_until.is_some_and(|p| p > Instant::now())
    }

    /// Takes the next slot of the even spacing and sleeps until it, again while a 429 pause
    /// that began during the sleep is still on.
    async fn pace(&self) {
        loop {
            let slot = {
                let mut st = self.lock();
                let now = Instant::now();
                // Slots nobody took in time (every waiter held at the gate by slow replies, a
                // busy thread, the run's own start-up) are not lost for good: the pace may fall
                // behind by up to a window and catch up, while the window guard keeps every
                // window within its share. A pause (429, `Remaining: 0`) gives no such credit.
                let behind = now.checked_sub(st.window()).unwrap_or(now);
                let mut slot = st.next.max(behind);
                if let Some(p) = st.paused_until {
                    if p > slot {
                        slot = p;
                    } else if p <= now {
                        st.paused_until = None;
                    }
                }
                st.next = slot + st.spacing();
                slot
            };
            if slot > Instant::now() {
                tokio::time::sleep_until(slot).await;
            }
            if !self.paused() {
                return;
            }
        }
    }

    /// Even spacing alone can bunch up: a task that wakes late (a busy thread, a slow disk)
    /// sends next to the one after it. This guard counts actual release times over the last
    /// window and holds a request while the window is full, so no window of the quota's
    /// length ever holds more than the quota less the safety margin. Returns when to retry,
    /// or `None` after recording the release.
    fn window_guard(&self) -> Option<Instant> {
        let mut st = self.lock();
        let Some(q) = st.effective() else {
            st.sent.clear();
            return None;
        };
        let now = Instant::now();
        let window = q.interval.mul_f64(st.penalty) + GUARD_JITTER;
        let allowed = ((f64::from(q.max.get()) / GUARD_MARGIN).floor() as usize).max(1);
        while st
            .sent
            .front()
            .is_some_and(|&t| now.duration_since(t) >= window)
        {
            st.sent.pop_front();
        }
        while st.sent.len() > allowed {
            st.sent.pop_front();
        }
        if st.sent.len() >= allowed {
            return st.sent.front().map(|&t| t + window);
        }
        st.sent.push_back(now);
        None
    }

    /// Learns from one response's status and headers.
    pub fn observe(&self, status: u16, h: &RateHeaders, retry_after: Option<Duration>) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(q) = h.quota() {
            let stricter = st
                .configured
                .is_none_or(|c| q.per_second() < c.per_second());
            st.server = stricter.then_some(q);
        }
        if h.daily_remaining.is_some() {
            st.daily_remaining = h.daily_remaining;
        }
        if h.daily_limit.is_some() {
            st.daily_limit = h.daily_limit;
        }
        let window = st.window();
        if status == 429 {
            let pause = retry_after.unwrap_or(window / 10).min(window * 6);
            let until = now + pause;
            st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
            st.next = st.next.max(until);
            // Slow down at most once per window: one burst of 429s is one signal.
            if st
                .last_penalty_change
                .is_none_or(|t| now.duration_since(t) >= window)
                || st.penalty == 1.0
            {
                st.penalty = (st.penalty * 1.25).min(MAX_PENALTY);
                st.last_penalty_change = Some(now);
            }
        } else {
            if h.remaining == Some(0) {
                let until = now + st.spacing().max(window / 20);
                st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
                st.next = st.next.max(until);
            }
            if st.penalty > 1.0
                && st
                    .last_penalty_change
                    .is_some_and(|t| now.duration_since(t) >= window)
            {
                st.penalty = (st.penalty / 1.1).max(1.0);
                st.last_penalty_change = Some(now);
            }
        }
    }

    /// The pace now in force, in requests per second (`None`: unpaced).
    pub fn current_rate(&self) -> Option<f64> {
        let st = self.lock();
        let s = st.spacing();
        (!s.is_zero()).then(|| 1.0 / s.as_secs_f64())
    }

    /// The quota now in force (configured, or the server's when stricter).
    pub fn effective_quota(&self) -> Option<Quota> {
        self.lock().effective()
    }

    /// The last `X-RateLimit-Daily-Remaining` the server sent, and its daily limit.
    pub fn daily(&self) -> (Option<u64>, Option<u64>) {
        let st = self.lock();
        (st.daily_remaining, st.daily_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parses_quotas() {
        assert_eq!("100/10s".parse::<Quota>().unwrap(), Quota::API_DEFAULT);
        assert_eq!(
            "600/1m".parse::<Quota>().unwrap().interval,
            Duration::from_secs(60)
        );
        assert_eq!(
            "5/500ms".parse::<Quota>().unwrap().interval,
            Duration::from_millis(500)
        );
        assert_eq!(
            "10/s".parse::<Quota>().unwrap().interval,
            Duration::from_secs(1)
        );
        for bad in ["", "100", "0/10s", "x/10s", "100/10", "100/-1s", "100/0s"] {
            assert!(bad.parse::<Quota>().is_err(), "{bad}");
        }
        assert_eq!(Quota::API_DEFAULT.to_string(), "100/10s");
    }

    /// Counts the most requests started in any window of `window` length.
    fn max_in_window(times: &[Instant], window: Duration) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi].duration_since(times[lo]) >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_the_quota_in_any_window_and_uses_97_percent() {
        let lim = std::sync::Arc::new(RateLimiter::new(Some(Quota::API_DEFAULT)));
        let times = std::sync::Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (lim, times) = (lim.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    lim.acquire().await;
                    times.lock().unwrap().push(Instant::now());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut times = times.lock().unwrap().clone();
        times.sort();
        assert_eq!(times.len(), 1600);
        assert!(max_in_window(&times, Duration::from_secs(10)) <= 100);
        let rate = 1600.0 / start.elapsed().as_secs_f64();
        assert!(rate >= 9.7, "sustained {rate:.2} req/s of 10");
    }

    /// Release times of `n` requests at the API's limit, each asked as if every reserved slot
    /// had been missed by a late wake-up: spacing alone would release everything at once, so
    /// the window guard alone decides when each one goes.
    async fn released_with_every_slot_missed(n: usize) -> Vec<Instant> {
        let lim = RateLimiter::new(Some(Quota::API_DEFAULT));
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            lim.lock().next = Instant::now() - Duration::from_secs(5);
            lim.acquire().await;
            times.push(Instant::now());
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn late_wakeups_do_not_bunch_requests_into_one_window() {
        let times = released_with_every_slot_missed(300).await;
        assert!(
            max_in_window(&times, Duration::from_secs(10)) <= 99,
            "{}",
            max_in_window(&times, Duration::from_secs(10))
        );
        assert!(times.last().unwrap().duration_since(times[0]) >= Duration::from_secs(20));
    }

    /// The server counts arrivals, not releases: a request released earlier can arrive after
    /// one released later. With every other request 40 ms slower on the way, the arrivals
    /// still keep every window below the limit while the guard is what paces them.
    #[tokio::test(start_paused = true)]
    async fn requests_that_arrive_late_still_fit_every_window() {
        let mut arrivals: Vec<Instant> = released_with_every_slot_missed(300)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, t)| t + Duration::from_millis(if i % 2 == 0 { 40 } else { 0 }))
            .collect();
        arrivals.sort();
        let busiest = max_in_window(&arrivals, Duration::from_secs(10));
        assert!(busiest <= 99, "{busiest} arrivals in one 10 s window");
    }

    /// A stall in the middle of a run (every waiter held by slow replies) is made up once it
    /// ends, within the window guard: the location keeps its share of the limit.
    #[tokio::test(start_paused = true)]
    async fn a_stall_is_made_up_within_the_windows_share() {
        let lim = RateLimiter::new(Some(Quota::API_DEFAULT));
        let start = Instant::now();
        let mut times = Vec::new();
        let mut stalled = false;
        while start.elapsed() < Duration::from_secs(30) {
            if !stalled && start.elapsed() >= Duration::from_secs(5) {
                stalled = true;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            lim.acquire().await;
            times.push(Instant::now());
        }
        let in_30s = times
            .iter()
            .filter(|t| t.duration_since(start) < Duration::from_secs(30))
            .count();
        // Even spacing alone would give about 27 s / 102 ms = 264.
        assert!(in_30s >= 285, "{in_30s} requests in 30 s of a 10/s limit");
        assert!(max_in_window(&times, Duration::from_secs(10)) <= 99);
    }

    /// After a 429's pause the pace resumes evenly: the pause earns no catch-up.
    #[tokio::test(start_paused = true)]
    async fn a_429_pause_is_not_made_up_afterwards() {
        let lim = RateLimiter::new(Some(Quota::API_DEFAULT));
        lim.acquire().await;
        lim.observe(429, &RateHeaders::default(), Some(Duration::from_secs(5)));
        let mut times = Vec::new();
        for _ in 0..10 {
            lim.acquire().await;
            times.push(Instant::now());
        }
        let gaps = times.windows(2).map(|w| w[1].duration_since(w[0]));
        assert!(gaps.into_iter().all(|g| g >= Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn adopts_a_stricter_server_quota_from_headers() {
        let lim = RateLimiter::new(Some(Quota::API_DEFAULT));
        let h = RateHeaders {
            max: Some(50),
            interval_ms: Some(10_000),
            remaining: Some(49),
            ..Default::default()
        };
        lim.observe(200, &h, None);
        assert_eq!(lim.effective_quota().unwrap().max.get(), 50);
        // A looser server quota does not override the user's setting.
        let h = RateHeaders {
            max: Some(1000),
            interval_ms: Some(10_000),
            ..Default::default()
        };
        lim.observe(200, &h, None);
        assert_eq!(lim.effective_quota().unwrap().max.get(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_everyone_for_retry_after() {
        let lim = RateLimiter::new(Some(Quota::API_DEFAULT));
        lim.acquire().await;
        lim.observe(429, &RateHeaders::default(), Some(Duration::from_secs(3)));
        let waited = lim.acquire().await;
        assert!(waited >= Duration::from_secs(3), "{waited:?}");
        assert!(lim.current_rate().unwrap() < 10.0 / MARGIN);
    }

    /// A pipeline's global permit is taken only when a location's turn has come: one slow
    /// location waiting for its pace never blocks another that could send now.
    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_its_pace_holds_no_shared_permit() {
        let global = Arc::new(tokio::sync::Semaphore::new(1));
        let slow = Arc::new(RateLimiter::new(Some("1/10s".parse().unwrap())));
        let fast = RateLimiter::new(None);
        let take = |g: Arc<tokio::sync::Semaphore>| {
            move || {
                let g = g.clone();
                async move { g.acquire_owned().await.unwrap() }
            }
        };
        let t0 = Instant::now();
        let (_, first) = slow.acquire_then(take(global.clone())).await;
        drop(first);
        // The slow location's next turn is about 10 s away: it waits, holding nothing.
        let waiting = {
            let (slow, global) = (slow.clone(), global.clone());
            tokio::spawn(async move { slow.acquire_then(take(global)).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (_, permit) = fast.acquire_then(take(global.clone())).await;
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the other location got the shared permit at once, not after {:?}",
            t0.elapsed()
        );
        drop(permit);
        let (waited, _permit) = waiting.await.unwrap();
        assert!(waited >= Duration::from_secs(10), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn unpaced_when_off_until_the_server_announces_a_limit() {
        let lim = RateLimiter::new(None);
        assert_eq!(lim.acquire().await, Duration::ZERO);
        assert_eq!(lim.current_rate(), None);
        lim.observe(
            200,
            &RateHeaders {
                max: Some(100),
                interval_ms: Some(10_000),
                ..Default::default()
            },
            None,
        );
        assert!(lim.current_rate().is_some());
    }
}
