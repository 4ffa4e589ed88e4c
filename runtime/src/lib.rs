//! rtv's runtime library: the host client of the guest agent, VM templates
//! (snapshots of a booted guest, cached per kernel, initramfs, VMM build and
//! machine size) and sandboxes started from them.

pub mod agent_client;
pub mod host_cgroup;
pub mod sandbox;
pub mod share;
pub mod spec;
pub mod template;

pub use agent_client::{AgentClient, ClientError, Endpoint};
pub use sandbox::{Origin, Sandbox, SandboxConfig, SandboxError};
pub use share::{remove_tree, Share, ShareError};
pub use template::{TemplateCache, TemplateError, TemplateSpec};
