//! Reading records back for `GET /admin/audit?since=<seq>`: the worker may read the log (its
//! group may) but never write it.

use std::path::Path;

use serde_json::Value;

/// Records with `seq > since`, oldest first, at most `limit`; with `tenant`, only that
/// tenant's records. Lines that do not parse are skipped (`moat audit verify` is the judge of
/// integrity; this is a view).
pub fn since(
    dir: &Path,
    since: u64,
    tenant: Option<&str>,
    limit: usize,
) -> std::io::Result<Vec<Value>> {
    let files = super::files::list(dir)?;
    // Skip rotated files that end at or before `since` (their name is their last seq).
    let files: Vec<_> = files
        .into_iter()
        .filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("audit-"))
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_none_or(|last| last > since)
        })
        .collect();
    let mut out = Vec::new();
    for line in super::files::lines(&files)? {
        if !line.complete {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line.text) else {
            continue;
        };
        if v.get("seq")
            .and_then(Value::as_u64)
            .is_none_or(|s| s <= since)
        {
            continue;
        }
        if let Some(t) = tenant {
            let ev: Option<super::Event> = v
                .get("event")
                .and_then(|e| serde_json::from_value(e.clone()).ok());
            if ev.as_ref().and_then(|e| e.tenant()) != Some(t) {
                continue;
            }
        }
        out.push(v);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}
