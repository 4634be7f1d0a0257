//! placeholder

pub mod identity;
