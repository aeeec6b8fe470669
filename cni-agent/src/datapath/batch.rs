//! Whole-table reads of hash maps in batches (`BPF_MAP_LOOKUP_BATCH`).
//!
//! aya reads a table one key at a time: `BPF_MAP_GET_NEXT_KEY` then
//! `BPF_MAP_LOOKUP_ELEM`, two syscalls per entry. The NAT and firewall
//! connection tables of a busy node hold 10^5 entries, and the agent reads
//! them whole on every sweep, every `cni-agent status`, and on the DEL of
//! a pod with hostPorts (under the node lock, while every other ADD and
//! DEL waits). One batch call copies thousands of entries, bucket by
//! bucket, each bucket under its lock.
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{HashMap, IterableMap, MapData};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call: large enough that a table of 10^5 entries
/// takes a few dozen calls, small enough to stay a few hundred KiB.
const BATCH: u32 = 4096;
/// A bucket never holds this many (the kernel sizes buckets to the table).
const MAX_BATCH: u32 = 1 << 20;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` with the raw key and value bytes of every entry of a hash
/// map (LRU or not; per-CPU values are `value_len` bytes for all CPUs).
/// Entries added or removed while it reads may or may not be seen, as with
/// a key-by-key walk; none is seen twice.
pub fn for_each_raw(
    map: &MapData,
    key_len: usize,
    value_len: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    let fd = map.fd().as_fd();
    let mut want = BATCH;
    // The kernel's resume token for a hash map is a bucket index (u32);
    // give it room for any key-sized token too.
    let token_len = key_len.max(size_of::<u64>());
    let mut token_in = vec![0u8; token_len];
    let mut token_out = vec![0u8; token_len];
    let mut first = true;
    let mut keys = Vec::new();
    let mut values = Vec::new();
    loop {
        keys.resize(want as usize * key_len, 0);
        values.resize(want as usize * value_len, 0);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for this command; the
        // key and value buffers hold `want` elements of the sizes the
        // caller gives (the map's), the tokens hold at least the kernel's
        // token size, and all outlive the call.
        let r = unsafe { super::sys::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match r.map_err(|e| e.raw_os_error().unwrap_or(0)).err() {
            None => false,
            Some(libc::ENOENT) => true,
            // One bucket holds more entries than asked for: ask for more.
            Some(libc::ENOSPC) if attr.count == 0 && want < MAX_BATCH => {
                want = want.saturating_mul(2);
                continue;
            }
            Some(code) => return Err(io::Error::from_raw_os_error(code)),
        };
        let n = (attr.count as usize).min(want as usize);
        for i in 0..n {
            each(
                &keys[i * key_len..(i + 1) * key_len],
                &values[i * value_len..(i + 1) * value_len],
            );
        }
        if done {
            return Ok(());
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// Every (key, value) of a hash or LRU hash map (not per-CPU) whose key
/// and value types are `K` and `V` (as aya checked when it opened the map
/// as a typed one).
pub fn entries<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for_each_raw(map, size_of::<K>(), size_of::<V>(), |k, v| {
        // SAFETY: `k` and `v` hold exactly size_of::<K>() and
        // size_of::<V>() bytes, and Pod types are valid for any bytes.
        out.push(unsafe {
            (
                std::ptr::read_unaligned(k.as_ptr().cast::<K>()),
                std::ptr::read_unaligned(v.as_ptr().cast::<V>()),
            )
        });
    })?;
    Ok(out)
}

/// Every entry of a typed hash map: in batches, or key by key where the
/// kernel refuses batch reads for the map.
pub fn hash_entries<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    entries(m.map()).unwrap_or_else(|e| {
        log::debug!("no batch read ({e}); reading key by key");
        m.iter().filter_map(Result::ok).collect()
    })
}
