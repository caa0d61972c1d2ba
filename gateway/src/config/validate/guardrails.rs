//! `[guardrails]`: compiled here (`crate::guardrails::Guardrails::build` checks the values and
//! the operator rules), then the names it uses are checked against the rest of the file: the
//! roles and models its policies are keyed by, and the classifier's model.

use std::sync::Arc;

use super::{Invalid, known};
use crate::{config::RawConfig, guardrails::Guardrails, policy_grammar::check_name};

/// Checks and compiles `[guardrails]`.
pub(in crate::config) fn guardrails(raw: &RawConfig) -> Result<Arc<Guardrails>, Invalid> {
    let g = Guardrails::build(&raw.guardrails)
        .map_err(|(key, reason)| Invalid::new(format!("guardrails.{key}"), reason))?;
    let c = &raw.guardrails;
    for name in c.roles.keys() {
        if !raw.roles.contains_key(name) {
            return Err(Invalid::new(
                format!("guardrails.roles.{name}"),
                format!("no role named `{name}` (known: {})", known(&raw.roles)),
            ));
        }
    }
    for name in c.models.keys() {
        if !raw.models.contains_key(name) {
            return Err(Invalid::new(
                format!("guardrails.models.{name}"),
                format!("no model named `{name}` (known: {})", known(&raw.models)),
            ));
        }
    }
    for name in c.tenants.keys() {
        check_name("tenant", name)
            .map_err(|e| Invalid::new(format!("guardrails.tenants.{name}"), e.to_string()))?;
    }
    if let Some(cl) = &c.classifier
        && !raw.models.contains_key(&cl.model)
    {
        return Err(Invalid::new(
            "guardrails.classifier.model",
            format!(
                "no model named `{}` (known: {})",
                cl.model,
                known(&raw.models)
            ),
        ));
    }
    Ok(Arc::new(g))
}

#[cfg(test)]
mod tests {
    use crate::config::tests::load;

    #[test]
    fn bad_guardrails_name_file_key_and_reason() {
        let cases = [
            (
                "[guardrails]\ninvisible = \"drop\"\n",
                "guardrails.invisible",
            ),
            (
                "[guardrails.policy]\ninput = \"deny\"\n",
                "guardrails.policy.input",
            ),
            (
                "[guardrails.roles.nope]\ninput = \"off\"\n",
                "guardrails.roles.nope",
            ),
            (
                "[guardrails.models.nope]\ninput = \"off\"\n",
                "guardrails.models.nope",
            ),
            (
                "[guardrails]\nrules = [{ id = \"a\", pattern = \"(x\" }]\n",
                "guardrails.rules[0].pattern",
            ),
            (
                "[guardrails]\nrules = [{ id = \"bad id\", pattern = \"x\" }]\n",
                "guardrails.rules[0].id",
            ),
            (
                "[guardrails.classifier]\nmodel = \"nope\"\n",
                "guardrails.classifier.model",
            ),
            (
                "[guardrails.tenants.acme]\nsecrets = \"hide\"\n",
                "guardrails.tenants.acme.secrets",
            ),
            ("[guardrails]\nbogus = 1\n", "guardrails.bogus"),
        ];
        for (text, key) in cases {
            let e = load(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(!e.reason.is_empty());
        }
        let ok = load(
            "[guardrails]\nenabled = true\nrules = [{ id = \"acme.x\", pattern = \"bluebird\" }]\n",
        )
        .unwrap();
        assert!(ok.guardrails.enabled);
        assert!(ok.guardrails.rules.rules.iter().any(|r| r.id == "acme.x"));
    }
}
