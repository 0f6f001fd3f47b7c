//! The sans-IO routing core (work in progress).

pub mod gate;
pub mod murmur2;
pub mod rendezvous;
pub mod router;

#[cfg(test)]
mod testutil;
