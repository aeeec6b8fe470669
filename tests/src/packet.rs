//! Crafted packets for the BPF_PROG_TEST_RUN tests (`*_packets.rs`):
//! Ethernet + IPv4/IPv6 frames carrying TCP, UDP and ICMP, with every
//! checksum computed here from scratch, so that a frame a program rewrote
//! can be compared byte for byte with the frame it should have become.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;
/// Length of the Ethernet header every frame starts with.
pub const ETH: usize = 14;
/// IPv4 fragment flags (host order).
pub const IP_MF: u16 = 0x2000;

/// One's complement sum of `b` as big-endian 16-bit words, unfolded.
pub fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Sum of the transport checksum's coverage: the pseudo-header (none for
/// ICMPv4) and the upper-layer bytes `l4`, whose length is the datagram's.
pub fn l4_sum(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, proto: u8, l4: &[u8]) -> u32 {
    if proto == ICMP {
        return sum16(l4);
    }
    sum16(&octets(src.into()))
        + sum16(&octets(dst.into()))
        + l4.len() as u32
        + u32::from(proto)
        + sum16(l4)
}

/// Whether the transport checksum in `l4` (a whole datagram) is right for
/// these addresses.
pub fn l4_valid(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, proto: u8, l4: &[u8]) -> bool {
    fold(l4_sum(src, dst, proto, l4)) == 0xffff
}

/// Offset of the transport checksum field in a transport header.
pub fn csum_off(proto: u8) -> usize {
    match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    }
}

/// Fills in the transport checksum of `l4` (UDP: a computed 0 is sent as
/// 0xffff, since 0 means "no checksum").
pub fn fill_l4_csum(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, proto: u8, l4: &mut [u8]) {
    let off = csum_off(proto);
    l4[off..off + 2].copy_from_slice(&[0, 0]);
    let mut c = !fold(l4_sum(src, dst, proto, l4));
    if c == 0 && proto == UDP {
        c = 0xffff;
    }
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// An IPv4 header (no options) with its checksum. `frag` is the flags and
/// fragment offset field (host order), `len` the payload's length.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    frag: u16,
    len: usize,
) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + len) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = !fold(sum16(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// Whether the IPv4 header at the start of `h` has a right checksum.
pub fn ipv4_header_valid(h: &[u8]) -> bool {
    let ihl = usize::from(h[0] & 0x0f) * 4;
    fold(sum16(&h[..ihl])) == 0xffff
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An Ethernet + IPv4 or IPv6 frame (the family of the addresses) carrying
/// `l4` of protocol `proto`, its transport checksum filled in.
pub fn frame<A: Into<IpAddr>>(src: A, dst: A, proto: u8, mut l4: Vec<u8>) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    fill_l4_csum(src, dst, proto, &mut l4);
    raw_frame(src, dst, proto, &l4)
}

/// A frame with `l4` as given, its transport checksum untouched (IPv4: id 0,
/// not fragmented).
pub fn raw_frame<A: Into<IpAddr>>(src: A, dst: A, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src.into(), dst.into()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_frame(s, d, proto, 0, 0, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut f = eth(0x86dd);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(l4);
            f
        }
        _ => panic!("addresses of two families"),
    }
}

/// An Ethernet + IPv4 frame with IP id `id` and flags/fragment offset
/// `frag`, carrying `payload` as is.
pub fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend_from_slice(&ipv4_header(src, dst, proto, id, frag, payload.len()));
    f.extend_from_slice(payload);
    f
}

/// The IPv4 fragments of the datagram `l4` (its checksum filled in here),
/// with IP id `id` and at most `chunk` payload bytes each (a multiple of 8).
pub fn ipv4_fragments(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    mut l4: Vec<u8>,
    chunk: usize,
) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0, "fragment payloads are multiples of 8 bytes");
    fill_l4_csum(src, dst, proto, &mut l4);
    let n = l4.len().div_ceil(chunk);
    l4.chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let more = if i + 1 < n { IP_MF } else { 0 };
            ipv4_frame(src, dst, proto, id, more | (i * chunk / 8) as u16, part)
        })
        .collect()
}

/// The datagram carried by IPv4 fragments (Ethernet frames, in order).
pub fn reassemble(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let ihl = usize::from(f[ETH] & 0x0f) * 4;
        let off = usize::from(u16_at(f, ETH + 6) & 0x1fff) * 8;
        assert_eq!(off, out.len(), "fragments in order, without gaps");
        out.extend_from_slice(&f[ETH + ihl..]);
    }
    out
}

/// IPv6 next-header value of the Fragment extension header.
pub const FRAGMENT: u8 = 44;

/// The IPv6 fragments of the datagram `l4` (its checksum filled in here):
/// each a fixed header followed by a Fragment header (identification
/// `id`) and at most `chunk` bytes of the datagram (a multiple of 8).
pub fn ipv6_fragments(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    id: u32,
    mut l4: Vec<u8>,
    chunk: usize,
) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0, "fragment payloads are multiples of 8 bytes");
    fill_l4_csum(src, dst, proto, &mut l4);
    let n = l4.len().div_ceil(chunk);
    l4.chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            // Offset in 8-byte units, shifted left by 3: the byte offset.
            let off_m = (i * chunk) as u16 | u16::from(i + 1 < n);
            let mut body = vec![proto, 0];
            body.extend_from_slice(&off_m.to_be_bytes());
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(part);
            raw_frame(src, dst, FRAGMENT, &body)
        })
        .collect()
}

/// The datagram carried by IPv6 fragments (Ethernet frames, in order, each
/// with its Fragment header right after the fixed header).
pub fn reassemble6(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        assert_eq!(f[ETH + 6], FRAGMENT, "a Fragment header");
        let off = usize::from(u16_at(f, ETH + 40 + 2) & 0xfff8);
        assert_eq!(off, out.len(), "fragments in order, without gaps");
        out.extend_from_slice(&f[ETH + 48..]);
    }
    out
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

/// An ICMP or ICMPv6 echo message of type `ty`.
pub fn echo(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut e = vec![ty, 0, 0, 0];
    e.extend_from_slice(&id.to_be_bytes());
    e.extend_from_slice(&seq.to_be_bytes());
    e.extend_from_slice(b"ping payload");
    e
}

pub fn u16_at(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

pub fn ipv4_at(f: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[off], f[off + 1], f[off + 2], f[off + 3])
}

pub fn ipv6_at(f: &[u8], off: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&f[off..off + 16]);
    Ipv6Addr::from(o)
}

/// Asserts that the IPv4 frame `out` is `want`: first its IPv4 header
/// checksum and (unless it is a fragment, whose datagram must be checked
/// reassembled, or UDP without a checksum) its transport checksum, so that
/// a wrong checksum is named as such; then every byte.
pub fn assert_ipv4_frame(out: &[u8], want: &[u8], what: &str) {
    if out.len() >= ETH + 20 && u16_at(out, 12) == 0x0800 {
        assert!(
            ipv4_header_valid(&out[ETH..]),
            "{what}: IPv4 header checksum"
        );
        let l4 = ETH + usize::from(out[ETH] & 0x0f) * 4;
        let fragment = u16_at(out, ETH + 6) & (IP_MF | 0x1fff) != 0;
        let proto = out[ETH + 9];
        let no_checksum = proto == UDP && u16_at(out, l4 + 6) == 0;
        if !fragment && !no_checksum && [TCP, UDP, ICMP].contains(&proto) {
            let (src, dst) = (ipv4_at(out, ETH + 12), ipv4_at(out, ETH + 16));
            assert!(
                l4_valid(src, dst, proto, &out[l4..]),
                "{what}: transport checksum"
            );
        }
    }
    assert!(out == want, "{what}: {}", first_difference(out, want));
}

/// Where two frames first differ and around it, for assertion messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => {
            let (lo, hi) = (i.saturating_sub(4), (i + 8).min(got.len()).min(want.len()));
            format!(
                "first difference at byte {i} (frame offset; IP header at {ETH}): got {:02x?}, want {:02x?} (from byte {lo})",
                &got[lo..hi],
                &want[lo..hi]
            )
        }
        None if got.len() != want.len() => {
            format!("lengths differ: got {}, want {}", got.len(), want.len())
        }
        None => "identical".to_string(),
    }
}
