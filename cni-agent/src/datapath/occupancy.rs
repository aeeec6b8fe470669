//! How full each pinned map is: its capacity (max_entries, from the
//! kernel's map info) and, for hash-like maps, how many entries it holds.
//! An operator watches these to size `--conntrack-size` before an LRU map
//! starts evicting live flows.
//!
//! Entries are counted on raw key and value bytes, so one routine serves
//! every map whatever its types: in batches (`BPF_MAP_LOOKUP_BATCH`) for
//! hash maps, whose connection tables hold 10^5 entries on a busy node,
//! and key by key (`BPF_MAP_GET_NEXT_KEY`) for LPM tries.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::maps::{MapData, MapInfo, MapType};

use super::pins::{map_specs, PinLayout};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// One map's occupancy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub name: &'static str,
    pub capacity: u32,
    /// `None` for arrays, whose every slot always exists.
    pub entries: Option<u64>,
}

/// Counts the keys of a map: the first key from no key, then each next
/// one until ENOENT. Bounded by twice the capacity, in case deletions
/// while walking restart a hash map's iteration.
fn count_keys(fd: BorrowedFd<'_>, key_size: u32, capacity: u32) -> io::Result<u64> {
    #[repr(C)]
    struct GetNextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut cur = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n: u64 = 0;
    let limit = u64::from(capacity) * 2 + 1;
    while n < limit {
        let mut attr = GetNextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if n == 0 { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid bpf_attr for this command; `cur` and
        // `next` hold key_size bytes each and outlive the call; the fd is
        // borrowed for the call.
        match unsafe { super::sys::bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        n += 1;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(n)
}

/// Counts the entries of a hash map in batches (LPM tries have no batch
/// reads: the caller walks those key by key).
fn count_batched(map: &MapData, info: &MapInfo) -> io::Result<u64> {
    let per_cpu = matches!(
        info.map_type(),
        Ok(MapType::PerCpuHash | MapType::LruPerCpuHash)
    );
    let value_len = if per_cpu {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        (info.value_size() as usize).next_multiple_of(8) * cpus
    } else {
        info.value_size() as usize
    };
    let mut n = 0;
    super::batch::for_each_raw(map, info.key_size() as usize, value_len, |_, _| n += 1)?;
    Ok(n)
}

/// Occupancy of every map this build pins (maps that are not pinned, or
/// cannot be read, are left out).
pub fn occupancy(layout: &PinLayout) -> Vec<Occupancy> {
    map_specs()
        .into_iter()
        .filter_map(|spec| {
            let path = layout.map_path(spec.name);
            let info = MapInfo::from_pin(&path).ok()?;
            let capacity = info.max_entries();
            let array = matches!(info.map_type().ok()?, MapType::Array | MapType::PerCpuArray);
            let entries = if array {
                None
            } else {
                let data = MapData::from_pin(&path).ok()?;
                count_batched(&data, &info)
                    .or_else(|_| count_keys(data.fd().as_fd(), info.key_size(), capacity))
                    .ok()
            };
            Some(Occupancy {
                name: spec.name,
                capacity,
                entries,
            })
        })
        .collect()
}
