//! The rules of idempotency records: validated values, commands, and the state machine. Pure: no
//! I/O, no clocks (callers pass `now`, which always comes from the store's clock).

pub mod admin;
mod commands;
mod record;
mod values;

pub use commands::*;
pub use record::*;
pub use values::*;
