//! Kernel network configuration through rtnetlink: namespaces, links, addresses, routes, sysctls.
