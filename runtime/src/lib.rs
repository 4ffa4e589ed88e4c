//! rtv's runtime library: the host client of the guest agent, VM templates
//! (snapshots of a booted guest, cached per kernel, initramfs, VMM build and
//! machine size), sandboxes started from them, and the spec's OCI hooks.

pub mod agent_client;
pub mod hooks;
pub mod host_cgroup;
pub mod sandbox;
pub mod share;
pub mod spec;
pub mod template;

pub use agent_client::{AgentClient, ClientError, Endpoint, OomWait, Reply};
pub use hooks::HookError;
pub use sandbox::{Origin, Sandbox, SandboxConfig, SandboxError};
pub use share::{remove_tree, Share, ShareError};
pub use template::{TemplateCache, TemplateError, TemplateSpec};
