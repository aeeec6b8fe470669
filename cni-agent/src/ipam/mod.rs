//! IPAM: host-local configuration, ranges, the on-disk store and the allocator.
