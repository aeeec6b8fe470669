//! The plugin implementations behind the binaries in src/bin.
