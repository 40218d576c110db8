//! Rollout plans: what an operator asks for (`rollout start` flags, the API request, a
//! release's `release.toml` `[rollout]` defaults), parsed into typed values, merged (request
//! over release defaults over built-in defaults) and checked before anything starts.
//!
//! Pure: no I/O, no clock. The checks that need the fleet (an empty selection, a wave count
//! above the selection) happen in [`resolve_waves`] and [`assign_waves`], still without I/O.
//!
//! Invariants:
//! - A [`Plan`] always has at least one wave, its last wave is 100 %, percentages and counts
//!   each strictly increase, `max_parallel` ≥ 1 and `max_failure_pct` is within 0..=100.
//! - Nodes are put in waves by a stable hash of app and node id ([`wave_rank`]), so a node
//!   keeps its place (and so, mostly, its wave) across rollouts of the same app, whatever
//!   the order the inventory lists nodes in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use protocol::{AppName, Digest, NodeId, UnixSeconds};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most waves in one plan: more would be a schedule, not a rollout.
pub const MAX_WAVES: usize = 20;
/// Most switch windows in one plan.
pub const MAX_WINDOWS: usize = 16;
/// Most `key=value` pairs in a selection.
pub const MAX_SELECTOR_PAIRS: usize = 16;
/// The node deadline when none is given anywhere.
pub const DEFAULT_NODE_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// Why a plan is refused. Each message names the offending value and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("invalid wave {0:?}: give a node count (`1`, `10`) or a percentage of the selected nodes (`5%`, `12.5%`)")]
    WaveSyntax(String),
    #[error("wave {0:?} is empty: every wave must add at least one node or percent")]
    WaveZero(String),
    #[error("wave {0:?} is over 100%")]
    WaveOver100(String),
    #[error("no waves given: list at least one, ending with 100% (e.g. `1,10%,100%`)")]
    NoWaves,
    #[error("{0} waves given; a plan has at most {MAX_WAVES}")]
    TooManyWaves(usize),
    #[error("waves must increase: {later} comes after {earlier} (waves are cumulative targets, e.g. `1,10%,50%,100%`)")]
    NotIncreasing { earlier: String, later: String },
    #[error("the last wave is {0}, not 100%: end the list with 100% so that every selected node is reached")]
    LastNot100(String),
    #[error("wave {wave} asks for {count} nodes but the selection has {selected}")]
    CountAboveSelection {
        wave: usize,
        count: u32,
        selected: usize,
    },
    #[error("wave {wave} ({later}) reaches {later_nodes} nodes of {selected}, fewer than wave {earlier_wave} ({earlier}, {earlier_nodes} nodes): waves are cumulative, so reorder them")]
    ShrinksOnSelection {
        earlier_wave: usize,
        earlier: String,
        earlier_nodes: usize,
        wave: usize,
        later: String,
        later_nodes: usize,
        selected: usize,
    },
    #[error("invalid duration for {field} {value:?}: use a number with a unit, e.g. 30s, 10m, 2h")]
    Duration { field: &'static str, value: String },
    #[error("invalid switch window {0:?}: use HH:MM-HH:MM in UTC (e.g. 22:00-06:00); start and end must differ")]
    Window(String),
    #[error("{0} switch windows given; a plan has at most {MAX_WINDOWS}")]
    TooManyWindows(usize),
    #[error("max_parallel is 0: at least one node must be allowed to switch at a time")]
    ZeroParallel,
    #[error("max_failure_pct {0} is not a percentage within 0..=100")]
    FailurePct(String),
    #[error("invalid selection {0:?}: use key=value pairs separated by commas (e.g. region=eu,ring=canary)")]
    Selector(String),
    #[error("selection names {0} twice with different values; a node has one value per label")]
    SelectorConflict(String),
    #[error("the selection has more than {MAX_SELECTOR_PAIRS} key=value pairs")]
    SelectorTooLong,
    #[error("invalid offline policy {0:?}: use skip or fail")]
    Offline(String),
}

/// One wave's cumulative target: a number of nodes, or a share of the selection in basis
/// points (1/100 of a percent: `12.5%` is 1250), so that plans compare exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaveSize {
    Count(u32),
    Percent(u32),
}

impl WaveSize {
    pub const ALL: WaveSize = WaveSize::Percent(10_000);

    /// How many of `selected` nodes this cumulative target reaches. A percentage rounds up, so
    /// `1%` of 10 nodes is one node, never none.
    pub fn nodes_of(self, selected: usize) -> usize {
        match self {
            WaveSize::Count(n) => n as usize,
            WaveSize::Percent(bp) => (bp as usize * selected).div_ceil(10_000),
        }
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WaveSize::Count(n) => write!(f, "{n}"),
            WaveSize::Percent(bp) if bp % 100 == 0 => write!(f, "{}%", bp / 100),
            WaveSize::Percent(bp) if bp % 10 == 0 => write!(f, "{}.{}%", bp / 100, bp % 100 / 10),
            WaveSize::Percent(bp) => write!(f, "{}.{:02}%", bp / 100, bp % 100),
        }
    }
}

impl FromStr for WaveSize {
    type Err = PlanError;

    fn from_str(text: &str) -> Result<WaveSize, PlanError> {
        let text = text.trim();
        let syntax = || PlanError::WaveSyntax(text.chars().take(40).collect());
        let size = match text.strip_suffix('%') {
            Some(number) => {
                let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
                let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                if !digits(whole) || !(fraction.is_empty() || digits(fraction)) {
                    return Err(syntax());
                }
                if fraction.len() > 2 {
                    return Err(syntax());
                }
                let whole: u32 = whole.parse().map_err(|_| syntax())?;
                if whole > 100 {
                    return Err(PlanError::WaveOver100(text.to_owned()));
                }
                let fraction: u32 = format!("{fraction:0<2}").parse().map_err(|_| syntax())?;
                let bp = whole * 100 + fraction;
                if bp > 10_000 {
                    return Err(PlanError::WaveOver100(text.to_owned()));
                }
                WaveSize::Percent(bp)
            }
            None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
                WaveSize::Count(text.parse().map_err(|_| syntax())?)
            }
            None => return Err(syntax()),
        };
        if matches!(size, WaveSize::Count(0) | WaveSize::Percent(0)) {
            return Err(PlanError::WaveZero(text.to_owned()));
        }
        Ok(size)
    }
}

impl Serialize for WaveSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WaveSize {
    /// From `"5%"`, `"3"` or a bare integer (`waves = [1, "10%", "100%"]` in TOML).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WaveSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Count(n) => n.to_string(),
            Raw::Text(text) => text,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a comma-separated wave list (`1,5%,25%,100%`) and checks its shape.
pub fn parse_waves(text: &str) -> Result<Vec<WaveSize>, PlanError> {
    let waves = text
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<WaveSize>, _>>()?;
    check_waves(&waves)?;
    Ok(waves)
}

/// The rules a wave list must keep whatever the selection: not empty, at most
/// [`MAX_WAVES`], counts and percentages each strictly increasing, the last 100 %.
pub fn check_waves(waves: &[WaveSize]) -> Result<(), PlanError> {
    let Some(last) = waves.last() else {
        return Err(PlanError::NoWaves);
    };
    if waves.len() > MAX_WAVES {
        return Err(PlanError::TooManyWaves(waves.len()));
    }
    let (mut count, mut percent): (Option<WaveSize>, Option<WaveSize>) = (None, None);
    for &wave in waves {
        let (earlier, value) = match wave {
            WaveSize::Count(n) => (&mut count, n),
            WaveSize::Percent(bp) => (&mut percent, bp),
        };
        if let Some(before) = *earlier {
            let before_value = match before {
                WaveSize::Count(n) | WaveSize::Percent(n) => n,
            };
            if value <= before_value {
                return Err(PlanError::NotIncreasing {
                    earlier: before.to_string(),
                    later: wave.to_string(),
                });
            }
        }
        *earlier = Some(wave);
    }
    if *last != WaveSize::ALL {
        return Err(PlanError::LastNot100(last.to_string()));
    }
    Ok(())
}

/// The cumulative node count each wave reaches on a selection of `selected` nodes. A wave may
/// add no node (a small percentage of a small selection rounds to what the wave before it
/// already reached); such a wave is passed over when the rollout runs.
pub fn resolve_waves(waves: &[WaveSize], selected: usize) -> Result<Vec<usize>, PlanError> {
    let mut reached: Vec<usize> = Vec::with_capacity(waves.len());
    for (i, &wave) in waves.iter().enumerate() {
        if let WaveSize::Count(count) = wave {
            if count as usize > selected {
                return Err(PlanError::CountAboveSelection {
                    wave: i + 1,
                    count,
                    selected,
                });
            }
        }
        let nodes = wave.nodes_of(selected).min(selected);
        if let Some((j, &before)) = reached.iter().enumerate().max_by_key(|(_, n)| **n) {
            if nodes < before {
                return Err(PlanError::ShrinksOnSelection {
                    earlier_wave: j + 1,
                    earlier: waves[j].to_string(),
                    earlier_nodes: before,
                    wave: i + 1,
                    later: wave.to_string(),
                    later_nodes: nodes,
                    selected,
                });
            }
        }
        reached.push(nodes);
    }
    Ok(reached)
}

/// Where a node falls in the order waves are filled for `app`: the first 8 bytes of
/// BLAKE3(`app` NUL `node`). Stable across coordinator versions and restarts (BLAKE3 is part
/// of the image format), independent of the inventory's order.
pub fn wave_rank(app: &AppName, node: &NodeId) -> u64 {
    let digest = Digest::of(format!("{app}\0{node}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// Splits the selected nodes into waves: ordered by [`wave_rank`] (node id on a tie), wave
/// `i` gets the nodes between the cumulative counts of waves `i-1` and `i`.
pub fn assign_waves(app: &AppName, selected: &[NodeId], reached: &[usize]) -> Vec<Vec<NodeId>> {
    let mut ranked: Vec<(u64, &NodeId)> = selected.iter().map(|n| (wave_rank(app, n), n)).collect();
    ranked.sort();
    let mut waves = Vec::with_capacity(reached.len());
    let mut start = 0;
    for &end in reached {
        let end = end.clamp(start, ranked.len());
        waves.push(
            ranked[start..end]
                .iter()
                .map(|(_, n)| (*n).clone())
                .collect(),
        );
        start = end;
    }
    waves
}

/// A daily span of UTC time in which switches may happen, `HH:MM-HH:MM`. The end is
/// exclusive; a span whose end is before its start runs over midnight (`22:00-06:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchWindow {
    start: u16,
    end: u16,
}

const MINUTES_PER_DAY: u64 = 24 * 60;

impl SwitchWindow {
    fn minute_of_day(now: UnixSeconds) -> u64 {
        now / 60 % MINUTES_PER_DAY
    }

    pub fn contains(&self, now: UnixSeconds) -> bool {
        let minute = Self::minute_of_day(now);
        let (start, end) = (u64::from(self.start), u64::from(self.end));
        if start < end {
            (start..end).contains(&minute)
        } else {
            minute >= start || minute < end
        }
    }

    /// Seconds from `now` until this window next opens (0 if it is open).
    pub fn opens_in(&self, now: UnixSeconds) -> u64 {
        if self.contains(now) {
            return 0;
        }
        let second_of_day = now % (MINUTES_PER_DAY * 60);
        let start = u64::from(self.start) * 60;
        if start > second_of_day {
            start - second_of_day
        } else {
            MINUTES_PER_DAY * 60 - second_of_day + start
        }
    }
}

/// Whether a switch may happen at `now`: always when no window is given.
pub fn switch_allowed(windows: &[SwitchWindow], now: UnixSeconds) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(now))
}

/// Seconds until the first of `windows` opens (0 when a switch is allowed now).
pub fn next_switch_in(windows: &[SwitchWindow], now: UnixSeconds) -> u64 {
    windows.iter().map(|w| w.opens_in(now)).min().unwrap_or(0)
}

impl fmt::Display for SwitchWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl FromStr for SwitchWindow {
    type Err = PlanError;

    fn from_str(text: &str) -> Result<SwitchWindow, PlanError> {
        let error = || PlanError::Window(text.chars().take(40).collect());
        let minute = |hhmm: &str| -> Result<u16, PlanError> {
            let (h, m) = hhmm.trim().split_once(':').ok_or_else(error)?;
            let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
            if !two_digits(h) || !two_digits(m) {
                return Err(error());
            }
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| error())?,
                m.parse().map_err(|_| error())?,
            );
            if h > 23 || m > 59 {
                return Err(error());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = text.split_once('-').ok_or_else(error)?;
        let window = SwitchWindow {
            start: minute(start)?,
            end: minute(end)?,
        };
        if window.start == window.end {
            return Err(error());
        }
        Ok(window)
    }
}

impl Serialize for SwitchWindow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SwitchWindow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SwitchWindow, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A duration as operators write it (`30s`, `10m`), kept in whole seconds (rounded up: the
/// rollout's clock ticks in seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub u64);

impl Secs {
    pub fn parse(field: &'static str, text: &str) -> Result<Secs, PlanError> {
        let duration = protocol::parse_duration(text).map_err(|_| PlanError::Duration {
            field,
            value: text.chars().take(40).collect(),
        })?;
        Ok(Secs::from(duration))
    }
}

impl From<Duration> for Secs {
    fn from(duration: Duration) -> Secs {
        Secs(duration.as_millis().div_ceil(1000) as u64)
    }
}

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&protocol::human_duration(Duration::from_secs(self.0)))
    }
}

impl Serialize for Secs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}s", self.0))
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secs, D::Error> {
        let text = String::deserialize(deserializer)?;
        protocol::parse_duration(&text)
            .map(Secs::from)
            .map_err(|e| serde::de::Error::custom(format!("{e}; use e.g. 30s, 10m, 2h")))
    }
}

/// What happens to a node that is offline when its wave reaches it and stays away past the
/// node deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflinePolicy {
    /// Passed over: not a failure. It gets the release when it comes back if the rollout
    /// succeeded (the fleet target).
    #[default]
    Skip,
    /// Counted as a failed node (towards the failure thresholds).
    Fail,
}

impl FromStr for OfflinePolicy {
    type Err = PlanError;

    fn from_str(text: &str) -> Result<OfflinePolicy, PlanError> {
        match text.trim() {
            "skip" => Ok(OfflinePolicy::Skip),
            "fail" => Ok(OfflinePolicy::Fail),
            other => Err(PlanError::Offline(other.chars().take(20).collect())),
        }
    }
}

impl fmt::Display for OfflinePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OfflinePolicy::Skip => "skip",
            OfflinePolicy::Fail => "fail",
        })
    }
}

/// A share in basis points (1/100 of a percent), so plans compare exactly; written and read
/// as a number of percent (`5`, `12.5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pct(u32);

impl Pct {
    pub fn new(percent: f64) -> Result<Pct, PlanError> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(PlanError::FailurePct(percent.to_string()));
        }
        Ok(Pct((percent * 100.0).round() as u32))
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Pct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same rendering as a percentage wave.
        WaveSize::Percent(self.0).fmt(f)
    }
}

impl Serialize for Pct {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Pct {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Pct, D::Error> {
        Pct::new(f64::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Which nodes a rollout targets: those whose labels hold every `key=value` pair (all nodes
/// when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Selector(pub BTreeMap<String, String>);

impl Selector {
    /// Parses `k=v,k2=v2`; an empty text selects every node.
    pub fn parse(text: &str) -> Result<Selector, PlanError> {
        let mut pairs = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let error = || PlanError::Selector(part.chars().take(60).collect());
            let (key, value) = part.split_once('=').ok_or_else(error)?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() || value.is_empty() {
                return Err(error());
            }
            if let Some(existing) = pairs.insert(key.to_owned(), value.to_owned()) {
                if existing != value {
                    return Err(PlanError::SelectorConflict(key.to_owned()));
                }
            }
        }
        let selector = Selector(pairs);
        selector.check()?;
        Ok(selector)
    }

    pub fn check(&self) -> Result<(), PlanError> {
        if self.0.len() > MAX_SELECTOR_PAIRS {
            return Err(PlanError::SelectorTooLong);
        }
        if let Some((k, v)) = self.0.iter().find(|(k, v)| k.is_empty() || v.is_empty()) {
            return Err(PlanError::Selector(format!("{k}={v}")));
        }
        Ok(())
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    pub fn is_all(&self) -> bool {
        self.0.is_empty()
    }

    /// Why nothing matched, for the refusal: each pair with how many of `fleet`'s nodes it
    /// matches on its own, and for a pair that matches none, the values its key has.
    pub fn explain_empty<'a>(
        &self,
        fleet: impl Iterator<Item = &'a BTreeMap<String, String>> + Clone,
    ) -> String {
        let mut parts = Vec::new();
        for (key, value) in &self.0 {
            let matching = fleet.clone().filter(|l| l.get(key) == Some(value)).count();
            if matching > 0 {
                parts.push(format!(
                    "{key}={value} matches {matching} node{}",
                    plural(matching)
                ));
                continue;
            }
            let values: BTreeSet<&String> = fleet.clone().filter_map(|l| l.get(key)).collect();
            if values.is_empty() {
                parts.push(format!(
                    "{key}={value} matches no node (no node has the label {key})"
                ));
            } else {
                let values: Vec<&str> = values.into_iter().map(String::as_str).collect();
                parts.push(format!(
                    "{key}={value} matches no node ({key} has: {})",
                    values.join(", ")
                ));
            }
        }
        parts.join("; ")
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("all nodes");
        }
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&pairs.join(","))
    }
}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The plan knobs as given: by `rollout start` (the API request), or as a release's defaults
/// (`release.toml` `[rollout]`). Every field is optional; unknown keys are refused. Values are
/// parsed on the way in, so a bad wave or duration is refused naming its key.
///
/// ```toml
/// [rollout]
/// waves = [1, "10%", "50%", "100%"]
/// bake = "10m"
/// max_parallel = 50
/// max_failures = 2
/// max_failure_pct = 5.0
/// windows = ["22:00-06:00"]
/// node_deadline = "15m"
/// offline = "skip"
/// auto_rollback = true
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<WaveSize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<Secs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_pct: Option<Pct>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<SwitchWindow>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_deadline: Option<Secs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflinePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<bool>,
}

impl PlanOptions {
    /// The rules that hold for the options on their own (before merging with defaults).
    pub fn check(&self) -> Result<(), PlanError> {
        if let Some(waves) = &self.waves {
            check_waves(waves)?;
        }
        if self.max_parallel == Some(0) {
            return Err(PlanError::ZeroParallel);
        }
        if let Some(windows) = &self.windows {
            if windows.len() > MAX_WINDOWS {
                return Err(PlanError::TooManyWindows(windows.len()));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == PlanOptions::default()
    }
}

/// A checked plan: the request's options over the release's defaults over the built-in
/// defaults (one wave of 100 %, no bake, no parallelism limit, halt on the first failed
/// node, no windows, 10 minutes per node, offline nodes skipped, automatic rollback on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub waves: Vec<WaveSize>,
    pub bake: Secs,
    /// Most nodes switching at once; `None` for no limit.
    pub max_parallel: Option<u32>,
    /// Halt when more nodes than this have failed. With neither threshold given: 0.
    pub max_failures: Option<u32>,
    /// Halt when more than this share of the rollout's nodes so far have failed.
    pub max_failure_pct: Option<Pct>,
    pub windows: Vec<SwitchWindow>,
    pub node_deadline: Secs,
    pub offline: OfflinePolicy,
    pub auto_rollback: bool,
}

impl Plan {
    pub fn merge(request: &PlanOptions, defaults: Option<&PlanOptions>) -> Result<Plan, PlanError> {
        request.check()?;
        let none = PlanOptions::default();
        let defaults = defaults.unwrap_or(&none);
        defaults.check()?;
        macro_rules! pick {
            ($field:ident) => {
                request.$field.clone().or_else(|| defaults.$field.clone())
            };
        }
        let (max_failures, max_failure_pct) = match (pick!(max_failures), pick!(max_failure_pct)) {
            (None, None) => (Some(0), None),
            given => given,
        };
        Ok(Plan {
            waves: pick!(waves).unwrap_or_else(|| vec![WaveSize::ALL]),
            bake: pick!(bake).unwrap_or(Secs(0)),
            max_parallel: pick!(max_parallel),
            max_failures,
            max_failure_pct,
            windows: pick!(windows).unwrap_or_default(),
            node_deadline: pick!(node_deadline).unwrap_or(Secs::from(DEFAULT_NODE_DEADLINE)),
            offline: pick!(offline).unwrap_or_default(),
            auto_rollback: pick!(auto_rollback).unwrap_or(true),
        })
    }

    /// Whether `failed` of `reached` nodes breaks a failure threshold; the one-line reason if
    /// so.
    pub fn failures_exceeded(&self, failed: usize, reached: usize) -> Option<String> {
        if let Some(max) = self.max_failures {
            if failed > max as usize {
                return Some(format!(
                    "{failed} node{} failed, over the limit of {max}",
                    plural(failed)
                ));
            }
        }
        if let Some(pct) = self.max_failure_pct {
            // Exact: failed/reached > bp/10000.
            if reached > 0 && failed as u64 * 10_000 > u64::from(pct.0) * reached as u64 {
                return Some(format!(
                    "{failed} of {reached} nodes failed ({:.1}%), over the limit of {pct}",
                    failed as f64 * 100.0 / reached as f64
                ));
            }
        }
        None
    }

    /// The failure limit in words, for gate results and status.
    pub fn failure_limit(&self) -> String {
        match (self.max_failures, self.max_failure_pct) {
            (Some(n), Some(p)) => format!("at most {n} failed and at most {p}"),
            (Some(n), None) => format!("at most {n} failed"),
            (None, Some(p)) => format!("at most {p} failed"),
            (None, None) => "no limit".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waves(text: &str) -> Result<Vec<WaveSize>, String> {
        parse_waves(text).map_err(|e| e.to_string())
    }

    #[test]
    fn waves_parse_counts_and_percentages_and_print_back() {
        let parsed = waves("1, 5%,12.5%,100%").expect("valid");
        assert_eq!(
            parsed,
            [
                WaveSize::Count(1),
                WaveSize::Percent(500),
                WaveSize::Percent(1250),
                WaveSize::ALL
            ]
        );
        let printed: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["1", "5%", "12.5%", "100%"]);
        assert_eq!(WaveSize::Percent(5).to_string(), "0.05%");
        assert_eq!(waves("100%").expect("one wave"), [WaveSize::ALL]);
    }

    #[test]
    fn waves_that_do_not_add_up_are_refused_with_the_reason() {
        for (text, expected) in [
            ("", "invalid wave \"\""),
            ("1,abc,100%", "invalid wave \"abc\""),
            ("1,5.555%,100%", "invalid wave \"5.555%\""),
            ("0,100%", "wave \"0\" is empty"),
            ("1,0%,100%", "wave \"0%\" is empty"),
            ("1,150%", "wave \"150%\" is over 100%"),
            ("10%,5%,100%", "waves must increase: 5% comes after 10%"),
            ("5,2,100%", "waves must increase: 2 comes after 5"),
            ("1,50%,50%,100%", "waves must increase: 50% comes after 50%"),
            ("1,50%", "the last wave is 50%, not 100%"),
            ("1,5", "the last wave is 5, not 100%"),
        ] {
            let error = waves(text).expect_err(text);
            assert!(error.starts_with(expected), "{text}: {error}");
        }
        let many = vec!["1%"; MAX_WAVES].join(",") + ",100%";
        assert!(waves(&many).is_err());
    }

    #[test]
    fn waves_resolve_to_cumulative_counts_rounding_percentages_up() {
        let plan = waves("1,30%,100%").expect("valid");
        assert_eq!(resolve_waves(&plan, 10), Ok(vec![1, 3, 10]));
        // 5% of 10 nodes rounds up to 1, which wave 1 already reached: an empty wave.
        let plan = waves("1,5%,25%,100%").expect("valid");
        assert_eq!(resolve_waves(&plan, 10), Ok(vec![1, 1, 3, 10]));
        assert_eq!(resolve_waves(&plan, 1000), Ok(vec![1, 50, 250, 1000]));
    }

    #[test]
    fn a_count_above_the_selection_or_a_shrinking_wave_is_refused() {
        let plan = waves("20,100%").expect("valid");
        assert_eq!(
            resolve_waves(&plan, 10).expect_err("too many").to_string(),
            "wave 1 asks for 20 nodes but the selection has 10"
        );
        let plan = waves("50%,30,100%").expect("valid");
        let error = resolve_waves(&plan, 100).expect_err("shrinks").to_string();
        assert!(
            error.starts_with(
                "wave 2 (30) reaches 30 nodes of 100, fewer than wave 1 (50%, 50 nodes)"
            ),
            "{error}"
        );
        assert!(resolve_waves(&plan, 40).is_ok());
    }

    #[test]
    fn nodes_keep_their_wave_order_whatever_the_inventory_order() {
        let app = AppName::new("web").expect("app");
        let nodes: Vec<NodeId> = (0..10)
            .map(|i| NodeId::new(format!("n{i}")).expect("node"))
            .collect();
        let forward = assign_waves(&app, &nodes, &[1, 3, 10]);
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(assign_waves(&app, &reversed, &[1, 3, 10]), forward);
        assert_eq!(forward.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 7]);
        let all: BTreeSet<&NodeId> = forward.iter().flatten().collect();
        assert_eq!(all.len(), 10, "every node in exactly one wave");
        // The same node comes first in a larger fleet too, unless a new node ranks before it.
        let mut more = nodes.clone();
        more.push(NodeId::new("n10").expect("node"));
        let first = &assign_waves(&app, &more, &[1, 11])[0][0];
        let expected = if wave_rank(&app, &more[10]) < wave_rank(&app, &forward[0][0]) {
            &more[10]
        } else {
            &forward[0][0]
        };
        assert_eq!(first, expected);
        // Another app orders the fleet differently.
        let other = AppName::new("cache").expect("app");
        let ranks = |a: &AppName| nodes.iter().map(|n| wave_rank(a, n)).collect::<Vec<_>>();
        assert_ne!(ranks(&app), ranks(&other));
    }

    #[test]
    fn switch_windows_parse_and_wrap_over_midnight() {
        let day: SwitchWindow = "09:00-17:30".parse().expect("valid");
        let night: SwitchWindow = "22:00-06:00".parse().expect("valid");
        assert_eq!(night.to_string(), "22:00-06:00");
        let at = |h: u64, m: u64| 3 * 86_400 + h * 3600 + m * 60;
        assert!(day.contains(at(9, 0)) && day.contains(at(17, 29)));
        assert!(!day.contains(at(17, 30)) && !day.contains(at(8, 59)));
        assert!(night.contains(at(23, 0)) && night.contains(at(5, 59)));
        assert!(!night.contains(at(6, 0)) && !night.contains(at(12, 0)));
        assert_eq!(day.opens_in(at(8, 0)), 3600);
        assert_eq!(day.opens_in(at(18, 0)), 15 * 3600);
        assert!(switch_allowed(&[], at(3, 0)));
        assert!(!switch_allowed(&[day], at(3, 0)));
        assert_eq!(next_switch_in(&[day, night], at(18, 0)), 4 * 3600);
        for bad in [
            "9:00-17:00",
            "09:00",
            "24:00-01:00",
            "10:60-11:00",
            "10:00-10:00",
            "x",
        ] {
            assert!(bad.parse::<SwitchWindow>().is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors_parse_match_and_explain_an_empty_selection() {
        let selector = Selector::parse("region=eu, ring=canary").expect("valid");
        assert_eq!(selector.to_string(), "region=eu,ring=canary");
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(selector.matches(&labels(&[
            ("region", "eu"),
            ("ring", "canary"),
            ("hw", "x")
        ])));
        assert!(!selector.matches(&labels(&[("region", "eu")])));
        assert!(Selector::parse("").expect("all").is_all());
        for bad in ["region", "=eu", "region=", "a=1,a=2"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        let fleet = [labels(&[("region", "eu")]), labels(&[("region", "us")])];
        let mars = Selector::parse("region=mars,ring=canary").expect("valid");
        assert_eq!(
            mars.explain_empty(fleet.iter()),
            "region=mars matches no node (region has: eu, us); ring=canary matches no node (no node has the label ring)"
        );
        let eu = Selector::parse("region=eu,ring=canary").expect("valid");
        assert!(eu
            .explain_empty(fleet.iter())
            .starts_with("region=eu matches 1 node;"));
    }

    #[test]
    fn the_request_wins_over_release_defaults_which_win_over_built_in_defaults() {
        let plan = Plan::merge(&PlanOptions::default(), None).expect("defaults");
        assert_eq!(plan.waves, [WaveSize::ALL]);
        assert_eq!((plan.bake, plan.max_parallel), (Secs(0), None));
        assert_eq!((plan.max_failures, plan.max_failure_pct), (Some(0), None));
        assert_eq!(plan.node_deadline, Secs(600));
        assert_eq!(plan.offline, OfflinePolicy::Skip);
        assert!(plan.auto_rollback);

        let release: PlanOptions = toml::from_str(
            "waves = [1, \"10%\", \"100%\"]\nbake = \"10m\"\nmax_failure_pct = 5.0\noffline = \"fail\"\nwindows = [\"22:00-06:00\"]\n",
        )
        .expect("release defaults parse");
        let request = PlanOptions {
            bake: Some(Secs(2)),
            auto_rollback: Some(false),
            ..PlanOptions::default()
        };
        let plan = Plan::merge(&request, Some(&release)).expect("valid");
        assert_eq!(plan.waves.len(), 3);
        assert_eq!(plan.bake, Secs(2));
        assert_eq!(
            (plan.max_failures, plan.max_failure_pct),
            (None, Some(Pct(500)))
        );
        assert_eq!(plan.offline, OfflinePolicy::Fail);
        assert_eq!(plan.windows.len(), 1);
        assert!(!plan.auto_rollback);
    }

    #[test]
    fn bad_options_are_refused_naming_the_key() {
        let error = toml::from_str::<PlanOptions>("waves = [\"1\", \"50%\"]\n")
            .map(|o| o.check())
            .expect("parses")
            .expect_err("last is not 100%");
        assert!(error.to_string().contains("not 100%"), "{error}");
        let error = toml::from_str::<PlanOptions>("bake = \"ten minutes\"\n").expect_err("bad");
        assert!(error.to_string().contains("bake"), "{error}");
        let error = toml::from_str::<PlanOptions>("wave = [\"100%\"]\n").expect_err("unknown");
        assert!(
            error.to_string().contains("unknown field `wave`"),
            "{error}"
        );
        let zero = PlanOptions {
            max_parallel: Some(0),
            ..PlanOptions::default()
        };
        assert_eq!(zero.check(), Err(PlanError::ZeroParallel));
        let error = toml::from_str::<PlanOptions>("max_failure_pct = 120\n").expect_err("over 100");
        assert!(error.to_string().contains("max_failure_pct"), "{error}");
        assert_eq!(
            Pct::new(12.5).map(|p| p.to_string()),
            Ok("12.5%".to_owned())
        );
        assert_eq!(Secs::parse("bake", "500ms"), Ok(Secs(1)));
    }

    #[test]
    fn failure_thresholds_count_and_share() {
        let plan = Plan::merge(&PlanOptions::default(), None).expect("defaults");
        assert_eq!(plan.failures_exceeded(0, 10), None);
        assert_eq!(
            plan.failures_exceeded(1, 10).as_deref(),
            Some("1 node failed, over the limit of 0")
        );
        let plan = Plan::merge(
            &PlanOptions {
                max_failure_pct: Some(Pct::new(20.0).expect("valid")),
                ..PlanOptions::default()
            },
            None,
        )
        .expect("valid");
        assert_eq!(plan.failures_exceeded(2, 10), None);
        assert_eq!(
            plan.failures_exceeded(3, 10).as_deref(),
            Some("3 of 10 nodes failed (30.0%), over the limit of 20%")
        );
    }
}
