//! The parts of `spillway-bench` that tests share: deterministic content
//! (English and CJK prose, code, tool use, tiny turns) from a seeded
//! generator, so a benchmark and a test that reproduce the same workload
//! send the same text; and a gateway started in process.

pub mod content;
pub mod gateway;
