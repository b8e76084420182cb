//! How kasctl shows results: tables for people (comfy-table, no borders, so they
//! read well and `grep`/`awk` well), pretty JSON with `-o json`, and the files it
//! writes (tokens, kubeconfigs: owner-only).

use anyhow::{Context, Result};
use comfy_table::{presets, Table};
use kas_api::clock::unix_secs;
use serde::Serialize;
use std::path::Path;

/// Where a command's result goes.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub json: bool,
}

impl Out {
    /// `v` as JSON with `-o json`, otherwise whatever `text` prints.
    pub fn show<T: Serialize>(&self, v: &T, text: impl FnOnce(&T)) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            text(v);
        }
        Ok(())
    }
}

/// Prints a table: a header row, then one row per item, columns aligned.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(headers.to_vec());
    for r in rows {
        t.add_row(r);
    }
    let last = headers.len().saturating_sub(1);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, if i == last { 0 } else { 3 }));
    }
    println!("{}", t.trim_fmt());
}

/// How long ago `secs` (unix seconds) was, briefly: `42s`, `5m`, `3h`.
pub fn since(secs: u64) -> String {
    let d = unix_secs().saturating_sub(secs);
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        _ => format!("{}h", d / 3600),
    }
}

/// `v`, or `-` when empty.
pub fn or_dash(v: &str) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        v.to_string()
    }
}

/// Writes `data` to `path`, readable by its owner only (it holds a secret).
pub fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}
