//! Fuzz targets, as proptest properties bounded by wall-clock time.
//!
//! Five targets, one module each, over the code that reads what clients
//! and Vertex send: [`request`] (validation and the Vertex-body
//! translation), [`estimate`] (the measure of a body and the learner),
//! [`sse`] (the incremental framer and the usage read from streams and
//! bodies, under every chunk split), [`errors`] (the Google/Anthropic
//! error mapper and the gateway's own error frames) and [`batch`] (the
//! batch upload parser). Every target has a `fuzz` test, which runs its
//! properties on generated and mutated inputs for `SPILLWAY_FUZZ_SECS`
//! seconds (3 by default, so `cargo test --workspace` stays quick; CI runs
//! longer), and a `corpus` test, which replays every case kept under
//! `tests/fuzz-corpus/<target>/` on every run: seeds written by hand and
//! whatever the fuzzing found (see [`harness`]).
//!
//! The properties are the code's own promises: no input panics; what is
//! valid comes back unchanged where it should (a request's fields, a
//! stream's bytes, a batch line's `custom_id` and `params`); what is not
//! becomes an Anthropic-shaped error ([`shape`]) that names the problem.
//!
//! `SPILLWAY_FUZZ_SECS=60 cargo test --test fuzz -- --nocapture` runs each
//! target for a minute and prints the cases each property ran.

mod batch;
mod errors;
mod estimate;
mod harness;
mod inputs;
mod request;
mod shape;
mod sse;
