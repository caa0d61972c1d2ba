//! The guardrail policy of one request ([`Policy`]), resolved from the `[guardrails]` section
//! in layers, each overriding the one before key by key: built-in defaults, `[guardrails.policy]`,
//! the model's (`[guardrails.models.<name>]`), the tenant's, then the caller's roles'. When
//! several of the caller's roles set an action, the strictest wins (`block` over `flag` over
//! `off`; `block` over `redact`); their other keys are taken in role-name order.
//!
//! The values are checked when the config loads ([`check`]); resolution cannot fail.

use std::collections::BTreeMap;

use super::output::{Class, OutputAction, OutputPolicy};
use crate::config::GuardrailPolicyConfig;

/// What happens to a prompt whose score reaches the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum InputAction {
    Off,
    /// Goes on; the response names the rules (`x-moat-guardrail`) and a log line records them.
    Flag,
    /// 400 `prompt_injection_detected`.
    Block,
}

/// One request's policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub input: InputAction,
    pub tool_input: InputAction,
    pub threshold: f32,
    pub tool_threshold: f32,
    /// Refuse `system`/`developer` messages from callers.
    pub refuse_system: bool,
    pub system_prompt: Option<String>,
    pub canary: bool,
    pub output: OutputPolicy,
    pub classifier: bool,
}

impl Default for Policy {
    /// The built-in defaults: injections blocked in user and tool content (tool content at a
    /// lower score), every secret class redacted in answers, no PII or link screening.
    fn default() -> Self {
        let mut output = OutputPolicy::default();
        for c in Class::SECRETS {
            output.set(c, OutputAction::Redact);
        }
        Self {
            input: InputAction::Block,
            tool_input: InputAction::Block,
            threshold: 1.0,
            tool_threshold: 0.5,
            refuse_system: false,
            system_prompt: None,
            canary: false,
            output,
            classifier: false,
        }
    }
}

pub fn input_action(s: &str) -> Result<InputAction, String> {
    match s {
        "block" => Ok(InputAction::Block),
        "flag" => Ok(InputAction::Flag),
        "off" => Ok(InputAction::Off),
        _ => Err(format!("`{s}` is not an action (block, flag, off)")),
    }
}

pub fn output_action(s: &str) -> Result<OutputAction, String> {
    match s {
        "redact" => Ok(OutputAction::Redact),
        "block" => Ok(OutputAction::Block),
        "off" => Ok(OutputAction::Off),
        _ => Err(format!("`{s}` is not an action (redact, block, off)")),
    }
}

/// Checks one policy table; the error names the key (relative to the table) and the reason.
pub fn check(p: &GuardrailPolicyConfig) -> Result<(), (String, String)> {
    let key = |k: &str, e: String| (k.to_owned(), e);
    if let Some(a) = &p.input {
        input_action(a).map_err(|e| key("input", e))?;
    }
    if let Some(a) = &p.tool_input {
        input_action(a).map_err(|e| key("tool_input", e))?;
    }
    for (k, v) in [
        ("threshold", p.threshold),
        ("tool_threshold", p.tool_threshold),
    ] {
        if let Some(t) = v
            && !(t > 0.0 && t <= 100.0)
        {
            return Err(key(k, "must be above 0 and at most 100".into()));
        }
    }
    if let Some(s) = &p.system_messages
        && !matches!(s.as_str(), "allow" | "refuse")
    {
        return Err(key(
            "system_messages",
            format!("`{s}` is not `allow` or `refuse`"),
        ));
    }
    if p.system_prompt
        .as_ref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err(key("system_prompt", "must not be empty".into()));
    }
    if let Some(a) = &p.secrets {
        output_action(a).map_err(|e| key("secrets", e))?;
    }
    if let Some(a) = &p.links {
        output_action(a).map_err(|e| key("links", e))?;
    }
    if let Some(a) = &p.pii_action {
        output_action(a).map_err(|e| key("pii_action", e))?;
    }
    for (i, c) in p.pii.iter().flatten().enumerate() {
        if !Class::from_name(c).is_some_and(|c| Class::PII.contains(&c)) {
            return Err(key(
                &format!("pii[{i}]"),
                format!("`{c}` is not a PII class (email, phone, card, iban)"),
            ));
        }
    }
    for (name, a) in p.classes.iter().flatten() {
        if Class::from_name(name).is_none_or(|c| c == Class::Canary) {
            let known: Vec<&str> = Class::PATTERNS.iter().map(|c| c.name()).collect();
            return Err(key(
                &format!("classes.{name}"),
                format!("no such class (known: {})", known.join(", ")),
            ));
        }
        output_action(a).map_err(|e| key(&format!("classes.{name}"), e))?;
    }
    for (i, h) in p.link_allowlist.iter().flatten().enumerate() {
        if h.is_empty() || h.contains(['/', ':', ' ', '*']) {
            return Err(key(
                &format!("link_allowlist[{i}]"),
                format!("`{h}` is not a host name (subdomains are allowed with their domain)"),
            ));
        }
    }
    Ok(())
}

/// Resolves the policy for a model, a tenant and the caller's roles.
pub fn resolve(
    defaults: &GuardrailPolicyConfig,
    models: &BTreeMap<String, GuardrailPolicyConfig>,
    tenants: &BTreeMap<String, GuardrailPolicyConfig>,
    roles: &BTreeMap<String, GuardrailPolicyConfig>,
    model: &str,
    tenant: &str,
    caller_roles: &[String],
) -> Policy {
    let mut p = Policy::default();
    apply(&mut p, defaults);
    if let Some(m) = models.get(model) {
        apply(&mut p, m);
    }
    if let Some(t) = tenants.get(tenant) {
        apply(&mut p, t);
    }
    let mut mine: Vec<(&String, &GuardrailPolicyConfig)> = roles
        .iter()
        .filter(|(name, _)| caller_roles.contains(name))
        .collect();
    mine.sort_by_key(|(n, _)| *n);
    let before = p.clone();
    for (_, r) in &mine {
        apply(&mut p, r);
    }
    // Several roles: the strictest action of those that set one.
    if mine.len() > 1 {
        let strictest = |get: fn(&GuardrailPolicyConfig) -> &Option<String>| {
            mine.iter()
                .filter_map(|(_, r)| get(r).as_deref())
                .filter_map(|a| input_action(a).ok())
                .max()
        };
        if let Some(a) = strictest(|r| &r.input) {
            p.input = a;
        }
        if let Some(a) = strictest(|r| &r.tool_input) {
            p.tool_input = a;
        }
        for c in Class::PATTERNS {
            let a = mine
                .iter()
                .map(|(_, r)| {
                    let mut one = before.clone();
                    apply(&mut one, r);
                    one.output.action(c)
                })
                .max()
                .unwrap_or(OutputAction::Off);
            p.output.set(c, a);
        }
    }
    p
}

/// Overrides `p` with the keys `c` sets.
fn apply(p: &mut Policy, c: &GuardrailPolicyConfig) {
    let ia = |s: &Option<String>| s.as_deref().and_then(|s| input_action(s).ok());
    let oa = |s: &Option<String>| s.as_deref().and_then(|s| output_action(s).ok());
    if let Some(a) = ia(&c.input) {
        p.input = a;
    }
    if let Some(a) = ia(&c.tool_input) {
        p.tool_input = a;
    }
    if let Some(t) = c.threshold {
        p.threshold = t;
    }
    if let Some(t) = c.tool_threshold {
        p.tool_threshold = t;
    }
    if let Some(s) = &c.system_messages {
        p.refuse_system = s == "refuse";
    }
    if let Some(s) = &c.system_prompt {
        p.system_prompt = Some(s.clone());
    }
    if let Some(b) = c.canary {
        p.canary = b;
    }
    if let Some(b) = c.classifier {
        p.classifier = b;
    }
    if let Some(a) = oa(&c.secrets) {
        for class in Class::SECRETS {
            p.output.set(class, a);
        }
    }
    let pii_action = oa(&c.pii_action);
    if let Some(list) = &c.pii {
        let a = pii_action.unwrap_or(OutputAction::Redact);
        for class in Class::PII {
            let on = list.iter().any(|n| n == class.name());
            p.output.set(class, if on { a } else { OutputAction::Off });
        }
    } else if let Some(a) = pii_action {
        for class in Class::PII {
            if p.output.action(class) != OutputAction::Off {
                p.output.set(class, a);
            }
        }
    }
    if let Some(a) = oa(&c.links) {
        p.output.set(Class::Link, a);
    }
    if let Some(l) = &c.link_allowlist {
        p.output.link_allowlist = l.clone();
    }
    for (name, a) in c.classes.iter().flatten() {
        if let (Some(class), Ok(a)) = (Class::from_name(name), output_action(a)) {
            p.output.set(class, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> GuardrailPolicyConfig {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn layers_override_key_by_key_and_roles_take_the_strictest() {
        let defaults = t("input = \"flag\"\npii = [\"email\"]\n");
        let tenants = BTreeMap::from([("acme".to_owned(), t("input = \"off\"\n"))]);
        let roles = BTreeMap::from([
            ("a".to_owned(), t("input = \"block\"\n")),
            (
                "b".to_owned(),
                t("input = \"flag\"\nclasses = { jwt = \"block\" }\n"),
            ),
        ]);
        let models = BTreeMap::from([("m".to_owned(), t("system_messages = \"refuse\"\n"))]);
        let p = resolve(&defaults, &models, &tenants, &roles, "m", "acme", &[]);
        assert_eq!(p.input, InputAction::Off);
        assert!(p.refuse_system);
        assert_eq!(p.output.action(Class::Email), OutputAction::Redact);
        assert_eq!(p.output.action(Class::Phone), OutputAction::Off);
        let p = resolve(
            &defaults,
            &models,
            &tenants,
            &roles,
            "x",
            "acme",
            &["b".into(), "a".into()],
        );
        assert_eq!(p.input, InputAction::Block);
        assert_eq!(p.output.action(Class::Jwt), OutputAction::Block);
        assert!(!p.refuse_system);
    }

    #[test]
    fn bad_values_name_the_key() {
        assert_eq!(check(&t("input = \"deny\"\n")).unwrap_err().0, "input");
        assert_eq!(check(&t("pii = [\"ssn\"]\n")).unwrap_err().0, "pii[0]");
        assert_eq!(
            check(&t("classes = { jwt2 = \"redact\" }\n"))
                .unwrap_err()
                .0,
            "classes.jwt2"
        );
        assert_eq!(check(&t("threshold = 0.0\n")).unwrap_err().0, "threshold");
        assert!(check(&t("secrets = \"block\"\nlinks = \"redact\"\n")).is_ok());
    }
}
