//! rtv's runtime library: the host client of the guest agent, VM templates
//! (snapshots of a booted guest, cached per kernel, initramfs, VMM build and
//! machine size), sandboxes started from them, and the spec's OCI hooks.

pub mod agent_client;
pub mod artifacts;
pub mod config;
pub mod hooks;
pub mod host_cgroup;
pub mod net;
pub mod pod;
pub mod random;
pub mod sandbox;
pub mod share;
pub mod spec;
pub mod template;
pub mod vmm_process;

pub use agent_client::{AgentClient, ClientError, Endpoint, OomWait, Reply};
pub use artifacts::{template_dir, ArtifactError, Artifacts};
pub use hooks::HookError;
pub use pod::{ContainerHooks, ErrorClass, NewContainer, Pod, PodConfig, PodError, Role};
pub use sandbox::{Origin, Sandbox, SandboxConfig, SandboxError};
pub use share::{remove_tree, Share, ShareError};
pub use template::{TemplateCache, TemplateError, TemplateSpec};
