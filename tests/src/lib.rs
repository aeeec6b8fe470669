//! Test harness: network namespaces, plugin invocation, cleanup.
