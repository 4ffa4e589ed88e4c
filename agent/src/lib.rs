//! rtv's guest agent, as a library: the wire protocol it shares with the
//! host runtime. The agent binary (PID 1 of the guest) is `src/main.rs`.

pub mod protocol;
