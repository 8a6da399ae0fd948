//! Spillway's pure core: what the gateway knows about models, regions and
//! (in later modules) quota budgets, with no I/O at all.
//!
//! Everything here is plain data and functions so it can be tested
//! exhaustively without a network, a clock or a runtime. The HTTP edge
//! (`spillway-gateway`) owns sockets, config files and time; it hands this
//! crate plain values and gets decisions back.
//!
//! - [`catalog`]: the configured models, their aliases and the regions that
//!   serve each one; resolves whatever name a client sent to one model.
//! - [`ledger`]: one (region, model) budget as a reservation log that is
//!   never over quota in any window and can be settled to actual usage.

pub mod catalog;
pub mod ledger;

pub use catalog::{Catalog, CatalogError, ModelSpec, RegionBudget, Resolution};
