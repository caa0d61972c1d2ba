//! Passwords of human users: argon2id (m = 19456 KiB, t = 2, p = 1, the OWASP floor), verified
//! on a few dedicated threads at a lower CPU priority behind a semaphore, so a flood of logins
//! can neither block the async workers nor take the CPU from data-plane requests; and
//! throttling per user and per source address.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

pub const M_COST_KIB: u32 = 19_456;
pub const T_COST: u32 = 2;
pub const P_COST: u32 = 1;
/// Shortest password `moat users add|passwd` accepts.
pub const MIN_LEN: usize = 12;
/// Longest password anyone may send: argon2 cost does not depend on it, but request parsing does.
pub const MAX_LEN: usize = 1024;

fn argon2() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(M_COST_KIB, T_COST, P_COST, None).expect("valid argon2 parameters"),
    )
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`). CPU-heavy: call
/// from a blocking context.
pub fn hash(password: &str) -> String {
    argon2()
        .hash_password(password.as_bytes())
        .expect("argon2 hashing with valid parameters")
        .to_string()
}

/// A hash of a random password, verified against when the user does not exist, so an unknown
/// user costs the same time as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash(&super::secrets::random_base62(32)))
}

/// Verifies `password` against `stored` (or against a dummy hash when `None`). CPU-heavy.
/// A stored hash weaker than the floor is refused: it cannot have been written by moat.
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    let Some(stored) = stored else {
        let _ = argon2().verify_password(password.as_bytes(), dummy_hash());
        return false;
    };
    if !meets_floor(stored) {
        return false;
    }
    argon2()
        .verify_password(password.as_bytes(), stored)
        .is_ok()
}

fn meets_floor(phc: &str) -> bool {
    let Ok(h) = argon2::PasswordHash::new(phc) else {
        return false;
    };
    if h.algorithm.as_str() != "argon2id" {
        return false;
    }
    let Ok(p) = Params::try_from(&h) else {
        return false;
    };
    p.m_cost() >= M_COST_KIB && p.t_cost() >= T_COST && p.p_cost() >= P_COST
}

/// Checks a new password against the policy. Returns why it is refused.
pub fn check_policy(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_LEN {
        return Err(format!("a password needs at least {MIN_LEN} characters"));
    }
    if password.len() > MAX_LEN {
        return Err(format!("a password may have at most {MAX_LEN} bytes"));
    }
    Ok(())
}

/// Attempt counting with lock-out: after `max_failures` failed attempts within `window`, the
/// subject is refused until the window has passed since the first of them. A success clears it.
///
/// An attempt is counted when it is *reserved*, before any hashing: concurrent guesses cannot
/// all pass the check while the first ones are still hashing. A success then clears the count,
/// an attempt that never ran (no hashing slot) gives its reservation back, a failure keeps it.
pub struct Throttle {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    state: Mutex<Tracked>,
}

/// One subject's count.
struct Entry {
    first: Instant,
    n: u32,
    /// Position in [`Tracked::order`]; an order item with another `seq` is stale.
    seq: u64,
}

/// The counted subjects, and the order in which they were first counted (oldest first), so
/// that a full table evicts the oldest subject instead of no longer counting new ones.
#[derive(Default)]
struct Tracked {
    entries: HashMap<String, Entry>,
    order: VecDeque<(u64, String)>,
    next_seq: u64,
}

impl Tracked {
    /// Starts counting `subject` afresh, evicting the oldest subjects past `capacity`.
    fn start(&mut self, subject: &str, capacity: usize) {
        if !self.entries.contains_key(subject) {
            while self.entries.len() >= capacity {
                let Some((seq, oldest)) = self.order.pop_front() else {
                    break;
                };
                if self.entries.get(&oldest).is_some_and(|e| e.seq == seq) {
                    self.entries.remove(&oldest);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((seq, subject.to_owned()));
        // Stale order items (cleared or restarted subjects) are dropped in bulk, so the queue
        // stays within a small multiple of the table.
        if self.order.len() > 2 * capacity.max(16) {
            let entries = &self.entries;
            self.order
                .retain(|(seq, s)| entries.get(s).is_some_and(|e| e.seq == *seq));
        }
        self.entries.insert(
            subject.to_owned(),
            Entry {
                first: Instant::now(),
                n: 0,
                seq,
            },
        );
    }
}

/// Subjects tracked at most by default; past it the oldest is evicted (never: stop counting).
pub const THROTTLE_CAPACITY: usize = 100_000;

impl Throttle {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self::with_capacity(max_failures, window, THROTTLE_CAPACITY)
    }

    pub fn with_capacity(max_failures: u32, window: Duration, capacity: usize) -> Self {
        Self {
            max_failures: max_failures.max(1),
            window,
            capacity: capacity.max(1),
            state: Mutex::new(Tracked::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one attempt for `subject`, atomically with the lock-out check. `Err(seconds)`
    /// while the subject is locked out (nothing is counted then).
    pub fn reserve(&self, subject: &str) -> Result<(), u64> {
        let mut t = self.lock();
        let window = self.window;
        if t.entries
            .get(subject)
            .is_none_or(|e| e.first.elapsed() >= window)
        {
            t.start(subject, self.capacity);
        }
        let Some(e) = t.entries.get_mut(subject) else {
            return Ok(()); // capacity ≥ 1: `start` always leaves the subject in
        };
        if e.n >= self.max_failures {
            return Err((window.saturating_sub(e.first.elapsed())).as_secs().max(1));
        }
        e.n += 1;
        Ok(())
    }

    /// Gives back a reservation whose attempt never ran.
    pub fn release(&self, subject: &str) {
        if let Some(e) = self.lock().entries.get_mut(subject) {
            e.n = e.n.saturating_sub(1);
        }
    }

    /// A failed attempt outside [`Self::reserve`] (counted at once).
    pub fn failure(&self, subject: &str) {
        let _ = self.reserve(subject);
    }

    /// `Err(seconds)` while the subject is locked out.
    pub fn check(&self, subject: &str) -> Result<(), u64> {
        let t = self.lock();
        match t.entries.get(subject) {
            Some(e) if e.n >= self.max_failures && e.first.elapsed() < self.window => {
                Err((self.window - e.first.elapsed()).as_secs().max(1))
            }
            _ => Ok(()),
        }
    }

    pub fn success(&self, subject: &str) {
        self.lock().entries.remove(subject);
    }

    /// Subjects counted now.
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

/// Why a password check did not run or did not pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Invalid,
    /// Locked out: retry after this many seconds.
    Throttled(u64),
    /// Every hashing slot stayed busy: retry after this many seconds.
    Busy(u64),
}

/// Niceness of the hashing threads: under CPU contention the scheduler gives them about a tenth
/// of what a normal thread gets, so the async workers serving `/v1` keep their cores.
const HASH_THREAD_NICE: libc::c_int = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Dedicated threads for argon2, at [`HASH_THREAD_NICE`]. They end when the pool is dropped.
struct HashPool {
    jobs: mpsc::Sender<Job>,
}

impl HashPool {
    fn new(threads: usize) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("moat-argon2-{i}"))
                .spawn(move || {
                    // SAFETY: setpriority on this thread's own id; on Linux it affects this
                    // thread only. Failure leaves the default priority, which is still correct.
                    unsafe {
                        libc::setpriority(
                            libc::PRIO_PROCESS,
                            libc::gettid() as libc::id_t,
                            HASH_THREAD_NICE,
                        );
                    }
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawn a password hashing thread");
        }
        Self { jobs }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// The gate every password check goes through: throttles, then a hashing slot, then argon2 on
/// the hashing threads.
pub struct PasswordGate {
    slots: Arc<Semaphore>,
    pool: HashPool,
    queue_timeout: Duration,
    per_user: Throttle,
    per_source: Throttle,
    /// argon2 verifications started (for tests and a sanity check of the throttles).
    verifications: AtomicU64,
}

impl PasswordGate {
    pub fn new(
        concurrency: usize,
        max_failures_per_user: u32,
        max_failures_per_source: u32,
        lockout: Duration,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            pool: HashPool::new(concurrency),
            queue_timeout: Duration::from_secs(2),
            per_user: Throttle::new(max_failures_per_user, lockout),
            per_source: Throttle::new(max_failures_per_source, lockout),
            verifications: AtomicU64::new(0),
        }
    }

    fn user_subject(username: &str) -> String {
        username.to_lowercase()
    }

    /// How many password verifications reached argon2.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Runs the check. `stored` is `None` when the user is unknown, disabled or has no password
    /// (the hash still runs, against a dummy). `Ok(())` only when the password matches.
    ///
    /// `source` is the client address (see `auth::source`); IPv6 clients are counted per /64,
    /// since one host usually holds a whole /64.
    pub async fn check(
        &self,
        username: &str,
        source: IpAddr,
        password: Zeroizing<String>,
        stored: Option<String>,
    ) -> Result<(), Refusal> {
        let user = Self::user_subject(username);
        let src = super::source::throttle_key(source);
        // Counted before hashing: a burst of guesses cannot outrun the count.
        self.per_user.reserve(&user).map_err(Refusal::Throttled)?;
        if let Err(secs) = self.per_source.reserve(&src) {
            self.per_user.release(&user);
            return Err(Refusal::Throttled(secs));
        }
        if password.len() > MAX_LEN {
            return Err(Refusal::Invalid);
        }
        let permit =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        let Ok(Ok(permit)) = permit else {
            // Never ran: not an attempt.
            self.per_user.release(&user);
            self.per_source.release(&src);
            return Err(Refusal::Busy(1));
        };
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let ok = self
            .pool
            .run(move || {
                let _permit = permit;
                verify(&password, stored.as_deref())
            })
            .await
            .unwrap_or(false);
        if ok {
            self.per_user.success(&user);
            self.per_source.release(&src);
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_at_the_floor_and_verifies() {
        let h = hash("correct horse battery");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse battery", Some(&h)));
        assert!(!verify("correct horse batterY", Some(&h)));
        assert!(!verify("anything", None));
    }

    #[test]
    fn weaker_stored_hashes_are_refused() {
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw")
        .unwrap()
        .to_string();
        assert!(!verify("pw", Some(&weak)));
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap(),
        )
        .hash_password(b"pw")
        .unwrap()
        .to_string();
        assert!(!verify("pw", Some(&argon2i)));
    }

    #[test]
    fn policy() {
        assert!(check_policy("short").is_err());
        assert!(check_policy("long enough pw").is_ok());
        assert!(check_policy(&"x".repeat(MAX_LEN + 1)).is_err());
    }

    #[test]
    fn throttle_locks_after_max_failures_and_success_clears() {
        let t = Throttle::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            t.failure("a");
        }
        assert!(t.check("a").is_ok());
        t.success("a");
        for _ in 0..3 {
            t.failure("a");
        }
        let secs = t.check("a").unwrap_err();
        assert!((1..=60).contains(&secs));
        assert!(t.check("b").is_ok());
    }

    #[tokio::test]
    async fn gate_throttles_per_user_and_per_source() {
        let gate = PasswordGate::new(1, 2, 3, Duration::from_secs(60));
        let stored = hash("the right password");
        let src: IpAddr = "192.0.2.1".parse().unwrap();
        let pw = |s: &str| Zeroizing::new(s.to_owned());
        for _ in 0..2 {
            assert_eq!(
                gate.check("alice", src, pw("wrong"), Some(stored.clone()))
                    .await,
                Err(Refusal::Invalid)
            );
        }
        // alice is locked even with the right password.
        assert!(matches!(
            gate.check("Alice", src, pw("the right password"), Some(stored.clone()))
                .await,
            Err(Refusal::Throttled(_))
        ));
        // One more failure from the source (another user) reaches the source limit.
        assert_eq!(
            gate.check("bob", src, pw("wrong"), None).await,
            Err(Refusal::Invalid)
        );
        assert!(matches!(
            gate.check("carol", src, pw("x"), None).await,
            Err(Refusal::Throttled(_))
        ));
        // Another source is unaffected.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            gate.check("dave", other, pw("the right password"), Some(stored))
                .await,
            Ok(())
        );
    }

    #[test]
    fn a_full_throttle_evicts_the_oldest_and_keeps_counting() {
        let t = Throttle::with_capacity(2, Duration::from_secs(60), 3);
        for s in ["a", "b", "c"] {
            t.failure(s);
            t.failure(s);
            assert!(t.check(s).is_err(), "{s} locked");
        }
        // A fourth subject is counted (not ignored): the oldest, `a`, makes room.
        t.failure("d");
        t.failure("d");
        assert!(
            t.check("d").is_err(),
            "a new subject is still counted when full"
        );
        assert_eq!(t.tracked(), 3);
        assert!(t.check("a").is_ok(), "the oldest was evicted");
        assert!(t.check("b").is_err() && t.check("c").is_err());
        // Churn far past the capacity: the table stays bounded and the newest still counts.
        for i in 0..1000 {
            t.failure(&format!("s{i}"));
        }
        t.failure("s999");
        assert!(t.check("s999").is_err());
        assert_eq!(t.tracked(), 3);
        assert!(t.lock().order.len() <= 2 * 16 + 1);
    }

    #[test]
    fn reservations_count_before_the_outcome_and_can_be_given_back() {
        let t = Throttle::new(2, Duration::from_secs(60));
        assert!(t.reserve("a").is_ok());
        assert!(t.reserve("a").is_ok());
        assert!(t.reserve("a").is_err(), "two in flight use up the limit");
        t.release("a");
        assert!(t.reserve("a").is_ok(), "a released slot can be taken again");
        t.success("a");
        assert!(t.check("a").is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_guesses_reach_argon2_at_most_the_limit() {
        const LIMIT: u32 = 5;
        let mut gate = PasswordGate::new(2, LIMIT, 1000, Duration::from_secs(60));
        gate.queue_timeout = Duration::from_secs(600);
        let gate = Arc::new(gate);
        let stored = hash("the right password");
        let src: IpAddr = "192.0.2.7".parse().unwrap();
        let guesses: Vec<_> = (0..100)
            .map(|i| {
                let (gate, stored) = (gate.clone(), stored.clone());
                tokio::spawn(async move {
                    gate.check(
                        "alice",
                        src,
                        Zeroizing::new(format!("guess {i}")),
                        Some(stored),
                    )
                    .await
                })
            })
            .collect();
        let mut invalid = 0;
        for g in guesses {
            match g.await.unwrap() {
                Err(Refusal::Invalid) => invalid += 1,
                Err(Refusal::Throttled(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(gate.verifications(), u64::from(LIMIT));
        assert_eq!(invalid, LIMIT);
    }

    #[tokio::test]
    async fn ipv6_sources_are_counted_per_64() {
        let gate = PasswordGate::new(1, 100, 2, Duration::from_secs(60));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let pw = || Zeroizing::new("wrong".to_owned());
        assert_eq!(gate.check("u1", a, pw(), None).await, Err(Refusal::Invalid));
        assert_eq!(gate.check("u2", b, pw(), None).await, Err(Refusal::Invalid));
        assert!(matches!(
            gate.check("u3", "2001:db8:1:2:abcd::1".parse().unwrap(), pw(), None)
                .await,
            Err(Refusal::Throttled(_))
        ));
        assert_eq!(
            gate.check("u4", other, pw(), None).await,
            Err(Refusal::Invalid)
        );
    }

    #[tokio::test]
    async fn hashing_runs_on_lower_priority_threads() {
        let gate = PasswordGate::new(1, 5, 5, Duration::from_secs(60));
        let src: IpAddr = "192.0.2.9".parse().unwrap();
        let _ = gate
            .check("x", src, Zeroizing::new("pw".into()), None)
            .await;
        let mut seen = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("moat-argon2") {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // Fields after the parenthesised name; niceness is field 19 (index 16 here).
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let nice: i32 = rest.split(' ').nth(16).unwrap().parse().unwrap();
            assert_eq!(nice, HASH_THREAD_NICE);
            seen += 1;
        }
        assert!(seen >= 1, "no hashing thread found");
    }
}
