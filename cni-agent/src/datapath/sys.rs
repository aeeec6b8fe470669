//! bpf(2) for the commands aya does not wrap: replacing a link's program,
//! opening a pinned object by path, key walks on raw bytes and batch
//! reads. One place for the raw syscall and its error.
use std::io;

/// Runs bpf(2) command `cmd` with `attr`, a prefix of `union bpf_attr`;
/// returns what the kernel returns (an fd for the commands that open one).
///
/// # Safety
/// `attr` must be a valid prefix of `union bpf_attr` for `cmd`, and every
/// pointer and fd in it valid for what the kernel reads or writes through
/// it during the call.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract; the size passed is `attr`'s own.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
