//! What the benchmark programs share: an in-process fleet, statistics, and facts about this
//! machine and process.

pub mod fleet;
pub mod stats;
pub mod system;
