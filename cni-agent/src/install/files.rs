//! Writing into directories that a container runtime reads while we write:
//! every file goes to a temp file in the target's own directory, is synced,
//! and only then renamed over the target (a rename within one filesystem is
//! atomic), so a runtime sees the old file or the new one, never half of
//! one. The manifest says what `install` wrote, by content digest, so that
//! `uninstall` removes exactly that and nothing an operator put there since.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Suffix of staged files: not a CNI config extension, so libcni never
/// reads a staged conflist, and hidden (leading dot) in `ls`.
const TMP_SUFFIX: &str = ".cni-ebpf-tmp";

/// Hex SHA-256 of `bytes`.
pub fn digest_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file's content, `None` if there is no such file.
pub fn digest_file(path: &Path) -> io::Result<Option<String>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Some(hex(&h.finalize())))
}

/// Permission bits of a file, `None` if there is no such file.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Fsyncs a directory, so a rename or unlink in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A complete, synced temp file next to its target, not yet visible under
/// the target's name. Dropped without [`commit`](Staged::commit), it is
/// removed.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    fn tmp_path(target: &Path) -> PathBuf {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        target.with_file_name(format!(".{name}{TMP_SUFFIX}"))
    }

    /// Writes `fill`'s output to a temp file of mode `mode` beside `target`
    /// and syncs it.
    fn new(
        target: &Path,
        mode: u32,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<Staged> {
        let tmp = Self::tmp_path(target);
        let staged = Staged {
            tmp: tmp.clone(),
            target: target.to_path_buf(),
            committed: false,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode on creation.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fill(&mut f)?;
        f.sync_all()?;
        Ok(staged)
    }

    /// Stages a copy of `src`.
    pub fn copy(src: &Path, target: &Path, mode: u32) -> io::Result<Staged> {
        let mut from = File::open(src)?;
        Self::new(target, mode, |f| io::copy(&mut from, f).map(|_| ()))
    }

    /// Stages `bytes`.
    pub fn bytes(bytes: &[u8], target: &Path, mode: u32) -> io::Result<Staged> {
        Self::new(target, mode, |f| f.write_all(bytes))
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temp file over the target and syncs the directory.
    pub fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// One file `install` wrote, with the digest of what it wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub sha256: String,
}

/// Another CNI's config that `install --force` set aside so ours is the
/// one the runtime uses; `uninstall` puts it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetAside {
    pub path: PathBuf,
    pub moved_to: PathBuf,
}

/// What `install` wrote: `<state-dir>/install-manifest.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub files: Vec<WrittenFile>,
    /// Directories `install` created (deepest last); `uninstall` removes
    /// them when they are empty again.
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub set_aside: Vec<SetAside>,
}

impl Manifest {
    /// The digest recorded for `path`, if install wrote it.
    pub fn digest_of(&self, path: &Path) -> Option<&str> {
        self.files
            .iter()
            .find(|f| f.path == path)
            .map(|f| f.sha256.as_str())
    }

    /// The manifest at `path`; an absent file is an empty manifest.
    pub fn load(path: &Path) -> Result<Manifest, super::InstallError> {
        match fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| super::InstallError::Manifest {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(source) => Err(super::InstallError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.created_dirs.is_empty() && self.set_aside.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_appear_only_on_commit_and_vanish_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("plugin");
        let s = Staged::bytes(b"new", &target, 0o755).expect("stage");
        assert!(!target.exists());
        s.commit().expect("commit");
        assert_eq!(fs::read(&target).expect("read"), b"new");
        assert_eq!(mode_of(&target), Some(0o755));
        let s = Staged::bytes(b"newer", &target, 0o755).expect("stage");
        drop(s);
        assert_eq!(fs::read(&target).expect("read"), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(
            digest_file(&target).expect("digest"),
            Some(digest_bytes(b"new"))
        );
        assert_eq!(digest_file(&dir.path().join("none")).expect("none"), None);
    }
}
