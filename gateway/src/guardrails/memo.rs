//! A per-thread memo of the input rules' verdict on each caller text ([`Verdict`]), so that a
//! text sent again is not normalised and scanned again.
//!
//! Why: a chat sends its whole history with every turn, and an application sends the same
//! system prompt with every request. Without the memo, screening a conversation costs the
//! square of its length; with it, each message is scanned once (per thread, while it stays in
//! the memo).
//!
//! What keeps it sound:
//! - An entry is found only by the exact text (compared byte for byte, not by hash alone), and
//!   only by the same tenant and user: a hit is faster than a scan, and that difference must
//!   not tell anyone whether somebody else sent a text.
//! - Entries belong to one compiled `[guardrails]` section (`Guardrails::id`): a reload that
//!   changes the rules starts an empty memo.
//! - Texts shorter than [`MIN_LEN`] are scanned every time (the scan costs about what the
//!   memo does). A text is kept only the second time it comes (the first time, only its hash
//!   is noted): a text sent once costs a hash, not a copy. The memo is bounded ([`BUDGET`],
//!   [`MAX_ENTRIES`]) and emptied when full.
//!
//! The memo holds caller texts in memory for as long as they stay in it; nothing reads it but
//! the screen, and it is never logged.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    hash::BuildHasher,
};

// Seeded per process, and fast on long texts (SipHash would cost as much as a scan).
use foldhash::quality::RandomState;

use super::{Guardrails, Verdict};

/// Texts shorter than this are scanned every time.
pub const MIN_LEN: usize = 256;
/// Bytes of text one thread's memo holds at most.
pub const BUDGET: usize = 4 << 20;
/// Entries one thread's memo holds at most.
pub const MAX_ENTRIES: usize = 8192;

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

/// `text`'s verdict for `tenant`'s `user` under `g`'s rules: from the memo, or judged now
/// (and kept when the text is long enough).
pub fn verdict(g: &Guardrails, tenant: &str, user: &str, text: &str) -> Verdict {
    if text.len() < MIN_LEN {
        return g.judge(text);
    }
    MEMO.with_borrow_mut(|m| m.verdict(g.id, tenant, user, text, || g.judge(text)))
}

/// One thread's entries.
#[derive(Default)]
struct Memo {
    /// The `Guardrails::id` the entries were judged under.
    owner: u64,
    /// By hash of (tenant, user, text); entries whose hashes collide share a list.
    entries: HashMap<u64, Vec<Entry>>,
    len: usize,
    bytes: usize,
    /// Hashes of texts seen once and not kept (yet).
    seen_once: HashSet<u64>,
    hasher: RandomState,
}

struct Entry {
    tenant: Box<str>,
    user: Box<str>,
    text: Box<str>,
    verdict: Verdict,
}

impl Memo {
    fn verdict(
        &mut self,
        owner: u64,
        tenant: &str,
        user: &str,
        text: &str,
        judge: impl FnOnce() -> Verdict,
    ) -> Verdict {
        if owner != self.owner {
            self.clear();
            self.owner = owner;
        }
        let h = self.hasher.hash_one((tenant, user, text));
        let same = |e: &&Entry| &*e.text == text && &*e.tenant == tenant && &*e.user == user;
        if let Some(e) = self.entries.get(&h).and_then(|l| l.iter().find(same)) {
            return e.verdict.clone();
        }
        let verdict = judge();
        let size = text.len() + tenant.len() + user.len();
        if size > BUDGET || self.seen_once.insert(h) {
            if self.seen_once.len() > MAX_ENTRIES {
                self.seen_once = HashSet::new();
            }
            return verdict;
        }
        self.seen_once.remove(&h);
        if self.len >= MAX_ENTRIES || self.bytes + size > BUDGET {
            self.clear();
        }
        self.entries.entry(h).or_default().push(Entry {
            tenant: tenant.into(),
            user: user.into(),
            text: text.into(),
            verdict: verdict.clone(),
        });
        self.len += 1;
        self.bytes += size;
        verdict
    }

    fn clear(&mut self) {
        self.entries = HashMap::new();
        self.seen_once = HashSet::new();
        self.len = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// Looks `text` up for `(tenant, user)`, counting the judgements made.
    fn look(m: &mut Memo, owner: u64, scope: (&str, &str), text: &str, n: &Cell<u32>) -> Verdict {
        m.verdict(owner, scope.0, scope.1, text, || {
            n.set(n.get() + 1);
            Verdict {
                hits: vec![text.len()],
                ..Verdict::default()
            }
        })
    }

    #[test]
    fn a_text_is_judged_once_per_scope_and_rule_set() {
        let (mut m, n) = (Memo::default(), Cell::new(0));
        let long = "x".repeat(MIN_LEN);
        let v = look(&mut m, 1, ("t", "u"), &long, &n);
        assert_eq!(v.hits, vec![MIN_LEN]);
        assert_eq!(m.len, 0, "a text seen once is not kept");
        assert_eq!(look(&mut m, 1, ("t", "u"), &long, &n), v);
        assert_eq!((n.get(), m.len), (2, 1), "the second time, it is kept");
        assert_eq!(look(&mut m, 1, ("t", "u"), &long, &n), v);
        assert_eq!(n.get(), 2, "the third look is a hit");
        // Another user, another tenant, another text, another rule set: judged again.
        for _ in 0..2 {
            look(&mut m, 1, ("t", "v"), &long, &n);
            look(&mut m, 1, ("s", "u"), &long, &n);
            look(&mut m, 1, ("t", "u"), &format!("{long}y"), &n);
        }
        assert_eq!(n.get(), 8);
        look(&mut m, 2, ("t", "u"), &long, &n);
        look(&mut m, 2, ("t", "u"), &long, &n);
        assert_eq!(n.get(), 10, "a new rule set starts an empty memo");
        look(&mut m, 2, ("t", "u"), &long, &n);
        assert_eq!(n.get(), 10);
    }

    #[test]
    fn the_memo_stays_within_its_budget() {
        let (mut m, n) = (Memo::default(), Cell::new(0));
        let text = |i: usize| format!("{i:0>w$}", w = MIN_LEN * 64);
        let fit = BUDGET / (MIN_LEN * 64 + 2);
        for i in 0..fit * 3 {
            // Twice each: kept the second time.
            look(&mut m, 1, ("t", "u"), &text(i), &n);
            look(&mut m, 1, ("t", "u"), &text(i), &n);
            assert!(m.bytes <= BUDGET && m.len <= MAX_ENTRIES);
        }
        assert_eq!(n.get() as usize, fit * 6);
        // The last one is still there; the first was let go.
        look(&mut m, 1, ("t", "u"), &text(fit * 3 - 1), &n);
        look(&mut m, 1, ("t", "u"), &text(0), &n);
        assert_eq!(n.get() as usize, fit * 6 + 1);
    }
}
