//! Running another plugin (typically IPAM) found in CNI_PATH, as libcni's
//! `invoke` package does.
//!
//! The child gets this process's environment with CNI_COMMAND replaced and
//! the other CNI_* variables set from the [`CmdArgs`] (so a caller that built
//! its arguments with [`CmdArgs::from_lookup`] delegates consistently). Its
//! stderr is passed through; its stdout carries the result or the error JSON,
//! whose code/msg/details are propagated unchanged.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::env::{CmdArgs, Command};
use super::error::{CniError, ErrorCode};
use super::result::CniResult;

/// How often a spawn failing with ETXTBSY is retried: a binary that is being
/// installed concurrently (e.g. by a DaemonSet) is briefly unexecutable.
const TEXT_BUSY_RETRIES: u32 = 5;

/// The least a new pipe holds: one page, what Linux gives once the user is
/// over `fs.pipe-user-pages-soft` (the default is 64 KiB).
const PIPE_MIN_CAPACITY: usize = 4096;

/// Runs `plugin_type` with CNI_COMMAND=ADD and parses its result (read at
/// the delegated configuration's version if it carries none).
pub fn delegate_add(
    plugin_type: &str,
    stdin: &[u8],
    args: &CmdArgs,
) -> Result<CniResult, CniError> {
    let out = exec(plugin_type, stdin, args, Command::Add)?;
    let default_version = serde_json::from_slice::<Value>(stdin).ok().and_then(|v| {
        v.get("cniVersion")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    CniResult::from_slice(&out, default_version.as_deref())
        .map_err(|e| e.context(format!("invalid result from plugin {plugin_type:?}")))
}

/// Runs `plugin_type` with CNI_COMMAND=DEL.
pub fn delegate_del(plugin_type: &str, stdin: &[u8], args: &CmdArgs) -> Result<(), CniError> {
    exec(plugin_type, stdin, args, Command::Del).map(drop)
}

/// Runs `plugin_type` with CNI_COMMAND=CHECK.
pub fn delegate_check(plugin_type: &str, stdin: &[u8], args: &CmdArgs) -> Result<(), CniError> {
    exec(plugin_type, stdin, args, Command::Check).map(drop)
}

/// Runs `plugin_type` with CNI_COMMAND=STATUS.
pub fn delegate_status(plugin_type: &str, stdin: &[u8], args: &CmdArgs) -> Result<(), CniError> {
    exec(plugin_type, stdin, args, Command::Status).map(drop)
}

/// Runs `plugin_type` with CNI_COMMAND=GC.
pub fn delegate_gc(plugin_type: &str, stdin: &[u8], args: &CmdArgs) -> Result<(), CniError> {
    exec(plugin_type, stdin, args, Command::Gc).map(drop)
}

/// Finds an executable regular file named `plugin` in `paths`, in order.
/// A name with a path separator is refused: the type comes from the
/// configuration and must not escape CNI_PATH.
pub fn find_in_path(plugin: &str, paths: &[PathBuf]) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') || plugin == "." || plugin == ".." {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("invalid plugin name {plugin:?}"),
        ));
    }
    if paths.is_empty() {
        return Err(CniError::internal(format!(
            "failed to find plugin {plugin:?}: CNI_PATH is empty"
        )));
    }
    paths
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|p| is_executable_file(p))
        .ok_or_else(|| {
            let dirs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            CniError::internal(format!(
                "failed to find plugin {plugin:?} in path [{}]",
                dirs.join(" ")
            ))
        })
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs the plugin and returns its stdout on success.
fn exec(
    plugin_type: &str,
    stdin: &[u8],
    args: &CmdArgs,
    command: Command,
) -> Result<Vec<u8>, CniError> {
    let bin = find_in_path(plugin_type, &args.path)?;
    let mut cmd = Process::new(&bin);
    cmd.env("CNI_COMMAND", command.as_str())
        .env("CNI_PATH", args.path_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if command.is_per_attachment() {
        cmd.env("CNI_CONTAINERID", &args.container_id)
            .env("CNI_IFNAME", &args.ifname);
        match &args.netns {
            Some(ns) => cmd.env("CNI_NETNS", ns),
            None => cmd.env_remove("CNI_NETNS"),
        };
        if args.args.is_empty() {
            cmd.env_remove("CNI_ARGS");
        } else {
            cmd.env("CNI_ARGS", args.args_string());
        }
    }

    let mut attempt = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TEXT_BUSY_RETRIES => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
            }
            Err(e) => {
                return Err(CniError::internal(format!(
                    "failed to execute plugin {plugin_type:?} ({}): {e}",
                    bin.display()
                )))
            }
        }
    };

    // A configuration that fits in the pipe's buffer is written at once
    // (and the pipe closed): the write cannot block, whatever the child
    // does. A larger one is written from a thread, so a child that writes a
    // lot before reading cannot deadlock us. A child that exits without
    // reading is fine either way (EPIPE).
    let writer = child.stdin.take().and_then(|mut pipe| {
        if stdin.len() <= PIPE_MIN_CAPACITY {
            let _ = pipe.write_all(stdin);
            return None;
        }
        let data = stdin.to_vec();
        Some(std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        }))
    });
    let output = child.wait_with_output().map_err(|e| {
        CniError::internal(format!("failed to wait for plugin {plugin_type:?}: {e}"))
    })?;
    if let Some(w) = writer {
        let _ = w.join();
    }

    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(child_error(plugin_type, &output.stdout, output.status))
}

/// The child's own error JSON if it printed one, else a generic code 999
/// naming the plugin and its exit status.
fn child_error(plugin_type: &str, stdout: &[u8], status: std::process::ExitStatus) -> CniError {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
        if let (Some(code), Some(msg)) = (
            v.get("code").and_then(Value::as_u64),
            v.get("msg").and_then(Value::as_str),
        ) {
            let details = v.get("details").and_then(Value::as_str).unwrap_or_default();
            return CniError::with_code(u32::try_from(code).unwrap_or(999), msg)
                .with_details(details);
        }
    }
    let text = String::from_utf8_lossy(stdout).trim().to_string();
    CniError::internal(format!("plugin {plugin_type:?} failed ({status})")).with_details(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A scratch directory under the system temp dir, removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir()
                .join(format!("cni-spec-delegate-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn script(&self, name: &str, body: &str) {
            let p = self.0.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn args(cmd: &str, path: &Path) -> CmdArgs {
        let path = path.display().to_string();
        CmdArgs::from_lookup(
            move |k| match k {
                "CNI_COMMAND" => Some(cmd.to_string()),
                "CNI_CONTAINERID" => Some("ctr1".into()),
                "CNI_NETNS" => Some("/var/run/netns/t".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_ARGS" => Some("A=1;B=2".into()),
                "CNI_PATH" => Some(format!("/nonexistent:{path}")),
                _ => None,
            },
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn add_passes_env_and_stdin_and_parses_result() {
        let d = Dir::new("add");
        let out = d.0.join("seen");
        d.script(
            "ipam",
            &format!(
                r#"cat > {o}.stdin
echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME $CNI_ARGS $CNI_PATH" > {o}
echo '{{"cniVersion":"0.4.0","ips":[{{"version":"4","address":"10.0.0.7/24","gateway":"10.0.0.1"}}]}}'"#,
                o = out.display()
            ),
        );
        // The caller's own verb is irrelevant: the child gets ADD.
        let a = args("CHECK", &d.0);
        let r = delegate_add("ipam", br#"{"cniVersion":"0.4.0"}"#, &a).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.0.0.7/24");
        assert_eq!(r.cni_version, "0.4.0");
        let seen = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            seen.trim(),
            format!(
                "ADD ctr1 /var/run/netns/t eth0 A=1;B=2 /nonexistent:{}",
                d.0.display()
            )
        );
        assert_eq!(
            std::fs::read_to_string(format!("{}.stdin", out.display())).unwrap(),
            r#"{"cniVersion":"0.4.0"}"#
        );
    }

    #[test]
    fn large_stdin_to_a_child_that_writes_first() {
        // The child fills its stdout pipe before reading stdin: a parent that
        // wrote a large stdin before reading stdout would deadlock.
        let d = Dir::new("large");
        d.script(
            "p",
            r#"head -c 200000 /dev/zero | tr '\0' ' '
n=$(wc -c)
echo "{\"cniVersion\":\"1.0.0\",\"dns\":{\"domain\":\"n$n\"}}""#,
        );
        for size in [10, PIPE_MIN_CAPACITY, PIPE_MIN_CAPACITY + 1, 300_000] {
            let mut stdin = vec![b' '; size];
            stdin[0] = b'{';
            stdin[size - 1] = b'}';
            let r = delegate_add("p", &stdin, &args("ADD", &d.0)).unwrap();
            assert_eq!(
                r.dns.domain,
                Some(format!("n{size}")),
                "stdin of {size} bytes"
            );
        }
    }

    #[test]
    fn verbs_set_cni_command() {
        let d = Dir::new("verbs");
        let out = d.0.join("cmd");
        d.script("p", &format!("echo \"$CNI_COMMAND\" >> {}", out.display()));
        let a = args("ADD", &d.0);
        delegate_del("p", b"{}", &a).unwrap();
        delegate_check("p", b"{}", &a).unwrap();
        delegate_status("p", b"{}", &a).unwrap();
        delegate_gc("p", b"{}", &a).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "DEL\nCHECK\nSTATUS\nGC\n"
        );
    }

    #[test]
    fn child_error_is_propagated() {
        let d = Dir::new("err");
        d.script(
            "p",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"retry"}'; exit 1"#,
        );
        let e = delegate_add("p", b"{}", &args("ADD", &d.0)).unwrap_err();
        assert_eq!(e, CniError::with_code(11, "busy").with_details("retry"));

        d.script("q", "echo 'not json'; exit 3");
        let e = delegate_del("q", b"{}", &args("DEL", &d.0)).unwrap_err();
        assert_eq!(e.code, 999);
        assert!(e.msg.contains("\"q\""));
        assert_eq!(e.details, "not json");

        d.script("r", "echo '[]'");
        let e = delegate_add("r", b"{}", &args("ADD", &d.0)).unwrap_err();
        assert!(e.msg.contains("\"r\""), "{}", e.msg);
        d.script("s", "true");
        assert_eq!(
            delegate_add("s", b"{}", &args("ADD", &d.0))
                .unwrap_err()
                .code,
            6
        );
    }

    #[test]
    fn missing_plugin_names_plugin_and_path() {
        let d = Dir::new("missing");
        std::fs::write(d.0.join("noexec"), "x").unwrap();
        for name in ["nothere", "noexec"] {
            let e = delegate_add(name, b"{}", &args("ADD", &d.0)).unwrap_err();
            assert_eq!(e.code, 999);
            assert!(e.msg.contains(name), "{}", e.msg);
            assert!(e.msg.contains(&d.0.display().to_string()), "{}", e.msg);
            assert!(e.msg.contains("/nonexistent"), "{}", e.msg);
        }
        for bad in ["", "../x", "/bin/sh", ".."] {
            assert_eq!(
                find_in_path(bad, std::slice::from_ref(&d.0))
                    .unwrap_err()
                    .code,
                7
            );
        }
        assert_eq!(find_in_path("x", &[]).unwrap_err().code, 999);
    }

    #[test]
    fn del_without_netns_unsets_it() {
        let d = Dir::new("nonetns");
        let out = d.0.join("ns");
        d.script(
            "p",
            &format!("echo \"${{CNI_NETNS-unset}}\" > {}", out.display()),
        );
        let path = d.0.display().to_string();
        let a = CmdArgs::from_lookup(
            move |k| match k {
                "CNI_COMMAND" => Some("DEL".into()),
                "CNI_CONTAINERID" => Some("c".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_PATH" => Some(path.clone()),
                _ => None,
            },
            vec![],
        )
        .unwrap();
        delegate_del("p", b"{}", &a).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "unset");
    }
}
