//! rtv's runtime library. For now: the host client of the guest agent.

pub mod agent_client;

pub use agent_client::{AgentClient, ClientError, Endpoint};
