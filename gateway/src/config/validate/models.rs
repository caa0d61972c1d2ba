//! `[models.*]`: each model's shared pool exists and its request limits are usable. Which
//! tenants may use which pool is [`super::tenancy`]'s check.

use std::collections::BTreeMap;

use super::{Invalid, known};
use crate::config::{ModelConfig, Pool};

pub(in crate::config) fn models(
    models: &BTreeMap<String, ModelConfig>,
    pools: &BTreeMap<String, Pool>,
) -> Result<(), Invalid> {
    for (name, model) in models {
        let key = |k: &str| format!("models.{name}.{k}");
        if !pools.contains_key(&model.pool) {
            return Err(Invalid::new(
                key("pool"),
                format!("no pool named `{}` (known: {})", model.pool, known(pools)),
            ));
        }
        for (k, v) in [
            ("max_messages", model.max_messages as u64),
            ("max_tokens", model.max_tokens),
            ("max_n", model.max_n),
            ("max_inputs", model.max_inputs as u64),
        ] {
            if v == 0 {
                return Err(Invalid::new(key(k), "must be at least 1"));
            }
        }
        if model.upstream_model.as_deref() == Some("") {
            return Err(Invalid::new(key("upstream_model"), "must not be empty"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::load;

    #[test]
    fn model_with_unknown_pool_is_refused() {
        let e = load("[models.m]\npool = \"nope\"\n").unwrap_err();
        assert_eq!(e.key, "models.m.pool");
        assert_eq!(e.reason, "no pool named `nope` (known: none)");
    }

    #[test]
    fn limits_must_be_usable() {
        let pool = "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\n[models.m]\npool = \"gpu\"\n";
        for (extra, key) in [
            ("max_tokens = 0\n", "models.m.max_tokens"),
            ("max_inputs = 0\n", "models.m.max_inputs"),
            ("upstream_model = \"\"\n", "models.m.upstream_model"),
        ] {
            let e = load(&format!("{pool}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
        }
    }
}
