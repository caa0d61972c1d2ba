//! Guardrails: the data plane's screening of what a prompt says and what an answer leaks, a
//! pipeline stage of its own (step 9b, after authorization and quotas, so a flood is refused
//! by the cheap checks before it can make the scanner the bottleneck).
//!
//! - [`Guardrails`]: the `[guardrails]` section compiled once per config load (the rule set,
//!   the policies); held by the [`Config`](crate::config::Config).
//! - [`screen`] (input): every text a caller sends (`screen`), normalised (`normalize`) and
//!   matched against the rules (`rules`); per the caller's policy (`policy`) a prompt is
//!   blocked (400 `prompt_injection_detected`), flagged (`x-moat-guardrail`) or let through;
//!   the operator's system prompt and the canary (`canary`) are put in; an optional classifier
//!   model is asked (`classifier`).
//! - [`filter`] (output): the answer screened for secrets, PII, links and the canary
//!   (`output`), redacted or cut, streamed (`stream`) or not.
//! - `metrics`: counts per rule and class for `/metrics`.
//!
//! Fail-closed: a filter that fails (panics, cannot parse what it must screen) ends the
//! answer; nothing passes unscreened. Logs name rules and classes, never the text.

mod canary;
mod classifier;
mod memo;
pub mod metrics;
pub mod normalize;
pub mod output;
pub mod policy;
pub mod rules;
mod screen;
pub(crate) mod splice;
mod stream;

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

pub use policy::{InputAction, Policy};
pub use screen::{Guard, operator_message_len, policy, screen};
pub use stream::{EventScreen, filter};

use crate::config::{ClassifierConfig, GuardrailPolicyConfig, GuardrailsConfig};

/// The `[guardrails]` section, compiled.
#[derive(Debug)]
pub struct Guardrails {
    pub enabled: bool,
    pub refuse_invisible: bool,
    pub decode_min_len: usize,
    pub hold_back: usize,
    pub rules: rules::RuleSet,
    defaults: GuardrailPolicyConfig,
    tenants: BTreeMap<String, GuardrailPolicyConfig>,
    roles: BTreeMap<String, GuardrailPolicyConfig>,
    models: BTreeMap<String, GuardrailPolicyConfig>,
    pub classifier: Option<ClassifierConfig>,
    /// Unique per build: entries of the verdict memo (`memo`) belong to one build.
    id: u64,
}

/// What the input rules find in one caller text ([`Guardrails::judge`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// The rules hit (places in `rules.rules`), the invisible-characters rule among them when
    /// the text smuggled any.
    pub hits: Vec<usize>,
    /// Invisible characters that count as smuggling were taken out of the text.
    pub smuggling: bool,
    /// The text (as the caller sent it) has a chat-template delimiter.
    pub delimited: bool,
}

impl Default for Guardrails {
    fn default() -> Self {
        Self::build(&GuardrailsConfig::default()).expect("the defaults build")
    }
}

/// A problem with the section: the key under `guardrails.` and the reason.
pub type BuildError = (String, String);

impl Guardrails {
    /// Checks and compiles the section (names of models, roles and pools are checked by the
    /// config's validation, which knows them).
    pub fn build(c: &GuardrailsConfig) -> Result<Guardrails, BuildError> {
        if !matches!(c.invisible.as_str(), "strip" | "refuse") {
            return Err((
                "invisible".into(),
                format!("`{}` is not `strip` or `refuse`", c.invisible),
            ));
        }
        if !(16..=65_536).contains(&c.hold_back_bytes) {
            return Err((
                "hold_back_bytes".into(),
                "must be between 16 and 65536".into(),
            ));
        }
        let tables = [("policy".to_owned(), &c.policy)]
            .into_iter()
            .chain(c.tenants.iter().map(|(k, v)| (format!("tenants.{k}"), v)))
            .chain(c.roles.iter().map(|(k, v)| (format!("roles.{k}"), v)))
            .chain(c.models.iter().map(|(k, v)| (format!("models.{k}"), v)));
        for (at, t) in tables {
            policy::check(t).map_err(|(k, r)| (format!("{at}.{k}"), r))?;
        }
        let mut operator = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            let ok_id = !r.id.is_empty()
                && r.id.len() <= 64
                && r.id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok_id {
                return Err((
                    format!("rules[{i}].id"),
                    "must be 1-64 characters of letters, digits, `.`, `_`, `-`".into(),
                ));
            }
            if !(r.weight > 0.0 && r.weight <= 100.0) {
                return Err((
                    format!("rules[{i}].weight"),
                    "must be above 0 and at most 100".into(),
                ));
            }
            operator.push(rules::OperatorRule {
                id: r.id.clone(),
                weight: r.weight,
                pattern: r.pattern.clone(),
            });
        }
        let rules = rules::RuleSet::compile(c.shipped_rules, &operator).map_err(|e| {
            let key = if c.rules.is_empty() {
                "shipped_rules".to_owned()
            } else {
                format!("rules[{}].pattern", e.index)
            };
            (key, e.reason)
        })?;
        if let Some(cl) = &c.classifier {
            if !matches!(cl.on_error.as_str(), "block" | "allow") {
                return Err((
                    "classifier.on_error".into(),
                    format!("`{}` is not `block` or `allow`", cl.on_error),
                ));
            }
            if !(1..=60_000).contains(&cl.timeout_ms) {
                return Err((
                    "classifier.timeout_ms".into(),
                    "must be between 1 and 60000".into(),
                ));
            }
            if cl.unsafe_labels.is_empty() {
                return Err((
                    "classifier.unsafe_labels".into(),
                    "must name at least one label".into(),
                ));
            }
        }
        if c.enabled {
            output::warm_up();
        }
        Ok(Guardrails {
            enabled: c.enabled,
            refuse_invisible: c.invisible == "refuse",
            decode_min_len: c.decode_min_len,
            hold_back: c.hold_back_bytes,
            rules,
            defaults: c.policy.clone(),
            tenants: c.tenants.clone(),
            roles: c.roles.clone(),
            models: c.models.clone(),
            classifier: c.classifier.clone(),
            id: {
                static BUILT: AtomicU64 = AtomicU64::new(1);
                BUILT.fetch_add(1, Ordering::Relaxed)
            },
        })
    }

    /// The policy of a request.
    pub fn policy(&self, model: &str, tenant: &str, roles: &[String]) -> Policy {
        policy::resolve(
            &self.defaults,
            &self.models,
            &self.tenants,
            &self.roles,
            model,
            tenant,
            roles,
        )
    }

    /// What the rules find in `raw`: normalised, with its decoded views.
    pub fn judge(&self, raw: &str) -> Verdict {
        let mut hit = vec![false; self.rules.rules.len()];
        let n = normalize::normalize(raw, self.decode_min_len);
        let delimited = self.rules.scan(&n.text, &mut hit);
        for v in &n.views {
            self.rules.scan(v, &mut hit);
        }
        let smuggling = n.invisible > 0 && raw.chars().any(normalize::counts_as_smuggling);
        if smuggling {
            self.rules.mark_invisible(&mut hit);
        }
        Verdict {
            hits: (0..hit.len()).filter(|&i| hit[i]).collect(),
            smuggling,
            // An ASCII text's normal form is its lower case, and delimiters match in any
            // case: the scan above has answered for the text itself.
            delimited: if raw.is_ascii() {
                delimited
            } else {
                self.rules.has_delimiters(raw)
            },
        }
    }

    /// The rules `text` alone hits, with their weights: what the corpus runner and the
    /// benchmark measure.
    pub fn rules_hit(&self, text: &str) -> Vec<(&str, f32)> {
        self.judge(text)
            .hits
            .into_iter()
            .map(|i| {
                let r = &self.rules.rules[i];
                (r.id.as_str(), r.weight)
            })
            .collect()
    }

    /// The tables that name roles, tenants and models (for the config's cross-checks).
    pub fn named(&self) -> [(&'static str, Vec<&String>); 3] {
        [
            ("roles", self.roles.keys().collect()),
            ("tenants", self.tenants.keys().collect()),
            ("models", self.models.keys().collect()),
        ]
    }
}
