//! What the domain modules stand on. None of these imports a domain module.

pub mod config;
pub mod cpu;
pub mod digest;
pub mod hub;
pub mod io;
pub mod keyed;
pub mod memory;
pub mod paths;
pub mod profile;
pub mod rng;
pub mod switch;
