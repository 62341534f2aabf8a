//! Xen's C API for skyferry, and nothing else in the workspace touches it (DESIGN.md).

#[cfg(feature = "double")]
pub mod double;
