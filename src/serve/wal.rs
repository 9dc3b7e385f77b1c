//! The service's write-ahead log: every accepted `POST /v1/interactions` is one JSON line
//! (`{"seq": n, "rows": [...]}`) appended to `<run>/serve/wal.jsonl` and fsynced before the reply,
//! so an acknowledged interaction survives a crash. `<run>/serve/applied` holds the newest
//! sequence number the ingest worker has put through `curec ingest`'s operators; on a restart the
//! entries after it are ingested again. Ingestion drops exact duplicates, so an entry applied
//! just before a crash (and before `applied` moved) is a no-op the second time.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One interaction as the API takes it (ids as in the raw log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub user: String,
    pub item: String,
    pub timestamp: i64,
    pub rating: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A retraction (`"op": "delete"`) rather than an addition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub rows: Vec<Row>,
}

pub struct Wal {
    file: File,
    dir: PathBuf,
    next: u64,
}

/// The service's folder in a run.
pub fn dir(run: &Path) -> PathBuf {
    run.join("serve")
}

impl Wal {
    /// Open (or create) the log; returns it and the entries not yet applied. A torn last line
    /// (a crash during a write that was never acknowledged) is cut off.
    pub fn open(run: &Path) -> Result<(Self, Vec<Entry>)> {
        let dir = dir(run);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join("wal.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let applied = applied(run)?;
        let mut entries = Vec::new();
        let mut good = 0u64; // bytes of complete, parsed lines
        let mut last = 0;
        {
            let mut r = BufReader::new(&file);
            r.seek(SeekFrom::Start(0))?;
            let mut line = String::new();
            let mut no = 0;
            loop {
                line.clear();
                let n = r.read_line(&mut line).with_context(|| format!("{}: cannot read", path.display()))?;
                if n == 0 {
                    break;
                }
                no += 1;
                if !line.ends_with('\n') {
                    break; // torn tail
                }
                let e: Entry = match serde_json::from_str(&line) {
                    Ok(e) => e,
                    Err(e) => {
                        // Only the last line may be torn; a bad line in the middle is damage.
                        let rest = r.read_line(&mut String::new()).unwrap_or(0);
                        anyhow::ensure!(rest == 0, "{}:{no}: not a log entry ({e})", path.display());
                        break;
                    }
                };
                good += n as u64;
                last = e.seq;
                if e.seq > applied {
                    entries.push(e);
                }
            }
        }
        if file.metadata()?.len() > good {
            file.set_len(good).with_context(|| format!("{}: cannot cut the torn tail", path.display()))?;
            file.sync_all()?;
        }
        Ok((Self { file, dir, next: last.max(applied) + 1 }, entries))
    }

    /// Append one entry and make it durable; returns its sequence number.
    pub fn append(&mut self, rows: Vec<Row>) -> Result<Entry> {
        let e = Entry { seq: self.next, rows };
        let mut line = serde_json::to_vec(&e)?;
        line.push(b'\n');
        self.file.write_all(&line).context("write-ahead log: write failed")?;
        self.file.sync_data().context("write-ahead log: fsync failed")?;
        self.next += 1;
        Ok(e)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The newest sequence number already ingested (0: none).
pub fn applied(run: &Path) -> Result<u64> {
    let p = dir(run).join("applied");
    match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse().with_context(|| format!("{}: not a sequence number", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", p.display())),
    }
}

/// Record that every entry up to `seq` is ingested (written to a temporary file, fsynced, renamed).
pub fn set_applied(run: &Path, seq: u64) -> Result<()> {
    let d = dir(run);
    let tmp = d.join("applied.tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
        writeln!(f, "{seq}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, d.join("applied"))?;
    if let Ok(dirf) = File::open(&d) {
        let _ = dirf.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(u: &str) -> Row {
        Row { user: u.into(), item: "i".into(), timestamp: 5, rating: 4.0, title: None, text: None, delete: false }
    }

    #[test]
    fn entries_after_applied_come_back_and_a_torn_tail_is_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let (mut w, pending) = Wal::open(run).unwrap();
        assert!(pending.is_empty());
        assert_eq!(w.append(vec![row("a")]).unwrap().seq, 1);
        assert_eq!(w.append(vec![row("b"), row("c")]).unwrap().seq, 2);
        drop(w);
        // A crash in the middle of a third write.
        let p = dir(run).join("wal.jsonl");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":3,\"rows\":[{\"us").unwrap();
        drop(f);
        set_applied(run, 1).unwrap();
        let (mut w, pending) = Wal::open(run).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].seq, 2);
        assert_eq!(pending[0].rows, vec![row("b"), row("c")]);
        assert_eq!(w.append(vec![row("d")]).unwrap().seq, 3);
        drop(w);
        let (_, pending) = Wal::open(run).unwrap();
        assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        // Damage in the middle is an error naming the line.
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, format!("garbage\n{text}")).unwrap();
        let err = Wal::open(run).err().unwrap().to_string();
        assert!(err.contains("wal.jsonl:1: not a log entry"), "{err}");
    }
}
