//! A CRI v1 client and a private containerd, to drive CNI plugins the way
//! kubelet does: through containerd's CRI plugin and go-cni.
//!
//! - [`api`]: the CRI v1 messages (hand-written prost structs).
//! - [`client`]: the gRPC client over the runtime's Unix socket.
//! - [`sandbox`]: pod and container specs as kubelet sends them, and what
//!   a verbose PodSandboxStatus reveals (netns path, pid, CNI result).
//! - [`image`]: offline images from a static busybox, as docker archives.
//! - [`node_image`]: the cni-ebpf node image (agent, plugins and the
//!   shared libraries they link), for the DaemonSet.
//! - [`containerd`]: starting a containerd whose every path is private,
//!   inside a given network namespace, and tearing it down.
//! - [`cleanup`]: forced cleanup of a runtime's processes, mounts, cgroups.
//! - [`runtime_dir`]: a runtime's private directory, cleaned on drop, and
//!   whether containerd can run here at all.
//!
//! Nothing here depends on the test harness: callers pass the network
//! namespace path, the directories and the socket.
pub mod api;
pub mod cleanup;
pub mod client;
pub mod containerd;
pub mod error;
pub mod image;
pub mod node_image;
pub mod runtime_dir;
pub mod sandbox;

pub use client::{BlockingCriClient, CriClient};
pub use containerd::{Containerd, ContainerdConfig, Teardown};
pub use error::{Error, Result};
pub use image::ImageBuilder;
pub use runtime_dir::{containerd_missing, RuntimeDir};
pub use sandbox::{ContainerSpec, HostPort, PodSpec, SandboxInfo};
