//! `moat audit verify`: checks sequence numbers, the hash chain and every HMAC across the
//! given files (rotated ones included), and the head, and names the first record that is
//! wrong.
//!
//! What each tampering looks like here:
//! - an edited record, a forged one, or one spliced in from another moat's log: its HMAC
//!   does not match (the other moat had another key);
//! - a deleted record: the next one's sequence number jumps (and its `prev` is wrong);
//! - an inserted copy of a real record, or two records swapped: a sequence number goes back;
//! - records cut off the end: the log ends before the head says it does; a record cut in the
//!   middle has no newline and no valid HMAC.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    chain::{AuditKey, GENESIS, Head, line_hash},
    files::{self, HEAD},
    record::Record,
};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub files: Vec<PathBuf>,
    /// Records that verified before the first bad one (all of them when none is bad).
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The head the log was compared with, if one was found.
    pub head_seq: Option<u64>,
    pub first_bad: Option<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `file:line`.
    pub at: String,
    /// The record's sequence number, when it could be read.
    pub seq: Option<u64>,
    pub problem: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.first_bad {
            None => writeln!(
                f,
                "ok: {} records (seq {}..{}) in {} file(s){}",
                self.records,
                self.first_seq.unwrap_or(0),
                self.last_seq.unwrap_or(0),
                self.files.len(),
                match self.head_seq {
                    Some(h) => format!(", head at seq {h}"),
                    None => ", no head checked".into(),
                }
            ),
            Some(p) => writeln!(
                f,
                "FAILED at {}{}: {}\n({} records verified before it)",
                p.at,
                p.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
                p.problem,
                self.records
            ),
        }
    }
}

/// Verifies `files` (any order: they are put in log order by their first record). With
/// `head_dir`, the log must also end where that directory's head says. With `partial`, the
/// first record need not be seq 1 (older rotated files were archived away).
pub fn verify(
    files: &[PathBuf],
    key: &AuditKey,
    head_dir: Option<&Path>,
    partial: bool,
) -> io::Result<Report> {
    let mut ordered: Vec<(u64, PathBuf)> = Vec::new();
    for f in files {
        let first = files::lines(std::slice::from_ref(f))?
            .first()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(&l.text).ok())
            .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
            .unwrap_or(u64::MAX);
        ordered.push((first, f.clone()));
    }
    ordered.sort_by_key(|(seq, _)| *seq);
    let files: Vec<PathBuf> = ordered.into_iter().map(|(_, f)| f).collect();
    let mut report = Report {
        files: files.clone(),
        records: 0,
        first_seq: None,
        last_seq: None,
        head_seq: None,
        first_bad: None,
    };
    let mut prev_hash = GENESIS.to_owned();
    let mut last_seq: Option<u64> = None;
    for line in files::lines(&files)? {
        let bad = |seq: Option<u64>, problem: String| Problem {
            at: line.at(),
            seq,
            problem,
        };
        let seq_of = serde_json::from_str::<serde_json::Value>(&line.text)
            .ok()
            .and_then(|v| v.get("seq").and_then(|s| s.as_u64()));
        if !line.complete {
            report.first_bad = Some(bad(
                seq_of.or(last_seq.map(|s| s + 1)),
                "the last line is cut off (no newline): the file was truncated".into(),
            ));
            return Ok(report);
        }
        match key.check(&line.text) {
            None => {
                report.first_bad = Some(bad(seq_of, "not a sealed audit record".into()));
                return Ok(report);
            }
            Some(false) => {
                report.first_bad = Some(bad(
                    seq_of,
                    "HMAC does not match: the record was edited or forged, or comes from \
                     another moat's log (another key)"
                        .into(),
                ));
                return Ok(report);
            }
            Some(true) => {}
        }
        let rec: Record = match serde_json::from_str(&line.text) {
            Ok(r) => r,
            Err(e) => {
                report.first_bad = Some(bad(seq_of, format!("undecodable record: {e}")));
                return Ok(report);
            }
        };
        let problem = match last_seq {
            None if rec.seq != 1 && !partial => Some(format!(
                "the log starts at seq {} instead of 1: records 1..{} are missing (pass the \
                 older files too, or --partial if they were archived)",
                rec.seq,
                rec.seq - 1
            )),
            None if rec.seq == 1 && rec.prev != GENESIS => {
                Some("the first record does not start a chain".into())
            }
            None => None,
            Some(last) if rec.seq > last + 1 => Some(format!(
                "seq jumps from {last} to {}: records {}..{} are missing here (deleted, or \
                 moved further down)",
                rec.seq,
                last + 1,
                rec.seq - 1
            )),
            Some(last) if rec.seq <= last => Some(format!(
                "seq {} after seq {last}: records were reordered, or a copy inserted",
                rec.seq
            )),
            Some(_) if rec.prev != prev_hash => Some(
                "prev is not the hash of the record before it: a record before this one was \
                 replaced"
                    .into(),
            ),
            Some(_) => None,
        };
        if let Some(p) = problem {
            report.first_bad = Some(bad(Some(rec.seq), p));
            return Ok(report);
        }
        report.first_seq.get_or_insert(rec.seq);
        report.records += 1;
        last_seq = Some(rec.seq);
        report.last_seq = last_seq;
        prev_hash = line_hash(&line.text);
    }
    if let Some(dir) = head_dir {
        let path = dir.join(HEAD);
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => {
                let at = path.display().to_string();
                match Head::open(&text, key) {
                    Err(e) => {
                        report.first_bad = Some(Problem {
                            at,
                            seq: None,
                            problem: e,
                        })
                    }
                    Ok(head) => {
                        report.head_seq = Some(head.seq);
                        let end = last_seq.unwrap_or(0);
                        if end < head.seq {
                            report.first_bad = Some(Problem {
                                at,
                                seq: Some(end + 1),
                                problem: format!(
                                    "the log ends at seq {end} but the head says {}: records \
                                     {}..{} were cut off the end",
                                    head.seq,
                                    end + 1,
                                    head.seq
                                ),
                            });
                        } else if end == head.seq && head.hash != prev_hash {
                            report.first_bad = Some(Problem {
                                at,
                                seq: Some(end),
                                problem: "the last record is not the one the head names".into(),
                            });
                        }
                        // end > head.seq: a crash between syncing the log and the head.
                    }
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{
        record::{Event, Source},
        writer::{Options, Writer},
    };

    fn log(dir: &Path, key: u8, n: u32) -> Vec<String> {
        let mut w = Writer::open(
            dir,
            AuditKey::for_tests(key),
            Options {
                max_file_bytes: u64::MAX,
                rotate: false,
                group: None,
                syslog: false,
            },
        )
        .unwrap();
        for i in 0..n {
            w.append(&[(
                Source::Cli,
                Event::RefreshReuse {
                    sid: format!("s{i}"),
                },
            )])
            .unwrap();
        }
        std::fs::read_to_string(dir.join(files::CURRENT))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Writes `lines` as a copy and verifies it against `dir`'s head; the first bad seq.
    fn first_bad(dir: &Path, lines: &[String], key: u8) -> Option<u64> {
        let copy = dir.join("copy.log");
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&copy, text).unwrap();
        let r = verify(&[copy], &AuditKey::for_tests(key), Some(dir), false).unwrap();
        r.first_bad.map(|p| p.seq.unwrap())
    }

    #[test]
    fn each_tampering_names_its_first_bad_record() {
        let t = tempfile::tempdir().unwrap();
        let (ours, theirs) = (t.path().join("a"), t.path().join("b"));
        let lines = log(&ours, 1, 8);
        let other = log(&theirs, 2, 8);
        assert_eq!(first_bad(&ours, &lines, 1), None);
        let mut edited = lines.clone();
        edited[3] = edited[3].replace("\"s3\"", "\"s9\"");
        assert_eq!(first_bad(&ours, &edited, 1), Some(4));
        let mut deleted = lines.clone();
        deleted.remove(3);
        assert_eq!(first_bad(&ours, &deleted, 1), Some(5));
        let mut inserted = lines.clone();
        inserted.insert(5, lines[1].clone());
        assert_eq!(first_bad(&ours, &inserted, 1), Some(2));
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert_eq!(first_bad(&ours, &swapped, 1), Some(5));
        assert_eq!(first_bad(&ours, &lines[..6], 1), Some(7));
        let mut spliced = lines.clone();
        spliced[3] = other[3].clone();
        assert_eq!(first_bad(&ours, &spliced, 1), Some(4));
        // The wrong key fails at once.
        assert!(first_bad(&ours, &lines, 2).is_some());
    }
}
