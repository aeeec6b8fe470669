//! Running commands, and the Ctrl-C/SIGTERM flag that lets every task stop
//! between two commands and unwind through its cleanup guards.
use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP only set a flag: the task notices it after the
/// running command ends (a terminal's Ctrl-C reaches that child too) and
/// returns an error, so the namespaces and temp dirs are removed by their
/// guards instead of being left behind by a killed process.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once a stop signal has arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    Command::new(program)
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A visible step heading.
pub fn heading(text: &str) {
    println!("\n==> {text}");
}

/// Runs with inherited stdio; error unless it exits 0.
pub fn run_checked(c: &mut Command) -> Result<()> {
    check_interrupted()?;
    let what = describe(c);
    let status = c
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting `{what}`"))?;
    check_interrupted()?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs and captures output, whatever the exit status.
pub fn output(c: &mut Command) -> Result<Output> {
    check_interrupted()?;
    let what = describe(c);
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{what}`"))?;
    check_interrupted()?;
    Ok(out)
}

/// Runs, captures stdout; error (with stderr) unless it exits 0.
pub fn stdout_of(c: &mut Command) -> Result<String> {
    let what = describe(c);
    let out = output(c)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints the command, then its output indented; error unless it exits 0.
pub fn show(c: &mut Command) -> Result<String> {
    println!("$ {}", describe(c));
    let s = stdout_of(c)?;
    for line in s.lines() {
        println!("    {line}");
    }
    Ok(s)
}
