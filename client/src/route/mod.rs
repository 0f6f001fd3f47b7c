//! The sans-IO routing core (work in progress).

pub mod gate;
pub mod murmur2;
pub mod rendezvous;
pub mod router;
pub mod switch;

#[cfg(test)]
mod testutil;
