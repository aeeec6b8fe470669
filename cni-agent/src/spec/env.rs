//! The `CNI_*` environment of a plugin invocation.
//!
//! Which variables are required depends on the verb (SPEC.md, "Parameters");
//! a missing or malformed one is error code 4 naming the variable, so the
//! runtime's log says exactly what it forgot.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use super::error::{CniError, ErrorCode};
use super::is_valid_identifier;

/// Linux `IFNAMSIZ` minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// The CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    /// The `CNI_COMMAND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// Verbs that act on one attachment and therefore need
    /// `CNI_CONTAINERID` / `CNI_IFNAME`.
    pub fn is_per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND: {other:?}"
                )))
            }
        })
    }
}

/// Everything a plugin receives: the parsed `CNI_*` variables and stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdArgs {
    pub command: Command,
    /// Empty for VERSION, STATUS and GC.
    pub container_id: String,
    /// `None` when `CNI_NETNS` is unset (allowed for DEL, VERSION, STATUS, GC).
    pub netns: Option<PathBuf>,
    /// Empty for VERSION, STATUS and GC.
    pub ifname: String,
    /// `CNI_ARGS` split into `(key, value)` pairs, in order.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH` split on `:` (empty elements dropped).
    pub path: Vec<PathBuf>,
    pub stdin: Vec<u8>,
}

/// Which variables a verb requires, beyond `CNI_COMMAND`.
struct Required {
    container_id: bool,
    netns: bool,
    ifname: bool,
    path: bool,
}

fn required(cmd: Command) -> Required {
    match cmd {
        Command::Add | Command::Check => Required {
            container_id: true,
            netns: true,
            ifname: true,
            path: true,
        },
        // DEL must succeed even when the namespace is already gone, so the
        // runtime may omit CNI_NETNS.
        Command::Del => Required {
            container_id: true,
            netns: false,
            ifname: true,
            path: true,
        },
        Command::Version => Required {
            container_id: false,
            netns: false,
            ifname: false,
            path: false,
        },
        Command::Status | Command::Gc => Required {
            container_id: false,
            netns: false,
            ifname: false,
            path: true,
        },
    }
}

impl CmdArgs {
    /// Reads the process environment and stdin.
    ///
    /// For VERSION, stdin is only read when it is not a terminal: the spec
    /// passes `{"cniVersion": ...}` there, but an operator running
    /// `CNI_COMMAND=VERSION plugin` by hand must not be left waiting.
    pub fn from_env() -> Result<CmdArgs, CniError> {
        let lookup = |k: &str| std::env::var(k).ok();
        let command = lookup("CNI_COMMAND");
        let skip_stdin = command.as_deref() == Some("VERSION") && stdin_is_terminal();
        let mut stdin = Vec::new();
        if !skip_stdin {
            std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
                CniError::new(ErrorCode::Io, format!("error reading from stdin: {e}"))
            })?;
        }
        CmdArgs::from_lookup(lookup, stdin)
    }

    /// Builds the arguments from any variable source (tests, a runtime
    /// emulation). Missing required variables are all named in one error, as
    /// the reference skel does; an empty value counts as missing.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        stdin: Vec<u8>,
    ) -> Result<CmdArgs, CniError> {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());

        let command_str = get("CNI_COMMAND")
            .ok_or_else(|| CniError::invalid_env("required env variables [CNI_COMMAND] missing"))?;
        let command: Command = command_str.parse()?;
        let req = required(command);

        let container_id = get("CNI_CONTAINERID");
        let netns = get("CNI_NETNS");
        let ifname = get("CNI_IFNAME");
        let path = get("CNI_PATH");

        let mut missing = Vec::new();
        if req.container_id && container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if req.netns && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if req.ifname && ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if req.path && path.is_none() {
            missing.push("CNI_PATH");
        }
        if !missing.is_empty() {
            return Err(CniError::invalid_env(format!(
                "required env variables [{}] missing",
                missing.join(",")
            )));
        }

        let container_id = container_id.unwrap_or_default();
        let ifname = ifname.unwrap_or_default();
        if command.is_per_attachment() {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
        }

        let args = match get("CNI_ARGS") {
            Some(raw) => parse_cni_args(&raw)?,
            None => Vec::new(),
        };

        Ok(CmdArgs {
            command,
            container_id,
            netns: netns.map(PathBuf::from),
            ifname,
            args,
            path: path.as_deref().map(split_path).unwrap_or_default(),
            stdin,
        })
    }

    /// Looks a key up in `CNI_ARGS` (the last occurrence wins, like a map
    /// built in order).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `CNI_ARGS` re-serialised as `K1=V1;K2=V2`, for delegation.
    pub fn args_string(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// `CNI_PATH` re-serialised, for delegation.
    pub fn path_string(&self) -> String {
        self.path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

fn split_path(raw: &str) -> Vec<PathBuf> {
    raw.split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Validates a container ID against the spec's rule
/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`. It ends up in file names (IPAM store)
/// and map keys, so anything else is refused with code 4.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            "missing containerID (CNI_CONTAINERID)",
        ));
    }
    if !is_valid_identifier(id) {
        return Err(
            CniError::invalid_env("invalid characters in containerID (CNI_CONTAINERID)")
                .with_details(id.to_string()),
        );
    }
    Ok(())
}

/// Validates an interface name as the kernel (and the reference skel) would:
/// non-empty, at most 15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let fail = |why: &str| {
        Err(
            CniError::invalid_env(format!("invalid CNI_IFNAME: interface name {why}"))
                .with_details(name.to_string()),
        )
    };
    if name.is_empty() {
        return fail("is empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return fail("is too long (max 15 bytes)");
    }
    if name == "." || name == ".." {
        return fail("is . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return fail("contains /, :, NUL or whitespace characters");
    }
    Ok(())
}

/// Parses `CNI_ARGS` (`K1=V1;K2=V2`). Empty segments (e.g. a trailing `;`)
/// are ignored; a segment without `=` or with an empty key is code 4. A value
/// may itself contain `=` (split at the first one).
pub fn parse_cni_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    let mut out = Vec::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            _ => {
                return Err(CniError::invalid_env(format!(
                    "invalid CNI_ARGS: pair {pair:?} is not KEY=VALUE"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const FULL: [(&str, &str); 6] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    ];

    fn with(cmd: &str, drop: &[&str]) -> Vec<(&'static str, String)> {
        FULL.iter()
            .filter(|(k, _)| !drop.contains(k))
            .map(|(k, v)| {
                (
                    *k,
                    if *k == "CNI_COMMAND" {
                        cmd.to_string()
                    } else {
                        v.to_string()
                    },
                )
            })
            .collect()
    }

    fn parse(pairs: Vec<(&'static str, String)>) -> Result<CmdArgs, CniError> {
        let m: HashMap<String, String> =
            pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        CmdArgs::from_lookup(move |k| m.get(k).cloned(), b"{}".to_vec())
    }

    #[test]
    fn full_add() {
        let a = CmdArgs::from_lookup(env(&FULL), b"x".to_vec()).unwrap();
        assert_eq!(a.command, Command::Add);
        assert_eq!(a.container_id, "abc123");
        assert_eq!(a.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert_eq!(a.ifname, "eth0");
        assert_eq!(a.arg("K8S_POD_NAME"), Some("p"));
        assert_eq!(a.arg("missing"), None);
        assert_eq!(
            a.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        assert_eq!(a.path_string(), "/opt/cni/bin:/usr/lib/cni");
        assert_eq!(a.args_string(), "IgnoreUnknown=1;K8S_POD_NAME=p");
        assert_eq!(a.stdin, b"x");
    }

    #[test]
    fn required_vars_per_verb() {
        for cmd in ["ADD", "CHECK", "DEL"] {
            for var in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"] {
                let e = parse(with(cmd, &[var])).unwrap_err();
                assert_eq!(e.code, 4, "{cmd} {var}");
                assert!(e.msg.contains(var), "{}", e.msg);
            }
        }
        for cmd in ["ADD", "CHECK"] {
            let e = parse(with(cmd, &["CNI_NETNS"])).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.msg.contains("CNI_NETNS"));
        }
        let del = parse(with("DEL", &["CNI_NETNS"])).unwrap();
        assert_eq!(del.netns, None);

        let all_but_cmd = [
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ];
        let v = parse(with("VERSION", &all_but_cmd)).unwrap();
        assert_eq!(v.command, Command::Version);
        assert!(v.path.is_empty());

        for cmd in ["STATUS", "GC"] {
            let ok = parse(with(cmd, &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])).unwrap();
            assert_eq!(ok.container_id, "");
            let e = parse(with(cmd, &["CNI_PATH"])).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.msg.contains("CNI_PATH"));
        }

        // Several missing variables are all named at once.
        let e = parse(with("ADD", &["CNI_IFNAME", "CNI_PATH"])).unwrap_err();
        assert!(e.msg.contains("CNI_IFNAME,CNI_PATH"), "{}", e.msg);
        // Empty counts as missing.
        let mut p = with("ADD", &[]);
        p.retain(|(k, _)| *k != "CNI_IFNAME");
        p.push(("CNI_IFNAME", String::new()));
        assert!(parse(p).unwrap_err().msg.contains("CNI_IFNAME"));
    }

    #[test]
    fn missing_and_unknown_command() {
        let e = parse(with("ADD", &["CNI_COMMAND"])).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = parse(with("FOO", &[])).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND") && e.msg.contains("FOO"));
        for c in ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"] {
            assert_eq!(c.parse::<Command>().unwrap().as_str(), c);
        }
        assert!("add".parse::<Command>().is_err());
    }

    #[test]
    fn container_id_rule() {
        for ok in ["a", "0", "abc-DEF_1.2", "a..", "A-"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["-a", "_a", ".a", "a b", "a/b", "a:b", "ä", "a\n"] {
            let e = validate_container_id(bad).unwrap_err();
            assert_eq!(e.code, 4, "{bad}");
            assert!(e.msg.contains("CNI_CONTAINERID"));
        }
        assert_eq!(validate_container_id("").unwrap_err().code, 3);
        let mut p = with("ADD", &["CNI_CONTAINERID"]);
        p.push(("CNI_CONTAINERID", "bad id".into()));
        assert_eq!(parse(p).unwrap_err().code, 4);
    }

    #[test]
    fn ifname_rule() {
        for ok in ["eth0", "a", "123456789012345", "net-1.2_x", "..."] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            "1234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            let e = validate_ifname(bad).unwrap_err();
            assert_eq!(e.code, 4, "{bad:?}");
            assert!(e.msg.contains("CNI_IFNAME"));
        }
        let mut p = with("CHECK", &["CNI_IFNAME"]);
        p.push(("CNI_IFNAME", "way-too-long-ifname".into()));
        let e = parse(p).unwrap_err();
        assert!(e.msg.contains("CNI_IFNAME"));
    }

    #[test]
    fn cni_args_parsing() {
        assert_eq!(parse_cni_args("").unwrap(), vec![]);
        assert_eq!(
            parse_cni_args("A=1;B=;C=x=y;").unwrap(),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "".into()),
                ("C".into(), "x=y".into())
            ]
        );
        for bad in ["A", "A=1;B", "=1", "A=1;=2"] {
            let e = parse_cni_args(bad).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.msg.contains("CNI_ARGS"), "{}", e.msg);
        }
        let mut p = with("ADD", &["CNI_ARGS"]);
        p.push(("CNI_ARGS", "novalue".into()));
        assert!(parse(p).unwrap_err().msg.contains("CNI_ARGS"));
        let a = CmdArgs::from_lookup(
            env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "K=1;K=2")]),
            vec![],
        )
        .unwrap();
        assert_eq!(a.arg("K"), Some("2"));
    }
}
