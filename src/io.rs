//! The ground floor for files: atomic writes (a temporary name in the same directory, then a
//! rename), JSON and text in and out, and directory copies. Every module that writes a file a
//! user reads goes through here, so a killed process never leaves half a file under its real name.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// The temporary name `path` is written under before the rename (same directory, so the rename
/// is atomic; the process id keeps two writers apart).
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write bytes produced by `write` to `path` atomically: a temp file in the same directory,
/// fsynced, then renamed; on failure the temp file is removed. `io_err` turns an I/O error on a
/// path into the caller's error type.
pub fn write_atomic<E>(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<(), E>,
    io_err: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let tmp = tmp_path(path);
    let result = File::create(&tmp).map_err(|e| io_err(&tmp, e)).and_then(|mut f| {
        write(&mut f)?;
        f.sync_all().map_err(|e| io_err(&tmp, e))
    });
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| io_err(path, e)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("{}: {e}", path.display())
}

/// `s` into `path`, atomically.
pub fn write_text(path: &Path, s: &str) -> anyhow::Result<()> {
    write_atomic(
        path,
        |f| {
            use std::io::Write;
            f.write_all(s.as_bytes()).map_err(|e| io_error(path, e))
        },
        io_error,
    )
}

/// `v` pretty-printed (with a final newline) into `path`, atomically.
pub fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    write_text(path, &(serde_json::to_string_pretty(v)? + "\n"))
}

/// The JSON document in `path`; the error names the file.
pub fn read_json(path: &Path) -> anyhow::Result<Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Copy the directory `from` into `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("{}: cannot copy", src.display()))?;
        }
    }
    Ok(())
}
