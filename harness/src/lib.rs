//! What the end-to-end tests (`cni-tests`) and the xtask's demo and
//! benchmark both need to stand up a node: network namespaces that remove
//! themselves and ways into them ([`netns`]), scratch directories
//! ([`tempdir`]), a GET of a pod's web page ([`http`]), and a CNI runtime:
//! what it hands each plugin of a conflist ([`conflist`]), how it runs one
//! plugin ([`invoke`]) and how it runs a conflist ([`runtime`]). One copy,
//! so a fix to how a namespace is made or a plugin is fed reaches both.
//!
//! Every constructor has a fallible form (`create`, for the xtask, which
//! reports errors) and, where the tests want one, a panicking form (`new`).
//! Running plugins only has the fallible form; the tests panic at their
//! call sites.
pub mod conflist;
pub mod http;
pub mod invoke;
pub mod netns;
pub mod runtime;
pub mod tempdir;

use std::path::{Path, PathBuf};

/// The entries of `dir` named `<prefix><pid>-…` whose process is gone (not
/// this one, no /proc/<pid>): what an earlier run left when it was killed
/// before its destructors ran, and the next run removes.
pub fn stale_entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
        })
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_of_dead_processes_are_stale() {
        let dir = tempdir::TempDir::new("stale");
        let me = std::process::id();
        // pid_max is at most 2^22, so this pid never runs.
        for name in [
            format!("x{me}-1"),
            "x4194305-1".into(),
            "y4194305-1".into(),
            "xnopid".into(),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let stale = stale_entries(dir.path(), "x");
        assert_eq!(stale, vec![dir.path().join("x4194305-1")]);
    }
}
