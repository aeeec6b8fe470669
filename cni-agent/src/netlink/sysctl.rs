//! Network sysctls under /proc/sys/net.
//!
//! /proc/sys/net shows the network namespace of the *thread* that opens the
//! file, so to change a container's sysctl call these from inside
//! [`super::NetNs::run`]. Keys use '/' separators ("net/ipv4/conf/eth0/arp_notify")
//! because interface names may contain dots (VLAN devices "cni0.100").

use std::fs;
use std::path::PathBuf;

use super::NetlinkError;

fn path_of(key: &str) -> Result<PathBuf, NetlinkError> {
    let key = key.trim_start_matches('/');
    let valid = key.starts_with("net/")
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if !valid {
        return Err(NetlinkError::InvalidSysctlKey(key.to_string()));
    }
    Ok(PathBuf::from("/proc/sys").join(key))
}

/// Reads a sysctl, trimmed of its trailing newline.
pub fn read(key: &str) -> Result<String, NetlinkError> {
    let path = path_of(key)?;
    fs::read_to_string(&path)
        .map(|value| value.trim().to_string())
        .map_err(|source| NetlinkError::Sysctl {
            key: key.to_string(),
            source,
        })
}

/// Writes a sysctl.
pub fn write(key: &str, value: &str) -> Result<(), NetlinkError> {
    let path = path_of(key)?;
    fs::write(&path, value).map_err(|source| NetlinkError::Sysctl {
        key: key.to_string(),
        source,
    })
}

/// Writes a sysctl only if it does not already hold `value`, so that a
/// read-only /proc/sys (a container runtime's sandbox) is no error when the
/// setting is already right.
pub fn ensure(key: &str, value: &str) -> Result<(), NetlinkError> {
    match read(key) {
        Ok(current) if current == value => Ok(()),
        _ => write(key, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_confined_to_proc_sys_net() {
        assert_eq!(
            path_of("net/ipv4/ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            path_of("/net/ipv4/conf/cni0.100/arp_notify").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/cni0.100/arp_notify")
        );
        for bad in [
            "kernel/hostname",
            "net/../kernel/hostname",
            "net//x",
            "net/./x",
            "",
        ] {
            assert!(path_of(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reads_a_real_sysctl() {
        let value = read("net/ipv4/ip_forward").unwrap();
        assert!(value == "0" || value == "1", "{value:?}");
    }
}
