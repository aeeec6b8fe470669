//! Verb dispatch: the `main` of every plugin binary.
//!
//! Mirrors the reference `skel` package: validate the environment and the
//! configuration, refuse versions and verbs the configuration's `cniVersion`
//! does not allow (code 1), call the plugin, print the result converted to
//! the configuration's version, or print the error JSON and exit 1. Stdout is
//! reserved for that JSON; logs go to stderr.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use serde_json::{json, Value};

use super::config::NetConf;
use super::env::{CmdArgs, Command};
use super::error::{CniError, ErrorCode};
use super::result::CniResult;
use super::version::{CniVersion, SUPPORTED_VERSIONS};

/// What a plugin implements. STATUS and GC default to success for plugins
/// that keep no state worth checking or collecting.
pub trait Plugin {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError>;
    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError>;
    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError>;
    fn status(&self, _args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        Ok(())
    }
    fn gc(&self, _args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        Ok(())
    }
    /// One line printed on stderr when the binary runs without CNI_COMMAND
    /// (e.g. "CNI ebpf-bridge plugin v0.1.0").
    fn about(&self) -> &'static str;
}

/// The whole plugin process: `fn main() -> ExitCode { skel::run(&MyPlugin) }`.
pub fn run(plugin: &impl Plugin) -> ExitCode {
    init_logging();
    let lookup = |k: &str| std::env::var(k).ok();
    // Read stdin here rather than in CmdArgs::from_env so an environment
    // error can still be reported in the configuration's cniVersion.
    let command = lookup("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    let skip_stdin = command.is_empty() || (command == "VERSION" && stdin_is_terminal());
    if !skip_stdin {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = CniError::new(ErrorCode::Io, format!("error reading from stdin: {e}"));
            let _ = print_json(
                &mut std::io::stdout(),
                &err.to_json(CniVersion::LATEST.as_str()),
            );
            return ExitCode::FAILURE;
        }
    }
    let code = run_with(
        plugin,
        lookup,
        stdin,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(code)
}

/// [`run`] with its inputs and outputs passed in, for tests and runtime
/// emulation. Returns the process exit code (0 or 1).
pub fn run_with(
    plugin: &impl Plugin,
    lookup: impl Fn(&str) -> Option<String>,
    stdin: Vec<u8>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    // Without any CNI_* variable and without input a human is probably
    // looking: say what this is, exit 0 (the reference skel's "about").
    // A runtime that set the other variables but forgot CNI_COMMAND gets
    // the spec's error (code 4) from the environment check below instead.
    let cni_env = [
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ]
    .iter()
    .any(|k| lookup(k).is_some());
    if lookup("CNI_COMMAND").is_none_or(|c| c.is_empty()) && !cni_env && stdin.is_empty() {
        let _ = writeln!(stderr, "{}", plugin.about());
        let _ = writeln!(
            stderr,
            "CNI protocol versions supported: {}",
            SUPPORTED_VERSIONS.join(", ")
        );
        return 0;
    }
    let err_version = error_version(&stdin);
    let outcome = CmdArgs::from_lookup(lookup, stdin).and_then(|args| execute(plugin, &args));
    match outcome {
        Ok(None) => 0,
        Ok(Some(v)) => match print_json(stdout, &v) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("failed to write result to stdout: {e}");
                1
            }
        },
        Err(e) => {
            log::debug!("plugin failed: {e}");
            if let Err(w) = print_json(stdout, &e.to_json(&err_version)) {
                log::error!("failed to write error to stdout: {w} (error was: {e})");
            }
            1
        }
    }
}

/// Validates and dispatches one invocation. `Ok(Some(json))` is what goes to
/// stdout (ADD result, VERSION info); `Ok(None)` means print nothing.
pub fn execute(plugin: &impl Plugin, args: &CmdArgs) -> Result<Option<Value>, CniError> {
    if args.command == Command::Version {
        return Ok(Some(version_info(&args.stdin)));
    }
    let conf = match args.command {
        Command::Del | Command::Gc => NetConf::parse_for_teardown(&args.stdin)?,
        _ => NetConf::parse(&args.stdin)?,
    };
    let version = conf.version()?;
    match args.command {
        Command::Check if !version.supports_check() => {
            return Err(verb_not_allowed(args.command, version, "0.4.0"))
        }
        Command::Status | Command::Gc if !version.supports_status_and_gc() => {
            return Err(verb_not_allowed(args.command, version, "1.1.0"))
        }
        _ => {}
    }
    if args.command.is_per_attachment() {
        if let Some(netns) = &args.netns {
            refuse_own_netns(netns)?;
        }
    }
    match args.command {
        Command::Add => {
            let result = plugin.add(args, &conf)?;
            result.to_json_version(version).map(Some)
        }
        Command::Del => plugin.del(args, &conf).map(|()| None),
        Command::Check => plugin.check(args, &conf).map(|()| None),
        Command::Status => plugin.status(args, &conf).map(|()| None),
        Command::Gc => plugin.gc(args, &conf).map(|()| None),
        Command::Version => Ok(Some(version_info(&args.stdin))),
    }
}

/// The VERSION answer. It needs no valid configuration: stdin may be empty,
/// garbage or just `{"cniVersion": ...}`; a supported version there is
/// echoed, otherwise the latest is reported.
pub fn version_info(stdin: &[u8]) -> Value {
    json!({
        "cniVersion": error_version(stdin),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// The `cniVersion` to put in an error/VERSION JSON: the configuration's if
/// it is readable and supported, else the latest.
fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .and_then(|s| s.parse::<CniVersion>().ok())
        .unwrap_or(CniVersion::LATEST)
        .as_str()
        .to_string()
}

fn verb_not_allowed(cmd: Command, version: CniVersion, min: &str) -> CniError {
    CniError::new(
        ErrorCode::IncompatibleVersion,
        format!(
            "config version does not allow {cmd}: cniVersion {version:?} is older than {min}",
            version = version.as_str()
        ),
    )
}

/// A plugin must never configure its own namespace by mistake (the
/// reference skel returns code 8 for this). An unreadable CNI_NETNS is left
/// to the plugin, which reports it in context (DEL tolerates a gone netns).
fn refuse_own_netns(netns: &Path) -> Result<(), CniError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(target), Ok(own)) = (
        std::fs::metadata(netns),
        std::fs::metadata("/proc/self/ns/net"),
    ) else {
        return Ok(());
    };
    if target.dev() == own.dev() && target.ino() == own.ino() {
        return Err(CniError::new(
            ErrorCode::InvalidNetNs,
            format!(
                "plugin's netns and netns from CNI_NETNS ({}) should not be the same",
                netns.display()
            ),
        ));
    }
    Ok(())
}

fn print_json(out: &mut dyn Write, v: &Value) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    out.write_all(b"\n")?;
    out.flush()
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// Logs to stderr only (stdout carries the protocol); `RUST_LOG` overrides
/// the default level "warn".
fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::result::IpConfig;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<Command>>,
        fail: Option<CniError>,
    }

    impl Fake {
        fn outcome(&self, c: Command) -> Result<(), CniError> {
            self.calls.borrow_mut().push(c);
            match &self.fail {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        }
    }

    impl Plugin for Fake {
        fn add(&self, _a: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
            self.outcome(Command::Add)?;
            let mut r = CniResult::new(conf.version()?);
            r.ips.push(IpConfig {
                address: "10.0.0.2/24".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                interface: None,
            });
            Ok(r)
        }
        fn del(&self, _a: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(Command::Del)
        }
        fn check(&self, _a: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(Command::Check)
        }
        fn status(&self, _a: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(Command::Status)
        }
        fn gc(&self, _a: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
            self.outcome(Command::Gc)
        }
        fn about(&self) -> &'static str {
            "fake plugin"
        }
    }

    struct Run {
        code: u8,
        stdout: String,
        stderr: String,
    }

    impl Run {
        fn json(&self) -> Value {
            serde_json::from_str(&self.stdout).unwrap()
        }
    }

    fn run_env(p: &Fake, env: &[(&str, &str)], stdin: &str) -> Run {
        let m: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(
            p,
            |k| m.get(k).cloned(),
            stdin.as_bytes().to_vec(),
            &mut out,
            &mut err,
        );
        Run {
            code,
            stdout: String::from_utf8(out).unwrap(),
            stderr: String::from_utf8(err).unwrap(),
        }
    }

    fn std_env(cmd: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    }

    fn conf(version: &str) -> String {
        json!({"cniVersion": version, "name": "net", "type": "fake"}).to_string()
    }

    #[test]
    fn add_prints_result_in_config_version() {
        for v in SUPPORTED_VERSIONS {
            let p = Fake::default();
            let r = run_env(&p, &std_env("ADD"), &conf(v));
            assert_eq!(r.code, 0, "{}", r.stdout);
            let out = r.json();
            assert_eq!(out["cniVersion"], v);
            if v < "0.3.0" {
                assert_eq!(out["ip4"]["ip"], "10.0.0.2/24");
            } else {
                assert_eq!(out["ips"][0]["address"], "10.0.0.2/24");
            }
            assert_eq!(*p.calls.borrow(), vec![Command::Add]);
        }
    }

    #[test]
    fn del_check_status_gc_print_nothing() {
        for (cmd, c) in [
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
        ] {
            let p = Fake::default();
            let r = run_env(&p, &std_env(cmd), &conf("1.1.0"));
            assert_eq!(r.code, 0, "{cmd}: {}", r.stdout);
            assert_eq!(r.stdout, "");
            assert_eq!(*p.calls.borrow(), vec![c]);
        }
    }

    #[test]
    fn status_and_gc_need_only_command_and_path() {
        for cmd in ["STATUS", "GC"] {
            let p = Fake::default();
            let r = run_env(
                &p,
                &[("CNI_COMMAND", cmd), ("CNI_PATH", "/x")],
                &conf("1.1.0"),
            );
            assert_eq!(r.code, 0, "{}", r.stdout);
        }
    }

    #[test]
    fn verb_gates_by_version() {
        for (cmd, old, ok) in [
            ("CHECK", "0.3.1", "0.4.0"),
            ("STATUS", "1.0.0", "1.1.0"),
            ("GC", "1.0.0", "1.1.0"),
        ] {
            let p = Fake::default();
            let r = run_env(&p, &std_env(cmd), &conf(old));
            assert_eq!(r.code, 1);
            let e = r.json();
            assert_eq!(e["code"], 1);
            assert_eq!(e["cniVersion"], old);
            assert!(e["msg"].as_str().unwrap().contains(cmd));
            assert!(p.calls.borrow().is_empty());
            assert_eq!(run_env(&p, &std_env(cmd), &conf(ok)).code, 0);
        }
    }

    #[test]
    fn unsupported_version_is_code_1() {
        let p = Fake::default();
        let r = run_env(&p, &std_env("ADD"), &conf("0.5.0"));
        assert_eq!(r.code, 1);
        let e = r.json();
        assert_eq!(e["code"], 1);
        assert!(e["msg"].as_str().unwrap().contains("cniVersion"));
        // The error is reported in the latest version since 0.5.0 is unknown.
        assert_eq!(e["cniVersion"], "1.1.0");
        assert!(e["details"].as_str().unwrap().contains("1.1.0"));
    }

    #[test]
    fn config_errors() {
        let p = Fake::default();
        let r = run_env(&p, &std_env("ADD"), "{not json");
        assert_eq!(r.json()["code"], 6);
        let r = run_env(
            &p,
            &std_env("ADD"),
            r#"{"cniVersion":"0.4.0","type":"fake"}"#,
        );
        let e = r.json();
        assert_eq!(e["code"], 7);
        assert_eq!(e["cniVersion"], "0.4.0");
        assert!(e["msg"].as_str().unwrap().contains("name"));
        assert!(e.get("details").is_none());
        let r = run_env(&p, &std_env("DEL"), r#"{"cniVersion":"1.0.0","name":"n"}"#);
        assert!(r.json()["msg"].as_str().unwrap().contains("type"));
        assert!(p.calls.borrow().is_empty());
    }

    #[test]
    fn env_errors() {
        let p = Fake::default();
        let mut env = std_env("ADD");
        env.retain(|(k, _)| *k != "CNI_NETNS");
        let r = run_env(&p, &env, &conf("1.0.0"));
        assert_eq!(r.code, 1);
        let e = r.json();
        assert_eq!(e["code"], 4);
        assert_eq!(e["cniVersion"], "1.0.0");
        assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"));

        let r = run_env(&p, &[("CNI_COMMAND", "BOGUS")], &conf("1.0.0"));
        assert_eq!(r.json()["code"], 4);
        assert!(r.json()["msg"].as_str().unwrap().contains("CNI_COMMAND"));

        let mut env = std_env("ADD");
        env.push(("CNI_IFNAME", "bad/name"));
        env.retain(|(k, v)| *k != "CNI_IFNAME" || *v == "bad/name");
        assert!(run_env(&p, &env, &conf("1.0.0")).json()["msg"]
            .as_str()
            .unwrap()
            .contains("CNI_IFNAME"));
        assert!(p.calls.borrow().is_empty());
    }

    #[test]
    fn plugin_error_passes_through() {
        let p = Fake {
            fail: Some(CniError::with_code(107, "custom failure").with_details("why")),
            ..Default::default()
        };
        let r = run_env(&p, &std_env("ADD"), &conf("0.3.1"));
        assert_eq!(r.code, 1);
        assert_eq!(
            r.json(),
            json!({"cniVersion": "0.3.1", "code": 107, "msg": "custom failure", "details": "why"})
        );
    }

    #[test]
    fn version_needs_no_config() {
        let p = Fake::default();
        for (stdin, want) in [
            ("", "1.1.0"),
            ("garbage", "1.1.0"),
            (r#"{"cniVersion":"0.3.1"}"#, "0.3.1"),
            (r#"{"cniVersion":"7.0.0"}"#, "1.1.0"),
        ] {
            let r = run_env(&p, &[("CNI_COMMAND", "VERSION")], stdin);
            assert_eq!(r.code, 0);
            assert_eq!(
                r.json(),
                json!({"cniVersion": want, "supportedVersions": SUPPORTED_VERSIONS})
            );
        }
        assert!(p.calls.borrow().is_empty());
    }

    #[test]
    fn no_command_prints_about() {
        let p = Fake::default();
        let r = run_env(&p, &[], "");
        assert_eq!(r.code, 0);
        assert_eq!(r.stdout, "");
        assert!(r.stderr.contains("fake plugin"));
        assert!(r.stderr.contains("0.1.0, 0.2.0"));
    }

    #[test]
    fn missing_command_with_other_cni_vars_is_code_4() {
        let p = Fake::default();
        let mut env = std_env("ADD");
        env.retain(|(k, _)| *k != "CNI_COMMAND");
        let r = run_env(&p, &env, &conf("1.0.0"));
        assert_eq!(r.json()["code"], 4);
        assert!(r.json()["msg"].as_str().unwrap().contains("CNI_COMMAND"));
    }

    #[test]
    fn own_netns_is_refused() {
        let p = Fake::default();
        let mut env = std_env("ADD");
        env.retain(|(k, _)| *k != "CNI_NETNS");
        env.push(("CNI_NETNS", "/proc/self/ns/net"));
        let r = run_env(&p, &env, &conf("1.0.0"));
        assert_eq!(r.json()["code"], 8);
        assert!(p.calls.borrow().is_empty());
    }

    #[test]
    fn result_conversion_failure_is_reported() {
        struct NoIp;
        impl Plugin for NoIp {
            fn add(&self, _a: &CmdArgs, _c: &NetConf) -> Result<CniResult, CniError> {
                Ok(CniResult::default())
            }
            fn del(&self, _a: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
                Ok(())
            }
            fn check(&self, _a: &CmdArgs, _c: &NetConf) -> Result<(), CniError> {
                Ok(())
            }
            fn about(&self) -> &'static str {
                "noip"
            }
        }
        let m: HashMap<String, String> = std_env("ADD")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(
            &NoIp,
            |k| m.get(k).cloned(),
            conf("0.2.0").into_bytes(),
            &mut out,
            &mut err,
        );
        assert_eq!(code, 1);
        let e: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(e["code"], 999);
        // Default STATUS/GC implementations succeed.
        let args = CmdArgs::from_lookup(
            |k| match k {
                "CNI_COMMAND" => Some("GC".into()),
                "CNI_PATH" => Some("/x".into()),
                _ => None,
            },
            conf("1.1.0").into_bytes(),
        )
        .unwrap();
        assert_eq!(execute(&NoIp, &args).unwrap(), None);
    }
}
