//! `guardrails-corpus`: runs the labelled corpus (`tests/corpus/guardrails/corpus.jsonl`, see
//! its PROVENANCE.md) through the shipped rules with the default policy (user content acts at
//! a score of 1.0, tool content at 0.5) and prints, per category, how many samples the rules
//! would act on: the detection rate for injections, the false-positive rate for benign ones.
//! `--verbose` lists the misses and the false positives with the rules that hit.

use std::collections::BTreeMap;

use moat::{config::GuardrailsConfig, guardrails::Guardrails};
use serde_json::Value;

fn main() -> anyhow::Result<()> {
    let verbose = std::env::args().any(|a| a == "--verbose");
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/guardrails/corpus.jsonl")
        });
    let g = Guardrails::build(&GuardrailsConfig {
        enabled: true,
        ..GuardrailsConfig::default()
    })
    .map_err(|(k, r)| anyhow::anyhow!("{k}: {r}"))?;
    let policy = moat::guardrails::Policy::default();
    // (label, category) -> (acted on, total)
    let mut counts: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
    for line in std::fs::read_to_string(&path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)?;
        let (label, category, source, text) = (
            v["label"].as_str().unwrap_or_default(),
            v["category"].as_str().unwrap_or_default(),
            v["source"].as_str().unwrap_or("user"),
            v["text"].as_str().unwrap_or_default(),
        );
        let hits = g.rules_hit(text);
        let score: f32 = hits.iter().map(|h| h.1).sum();
        let threshold = if source == "tool" {
            policy.tool_threshold
        } else {
            policy.threshold
        };
        let acted = !hits.is_empty() && score >= threshold;
        let c = counts
            .entry((label.to_owned(), category.to_owned()))
            .or_default();
        c.1 += 1;
        if acted {
            c.0 += 1;
        }
        let wrong = acted != (label == "injection");
        if verbose && wrong {
            let ids: Vec<&str> = hits.iter().map(|h| h.0).collect();
            println!("{label:9} {category:22} {:?} -> [{}]", text, ids.join(", "));
        }
    }
    println!(
        "shipped rules {} — default policy (user threshold {}, tool threshold {})",
        moat::guardrails::rules::VERSION,
        policy.threshold,
        policy.tool_threshold
    );
    println!(
        "{:10} {:22} {:>8} {:>8}",
        "label", "category", "acted", "rate"
    );
    let mut totals: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for ((label, category), (hit, n)) in &counts {
        let what = if label == "injection" {
            "detected"
        } else {
            "false pos"
        };
        println!(
            "{label:10} {category:22} {hit:>4}/{n:<3} {:>6.1}% {what}",
            100.0 * *hit as f64 / *n as f64
        );
        let t = totals.entry(label.clone()).or_default();
        t.0 += hit;
        t.1 += n;
    }
    for (label, (hit, n)) in totals {
        let what = if label == "injection" {
            "detection rate"
        } else {
            "false-positive rate"
        };
        println!(
            "{label:10} {:22} {hit:>4}/{n:<3} {:>6.1}% {what}",
            "all",
            100.0 * hit as f64 / n as f64
        );
    }
    Ok(())
}
