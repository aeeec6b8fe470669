//! `cni-agent install` and `cni-agent uninstall`: putting the plugins and a
//! conflist where a container runtime finds them, on a Kubernetes node (the
//! DaemonSet's init container) or a bare host.
//!
//! Every input is checked before anything is written — CIDRs, the plugin
//! binaries, the directories, other CNIs' configs in the conf dir — so bad
//! input changes nothing. Then every file that differs is staged as a synced
//! temp file beside its target, and all of them are renamed into place; a
//! runtime never runs a half-written plugin or reads a half-written
//! conflist. Files whose bytes are already right are not touched (a re-run,
//! e.g. each time the DaemonSet pod restarts, is a no-op). The manifest in
//! the state dir lists what was written, so `uninstall` removes exactly that.
pub mod conflist;
pub mod files;
pub mod node;

use std::{
    ffi::OsStr,
    fmt, fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::unistd::{access, AccessFlags};

use self::{
    conflist::{NetworkOptions, PodCidr},
    files::{
        digest_bytes, digest_file, mode_of, sync_dir, Manifest, SetAside, Staged, WrittenFile,
    },
};

/// The binaries a runtime needs from one bin dir: our plugins and the
/// `loopback` that containerd runs for every sandbox.
pub const PLUGINS: [&str; 6] = [
    "ebpf-bridge",
    "ebpf-host-local",
    "ebpf-portmap",
    "ebpf-firewall",
    "ebpf-bandwidth",
    "loopback",
];
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// `00-` so that it sorts first: runtimes use the first config file of the
/// conf dir in lexical order.
pub const DEFAULT_CONF_NAME: &str = "00-cni-ebpf.conflist";
pub const DEFAULT_NETWORK: &str = "cni-ebpf";
pub const DEFAULT_BRIDGE: &str = "cni-ebpf0";
/// The manifest's file name in the state dir.
pub const MANIFEST: &str = "install-manifest.json";
/// Suffix of what install saved before putting its own file in place:
/// another CNI's config set aside by `--force`, a plugin of the same name
/// (the reference `loopback`). Not a config extension, so runtimes skip it;
/// `uninstall` puts it back.
const SAVED_SUFFIX: &str = ".cni-ebpf-saved";
const SAME_NAME: &str = "has the same name as";
/// Config extensions libcni (and so containerd, CRI-O, podman) loads.
const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// Everything that stops an install or uninstall. Each is one line naming
/// what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no pod CIDR: {hint}")]
    NoPodCidr { hint: String },
    #[error("{source_of} {value:?}: invalid pod CIDR: {why}")]
    InvalidCidr {
        source_of: String,
        value: String,
        why: String,
    },
    #[error("node {node} has no pod CIDR (spec.podCIDRs and spec.podCIDR are empty): does the controller-manager allocate node CIDRs (--allocate-node-cidrs)? Or pass --pod-cidr")]
    NodeWithoutCidr { node: String },
    #[error("not in a Kubernetes pod ({why}): pass --pod-cidr, or run in the DaemonSet")]
    NotInCluster { why: String },
    #[error("Kubernetes API {url}: get node {node}: {why}")]
    Api {
        node: String,
        url: String,
        why: String,
    },
    #[error("plugin binary {name} is missing in {dir} (--from): build it or point --from at the directory that has all of {}", PLUGINS.join(", "))]
    MissingPlugin { name: String, dir: PathBuf },
    #[error("{flag} {path}: {why}")]
    BadDir {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--conf-dir {dir}: {other} is another network's config and {how} {ours}, so the runtime would use it instead of ours; remove it or pass --force to set it aside")]
    Conflict {
        dir: PathBuf,
        other: String,
        ours: String,
        how: &'static str,
    },
    #[error("--conf-name {0:?}: must be a plain file name ending in .conflist")]
    BadConfName(String),
    #[error("manifest {path} is unreadable ({why}): remove it to install afresh")]
    Manifest { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the pod CIDRs come from.
#[derive(Clone, Debug)]
pub enum CidrSource {
    /// `--pod-cidr`, repeatable.
    Flags(Vec<String>),
    /// The Node object of this name, waiting up to the duration for it.
    Node { name: String, wait: Duration },
    /// Neither was given.
    None,
}

/// `cni-agent install`'s options.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Directory holding the plugin binaries to install.
    pub from: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub conf_name: String,
    pub cidrs: CidrSource,
    pub network: NetworkOptions,
    /// Set aside other CNIs' configs that would win over ours.
    pub force: bool,
}

/// What happened to one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Unchanged,
    Removed,
    /// Not ours any more (changed since install): left alone.
    Kept,
    /// Already gone.
    Absent,
    /// Another CNI's config moved out of the way (to the path).
    SetAside(PathBuf),
    /// A set-aside config moved back.
    Restored,
    /// A directory install created, now empty, removed.
    DirRemoved,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Written => write!(f, "written"),
            Outcome::Unchanged => write!(f, "unchanged"),
            Outcome::Removed => write!(f, "removed"),
            Outcome::Kept => write!(f, "changed since install, kept"),
            Outcome::Absent => write!(f, "already gone"),
            Outcome::SetAside(to) => write!(f, "set aside as {}", to.display()),
            Outcome::Restored => write!(f, "restored"),
            Outcome::DirRemoved => write!(f, "directory removed"),
        }
    }
}

/// Per path, what install or uninstall did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub cidrs: Vec<String>,
    pub lines: Vec<(PathBuf, Outcome)>,
}

impl Report {
    /// True when nothing was changed.
    pub fn unchanged(&self) -> bool {
        self.lines.iter().all(|(_, o)| *o == Outcome::Unchanged)
    }
}

/// The pod CIDRs, checked.
fn resolve_cidrs(source: &CidrSource) -> Result<Vec<PodCidr>, InstallError> {
    let (origin, texts) = match source {
        // Comma-separated lists too, as kubelet spells podCIDRs (one
        // systemd EnvironmentFile variable can then carry both families).
        CidrSource::Flags(v) => (
            "--pod-cidr".to_string(),
            v.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        CidrSource::Node { name, wait } => (
            format!("node {name} spec.podCIDRs"),
            node::fetch_pod_cidrs(name, *wait)?,
        ),
        CidrSource::None => {
            return Err(InstallError::NoPodCidr {
                hint: "pass --pod-cidr (repeatable, one per address family), or --node-name \
                       (or NODE_NAME) to read the Node's spec.podCIDRs in a cluster"
                    .into(),
            })
        }
    };
    let cidrs = texts
        .iter()
        .map(|t| conflist::parse_cidr(&origin, t))
        .collect::<Result<Vec<_>, _>>()?;
    conflist::check_set(&origin, &cidrs)?;
    Ok(cidrs)
}

/// Directories that must be created for `dir` to exist (outermost first),
/// after checking that `dir`, or its nearest existing ancestor, is a
/// writable directory. `access(W_OK)` also catches a read-only mount, which
/// permission bits do not show to root.
fn check_dir(flag: &'static str, dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let bad = |why: String| InstallError::BadDir {
        flag,
        path: dir.to_path_buf(),
        why,
    };
    if !dir.is_absolute() {
        return Err(bad("must be an absolute path".into()));
    }
    let mut missing = Vec::new();
    let mut cur = dir.to_path_buf();
    loop {
        match fs::metadata(&cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(bad(format!("{} is not a directory", cur.display()))),
            // ENOTDIR: a component above is a file, found on the way up.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                missing.push(cur.clone());
                match cur.parent() {
                    Some(p) => cur = p.to_path_buf(),
                    None => return Err(bad("no existing parent directory".into())),
                }
            }
            Err(e) => return Err(bad(format!("{}: {e}", cur.display()))),
        }
    }
    access(&cur, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        bad(format!(
            "{}not writable: {}",
            if cur == dir {
                String::new()
            } else {
                format!("{} is ", cur.display())
            },
            io::Error::from(e)
        ))
    })?;
    missing.reverse();
    Ok(missing)
}

/// Whether a directory entry is a config file libcni would load.
fn is_cni_config(name: &OsStr) -> bool {
    Path::new(name)
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|e| CONF_EXTENSIONS.contains(&e))
}

/// Other CNIs' configs in the conf dir that a runtime would pick instead of
/// ours: those sorting before it (libcni sorts file names bytewise and takes
/// the first) and one of the same name that is not ours.
fn conflicts(
    conf_dir: &Path,
    conf_name: &str,
    new_digest: &str,
    manifest: &Manifest,
) -> Result<Vec<(String, &'static str)>, InstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(io_err(conf_dir)(source)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(conf_dir))?;
        let name = entry.file_name();
        if !is_cni_config(&name) {
            continue;
        }
        let text = name.to_string_lossy().into_owned();
        let how = match text.as_bytes().cmp(conf_name.as_bytes()) {
            std::cmp::Ordering::Less => "sorts before",
            std::cmp::Ordering::Equal => SAME_NAME,
            std::cmp::Ordering::Greater => continue,
        };
        let path = entry.path();
        let digest = digest_file(&path).map_err(io_err(&path))?;
        let ours = digest
            .as_deref()
            .is_some_and(|d| d == new_digest || manifest.digest_of(&path).is_some_and(|m| m == d));
        if !ours {
            out.push((text, how));
        }
    }
    out.sort();
    Ok(out)
}

/// One file to put in place.
struct Target {
    path: PathBuf,
    digest: String,
    source: Source,
}

enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// Installs the plugins and the conflist (see the module documentation).
pub fn install(opts: &InstallOptions) -> Result<Report, InstallError> {
    // 1. Check every input; nothing is written before all of it passes.
    if opts.conf_name.contains('/')
        || !opts.conf_name.ends_with(".conflist")
        || opts.conf_name.starts_with('.')
    {
        return Err(InstallError::BadConfName(opts.conf_name.clone()));
    }
    let cidrs = resolve_cidrs(&opts.cidrs)?;
    let mut targets = Vec::new();
    for name in PLUGINS {
        let src = opts.from.join(name);
        if !src.is_file() {
            return Err(InstallError::MissingPlugin {
                name: name.to_string(),
                dir: opts.from.clone(),
            });
        }
        let digest = digest_file(&src).map_err(io_err(&src))?.ok_or_else(|| {
            InstallError::MissingPlugin {
                name: name.to_string(),
                dir: opts.from.clone(),
            }
        })?;
        targets.push(Target {
            path: opts.bin_dir.join(name),
            digest,
            source: Source::File(src),
        });
    }
    let conf_bytes = conflist::render(&cidrs, &opts.network);
    let conf_path = opts.conf_dir.join(&opts.conf_name);
    let conf_digest = digest_bytes(&conf_bytes);
    let state_dir = &opts.network.paths.state_dir;
    let mut to_create = check_dir("--bin-dir", &opts.bin_dir)?;
    to_create.extend(check_dir("--conf-dir", &opts.conf_dir)?);
    to_create.extend(check_dir("--state-dir", state_dir)?);
    let mut seen = std::collections::BTreeSet::new();
    to_create.retain(|d| seen.insert(d.clone()));
    let manifest_path = state_dir.join(MANIFEST);
    let old = Manifest::load(&manifest_path)?;
    let conflicting = conflicts(&opts.conf_dir, &opts.conf_name, &conf_digest, &old)?;
    if let Some((other, how)) = conflicting.first().filter(|_| !opts.force) {
        return Err(InstallError::Conflict {
            dir: opts.conf_dir.clone(),
            other: other.clone(),
            ours: opts.conf_name.clone(),
            how,
        });
    }
    targets.push(Target {
        path: conf_path,
        digest: conf_digest,
        source: Source::Bytes(conf_bytes),
    });

    // 2. Stage what differs, then put it all in place. Directories made
    // here are removed again if staging fails.
    let mut report = Report {
        cidrs: cidrs.iter().map(|c| c.net.to_string()).collect(),
        lines: Vec::new(),
    };
    let mut made = Vec::new();
    let staged = (|| {
        for dir in &to_create {
            fs::create_dir(dir).map_err(io_err(dir))?;
            made.push(dir.clone());
        }
        let mut staged = Vec::new();
        for t in &targets {
            let mode = if matches!(t.source, Source::File(_)) {
                0o755
            } else {
                0o644
            };
            let current = digest_file(&t.path).map_err(io_err(&t.path))?;
            if mode_of(&t.path) == Some(mode) && current.as_deref() == Some(&t.digest) {
                report.lines.push((t.path.clone(), Outcome::Unchanged));
                continue;
            }
            // Someone else's file under our name (the reference loopback,
            // say) is saved first, and put back by uninstall.
            let foreign = current
                .as_deref()
                .is_some_and(|d| d != t.digest && old.digest_of(&t.path) != Some(d));
            let s = match &t.source {
                Source::File(src) => Staged::copy(src, &t.path, mode),
                Source::Bytes(b) => Staged::bytes(b, &t.path, mode),
            }
            .map_err(io_err(&t.path))?;
            staged.push((s, foreign));
        }
        Ok::<_, InstallError>(staged)
    })();
    let staged = match staged {
        Ok(s) => s,
        Err(e) => {
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    let mut created = old.created_dirs.clone();
    created.extend(made);
    let mut set_aside = old.set_aside.clone();
    let mut save = |from: &Path, rename: bool, report: &mut Report| {
        let name = from.file_name().unwrap_or_default().to_string_lossy();
        let to = from.with_file_name(format!("{name}{SAVED_SUFFIX}"));
        if rename {
            fs::rename(from, &to).map_err(io_err(from))?;
        } else {
            fs::copy(from, &to).map_err(io_err(&to))?;
        }
        report
            .lines
            .push((from.to_path_buf(), Outcome::SetAside(to.clone())));
        set_aside.retain(|s| s.path != from);
        set_aside.push(SetAside {
            path: from.to_path_buf(),
            moved_to: to,
        });
        Ok::<_, InstallError>(())
    };
    for (s, foreign) in staged {
        let path = s.target().to_path_buf();
        if foreign {
            save(&path, false, &mut report)?;
        }
        s.commit().map_err(io_err(&path))?;
        report.lines.push((path, Outcome::Written));
    }
    // With --force, configs sorting before ours go out of the way once ours
    // is in place (so the conf dir never lacks a usable config).
    if opts.force {
        for (name, how) in &conflicting {
            if *how != SAME_NAME {
                save(&opts.conf_dir.join(name), true, &mut report)?;
            }
        }
    }
    if !conflicting.is_empty() {
        sync_dir(&opts.conf_dir).map_err(io_err(&opts.conf_dir))?;
    }
    // Files of an earlier install that this one no longer writes (another
    // --conf-name, say), if they are still as we left them.
    for f in &old.files {
        if targets.iter().any(|t| t.path == f.path) {
            continue;
        }
        if digest_file(&f.path).ok().flatten().as_deref() == Some(&f.sha256) {
            fs::remove_file(&f.path).map_err(io_err(&f.path))?;
            report.lines.push((f.path.clone(), Outcome::Removed));
        }
    }

    // 3. The manifest, rewritten only when it changes.
    let manifest = Manifest {
        files: targets
            .iter()
            .map(|t| WrittenFile {
                path: t.path.clone(),
                sha256: t.digest.clone(),
            })
            .collect(),
        created_dirs: created,
        set_aside,
    };
    if manifest != old {
        Staged::bytes(&manifest.to_bytes(), &manifest_path, 0o644)
            .and_then(Staged::commit)
            .map_err(io_err(&manifest_path))?;
    }
    report.lines.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(report)
}

/// Removes what the manifest in `state_dir` lists, where it is still what
/// install wrote; puts set-aside configs back; removes the directories
/// install created once empty; then the manifest.
pub fn uninstall(state_dir: &Path) -> Result<Report, InstallError> {
    let manifest_path = state_dir.join(MANIFEST);
    let manifest = Manifest::load(&manifest_path)?;
    let mut report = Report::default();
    for f in &manifest.files {
        let outcome = match digest_file(&f.path).map_err(io_err(&f.path))? {
            None => Outcome::Absent,
            Some(d) if d == f.sha256 => {
                fs::remove_file(&f.path).map_err(io_err(&f.path))?;
                if let Some(dir) = f.path.parent() {
                    sync_dir(dir).map_err(io_err(dir))?;
                }
                Outcome::Removed
            }
            Some(_) => Outcome::Kept,
        };
        report.lines.push((f.path.clone(), outcome));
    }
    for s in &manifest.set_aside {
        if s.moved_to.exists() && !s.path.exists() {
            fs::rename(&s.moved_to, &s.path).map_err(io_err(&s.moved_to))?;
            report.lines.push((s.path.clone(), Outcome::Restored));
        } else if s.moved_to.exists() {
            // Something took the name since: the saved file stays.
            report.lines.push((s.moved_to.clone(), Outcome::Kept));
        }
    }
    match fs::remove_file(&manifest_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_err(&manifest_path)(source)),
    }
    for dir in manifest.created_dirs.iter().rev() {
        // Only if empty: remove_dir refuses otherwise, which is the point.
        if fs::remove_dir(dir).is_ok() {
            report.lines.push((dir.clone(), Outcome::DirRemoved));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidr_flags_take_comma_separated_lists() {
        let cidrs = resolve_cidrs(&CidrSource::Flags(vec![
            "10.244.1.0/24, fd00:10:244:1::/64".into(),
        ]))
        .expect("two CIDRs");
        assert_eq!(cidrs.len(), 2);
        assert!(resolve_cidrs(&CidrSource::Flags(vec![",".into()])).is_err());
        assert!(matches!(
            resolve_cidrs(&CidrSource::None),
            Err(InstallError::NoPodCidr { .. })
        ));
    }
}
