//! Emulated devices.

pub mod bus;
pub mod reset;
pub mod serial;
pub mod virtio;
