//! Spillway's pure core: what the gateway knows about models, regions and
//! (in later modules) quota budgets, with no I/O at all.
//!
//! Everything here is plain data and functions so it can be tested
//! exhaustively without a network, a clock or a runtime. The HTTP edge
//! (`spillway-gateway`) owns sockets, config files and time; it hands this
//! crate plain values and gets decisions back.
//!
//! - [`keys`]: [`ModelId`] and [`QuotaGroup`], the two names of a model, as
//!   two types (budgets and queues are keyed by group, learning by model).
//! - [`catalog`]: the configured models, their aliases and the regions that
//!   serve each one; resolves whatever name a client sent to one model.
//! - [`estimate`]: the measure of a request body in features (overheads,
//!   letters and words, digits, punctuation, CJK, base64, JSON, images), in
//!   one pass, and the floor no tokenizer undercuts; [`image`]: what an
//!   image costs, from its header.
//! - [`learn`]: turning features into a reservation: per-feature rates and
//!   a margin learned from settled usage, and the expected output.
//! - [`adaptive`]: what upstream 429s teach: cooldowns, learned limits, probing back up.
//! - [`store`]: the [`QuotaStore`](store::QuotaStore) interface (atomic choose-and-reserve across
//!   regions) and the in-memory store.
//! - [`shares`]: weighted max-min shares of a model's pool between tenants,
//!   held over the window while demand exceeds it.
//! - [`ledger`]: one (region, model) budget as a reservation log that is
//!   never over quota in any window and can be settled to actual usage.
//! - [`bucket`]: one budget on Anthropic's own API as its continuously
//!   refilling token buckets, exact, and what its rate-limit headers teach.
//! - [`spend`]: what a request cost, from its tokens and the model's
//!   prices, in exact integer picodollars; UTC days and months; spend caps.
//! - [`capacity`]: request logs give back the capacity a peak grew.

pub mod adaptive;
pub mod bucket;
pub mod capacity;
pub mod catalog;
pub mod estimate;
pub mod image;
pub mod keys;
pub mod learn;
pub mod ledger;
pub mod shares;
pub mod spend;
pub mod store;

pub use catalog::{
    default_cache_reads_count, Catalog, CatalogError, ModelSpec, RegionBudget, Resolution,
    VERTEX_PROVIDER,
};
pub use estimate::{estimate_input, ContentClass, Feature, Features, InputEstimate, Rates};
pub use image::{base64_image_dimensions, image_dimensions, image_tokens, ImageRule};
pub use keys::{ModelId, QuotaGroup};
