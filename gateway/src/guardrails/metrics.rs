//! Guardrail counters for the admin plane's `/metrics`: prompts blocked or flagged per rule,
//! answer findings per class and action. Process-wide (they outlive config reloads), rendered
//! in the Prometheus text format next to the kernel's counters.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{LazyLock, Mutex},
};

use super::{InputAction, output::Class};

type Counts = Mutex<BTreeMap<(String, &'static str), u64>>;

static INPUT: LazyLock<Counts> = LazyLock::new(Counts::default);
static OUTPUT: LazyLock<Counts> = LazyLock::new(Counts::default);

fn bump(c: &Counts, key: String, action: &'static str) {
    let mut m = c.lock().unwrap_or_else(|e| e.into_inner());
    *m.entry((key, action)).or_default() += 1;
}

/// A prompt acted on: each rule that hit, with the action.
pub fn input(rules: &[String], action: InputAction) {
    let a = match action {
        InputAction::Block => "block",
        InputAction::Flag => "flag",
        InputAction::Off => return,
    };
    for r in rules {
        bump(&INPUT, r.clone(), a);
    }
}

/// A finding in an answer: `redact`, `block`, or `error` (the filter failed and ended it).
pub fn output(class: Option<Class>, action: &'static str) {
    bump(
        &OUTPUT,
        class.map_or("filter", Class::name).to_owned(),
        action,
    );
}

/// The counters, Prometheus text format.
pub fn render() -> String {
    let mut out = String::new();
    for (name, help, label, counts) in [
        (
            "moat_guardrail_input_total",
            "Prompts the guardrails acted on, per rule that hit and action.",
            "rule",
            &*INPUT,
        ),
        (
            "moat_guardrail_output_total",
            "Answer findings of the guardrails, per class and action.",
            "class",
            &*OUTPUT,
        ),
    ] {
        let m = counts.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for ((k, a), n) in m.iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{k}\",action=\"{a}\"}} {n}");
        }
    }
    out
}
