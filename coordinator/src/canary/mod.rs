//! Canary judgment: is the new version on a canary group of nodes worse than the old
//! version on a comparable baseline group, observed over the same window?
//!
//! - [`config`](CanaryConfig): the knobs (release.toml `[canary]`), merged over defaults that
//!   suit the sample app's metrics, and their validation.
//! - [`mann_whitney`]: the two-sided Mann–Whitney U test (exact for small samples without
//!   ties, normal approximation otherwise), as R's `wilcox.test` computes it.
//! - [`judge`]: per metric pass / high / low / no data, a weighted score and a verdict, with
//!   a one-line summary an operator reads when a gate halts a rollout.
//!
//! What it improves on Kayenta's judge (see `shared/CANARY.md`): a zero baseline mean gives
//! an infinite ratio instead of "no data"; a change counts only when it is both significant
//! and beyond the bound, and the ratio shown is the one that decided; the bound also covers
//! node-to-node variation (measured, pooled with an expected spread), so a one-node canary
//! is not failed for being an ordinary node; where each node's samples from before the
//! canary switched are given (the anchor window), each node is its own control and its
//! change is judged rather than its level; every number that decided is in the result. Its
//! measured false-alarm and detection rates are in the README (`bench-canary`).
//!
//! **Invariant**: nothing here does I/O or reads a clock. The caller (the rollout) chooses
//! the windows, queries the metric store and passes the values in.

mod config;
mod judge;
pub mod mann_whitney;

pub use config::{
    CanaryConfig, CanaryConfigError, Direction, MetricSpec, NoDataPolicy, DEFAULT_GROUP,
};
pub use judge::{judge, Anchors, Classification, GroupSamples, Judgment, MetricJudgment, Verdict};
