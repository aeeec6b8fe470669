//! IP addresses on links: list, add, replace, delete.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::AddressMessageBuilder;

use super::{Netlink, NetlinkError};

/// An address assigned to a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    /// The local address with its prefix length (e.g. 10.22.0.2/24).
    pub addr: IpNet,
    /// IFA_F_* flags (tentative, dadfailed, permanent, ...).
    pub flags: AddressFlags,
}

impl Address {
    /// Still doing (or failed) IPv6 duplicate address detection: not usable yet.
    pub fn is_unsettled(&self) -> bool {
        self.flags
            .intersects(AddressFlags::Tentative | AddressFlags::Dadfailed)
    }

    fn from_message(msg: AddressMessage) -> Option<Self> {
        let mut local = None;
        let mut address = None;
        let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
        for attr in msg.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(ip),
                AddressAttribute::Address(ip) => address = Some(ip),
                // The 32-bit attribute supersedes the 8 bits of the header.
                AddressAttribute::Flags(f) => flags = f,
                _ => {}
            }
        }
        // For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is
        // the peer on point-to-point links); IPv6 sends only IFA_ADDRESS.
        let ip = local.or(address)?;
        let addr = IpNet::new(ip, msg.header.prefix_len).ok()?;
        Some(Self {
            index: msg.header.index,
            addr,
            flags,
        })
    }
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    match addr.addr() {
        IpAddr::V4(ip) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, addr.prefix_len())
            .build(),
        IpAddr::V6(ip) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(ip, addr.prefix_len())
            .build(),
    }
}

impl Netlink {
    /// Addresses of one link (`Some(index)`) or of every link.
    ///
    /// For one link the index goes into the request header too, so that a
    /// strict-checking socket (see [`Netlink::connect`]) has the kernel dump
    /// only that link's addresses instead of every address of the namespace;
    /// the filter on our side keeps the answer right where it does not.
    pub fn addresses(&self, index: Option<u32>) -> Result<Vec<Address>, NetlinkError> {
        let mut request = self.handle().address().get();
        if let Some(index) = index {
            request.message_mut().header.index = index;
            request = request.set_link_index_filter(index);
        }
        let msgs: Vec<AddressMessage> = self
            .block_on(request.execute().try_collect())
            .map_err(NetlinkError::request("list addresses"))?;
        Ok(msgs.into_iter().filter_map(Address::from_message).collect())
    }

    /// Adds an address (IPv4 gets the subnet's broadcast address, as `ip addr
    /// add ... brd +` and the reference plugins do). Fails with EEXIST if present.
    pub fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut request = self
            .handle()
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        *request.message_mut() = address_message(index, addr);
        self.block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "add address {addr} to link #{index}"
            )))
    }

    /// Adds an address or updates it if present.
    pub fn replace_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut request = self
            .handle()
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace();
        *request.message_mut() = address_message(index, addr);
        self.block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "replace address {addr} on link #{index}"
            )))
    }

    /// Removes an address from a link.
    pub fn delete_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let request = self.handle().address().del(address_message(index, addr));
        self.block_on(request.execute())
            .map_err(NetlinkError::request(format!(
                "delete address {addr} from link #{index}"
            )))
    }
}
