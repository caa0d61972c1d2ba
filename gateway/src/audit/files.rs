//! The log's files in its directory: `audit.log` is written to; rotated files are
//! `audit-<last seq, 20 digits>.log`, so their names sort in log order; `head` holds the
//! sealed [`super::chain::Head`].

use std::{
    io::{self, BufRead},
    path::{Path, PathBuf},
};

pub const CURRENT: &str = "audit.log";
pub const HEAD: &str = "head";

/// A rotated file's name.
pub fn rotated_name(last_seq: u64) -> String {
    format!("audit-{last_seq:020}.log")
}

fn is_rotated(name: &str) -> bool {
    name.strip_prefix("audit-")
        .and_then(|r| r.strip_suffix(".log"))
        .is_some_and(|d| d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Every file of the log in `dir`, oldest first (rotated ones, then the current one).
pub fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_rotated(n))
        .collect();
    rotated.sort();
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|n| dir.join(n)).collect();
    let current = dir.join(CURRENT);
    if current.exists() {
        out.push(current);
    }
    Ok(out)
}

/// Whether `dir` holds a log with at least one record.
pub fn log_exists(dir: &Path) -> bool {
    list(dir).is_ok_and(|files| {
        files
            .iter()
            .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
    })
}

/// Every line of `files`, in order, with where it came from (file, 1-based line number).
/// A last line without its newline is returned too (flagged), so a cut-off record shows.
pub fn lines(files: &[PathBuf]) -> io::Result<Vec<Line>> {
    let mut out = Vec::new();
    for f in files {
        let file = std::fs::File::open(f)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
        let mut reader = io::BufReader::new(file);
        let mut n = 0;
        loop {
            let mut buf = Vec::new();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            n += 1;
            let complete = buf.last() == Some(&b'\n');
            if complete {
                buf.pop();
            }
            out.push(Line {
                file: f.clone(),
                number: n,
                text: String::from_utf8_lossy(&buf).into_owned(),
                complete,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct Line {
    pub file: PathBuf,
    pub number: usize,
    pub text: String,
    /// Ended by a newline (a record cut off by truncation is not).
    pub complete: bool,
}

impl Line {
    pub fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.number)
    }
}
