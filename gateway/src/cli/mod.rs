//! The command line's clients of a running fleet: `cortex status` and `cortex models` (tables of
//! a gateway's `/cortex/fleet` and `/v1/models`, [`status`]) and `cortex probe` (one host checked
//! end to end, [`probe`]).

pub mod probe;
pub mod status;
