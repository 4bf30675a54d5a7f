//! Sync: the protocol two replicas speak (its docs are in `session`, to be
//! split into its parts).

mod session;

pub use session::*;
