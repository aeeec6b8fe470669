//! NODE_ADDRS: the node's own addresses (IPv4 and IPv6), which is what a
//! hostPort mapping without a hostIP listens on. Kept in step with the
//! kernel by the agent.
use std::net::IpAddr;

use aya::maps::{HashMap, MapData};
use cni_ebpf_common::{map_names, IpKey};

use super::{
    entries::ip_key,
    loader::DatapathError,
    pins::{open_pinned, PinLayout},
};

pub struct NodeAddrMap(HashMap<MapData, IpKey, u32>);

impl NodeAddrMap {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let data = open_pinned(layout, map_names::NODE_ADDRS)?;
        HashMap::try_from(aya::maps::Map::HashMap(data))
            .map(Self)
            .map_err(|source| DatapathError::Map {
                name: map_names::NODE_ADDRS,
                source,
            })
    }

    /// Makes the map hold exactly `addrs`, both families, except IPv6
    /// link-local addresses: every pod's host-side veth has one, so a node
    /// with a thousand pods would fill the map with addresses no hostPort
    /// client uses (they are scoped to one link, and pods reach the node
    /// through their gateway's global address).
    pub fn sync(&mut self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let want: Vec<IpKey> = addrs
            .iter()
            .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .map(|a| ip_key(*a))
            .collect();
        let have: Vec<IpKey> = self.0.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = self.0.remove(k);
        }
        for k in want.iter().filter(|k| !have.contains(k)) {
            self.0
                .insert(k, 1, 0)
                .map_err(|source| DatapathError::Map {
                    name: map_names::NODE_ADDRS,
                    source,
                })?;
        }
        Ok(())
    }
}
