//! The two-sided Mann–Whitney U test (Wilcoxon rank-sum test), as R's `wilcox.test(x, y)`
//! computes it without `conf.int`.
//!
//! - `U` is the number of pairs `(x, y)` with `x > y`, ties counting one half; it equals
//!   R's `W` statistic (the rank sum of `x` minus `n_x (n_x + 1) / 2`), with midranks for
//!   tied values.
//! - Without ties and with both samples under [`EXACT_BELOW`] values, the p-value is exact:
//!   the null distribution of `U` is counted (every arrangement of the pooled ranks is
//!   equally likely) and `p = min(1, 2 · min(P(U ≤ u), P(U ≥ u)))`.
//! - Otherwise it is the normal approximation with the tie correction of the variance and a
//!   continuity correction of one half towards the mean.
//!
//! Invariants: pure functions, no I/O; a p-value is always in `[0, 1]`; identical samples
//! (every value tied, so the variance is zero) give `p = 1` rather than R's `NaN`; samples
//! containing NaN are refused (`None`), since they have no rank.

use std::cmp::Ordering;

/// The exact distribution is used when both samples have fewer values than this and there
/// are no ties (R's rule).
pub const EXACT_BELOW: usize = 50;

/// How a p-value was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Counted from the exact null distribution of `U` (small samples, no ties).
    Exact,
    /// Normal approximation with tie and continuity corrections.
    Normal,
}

/// The outcome of one test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// Pairs `(x, y)` with `x > y`, ties counting one half (R's `W`).
    pub u: f64,
    /// Two-sided p-value for "the two samples come from the same distribution".
    pub p_value: f64,
    pub method: Method,
}

/// Tests `x` against `y`. `None` when either sample is empty or holds a NaN.
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    let (m, n) = (x.len(), y.len());
    if m == 0 || n == 0 || x.iter().chain(y).any(|v| v.is_nan()) {
        return None;
    }
    let ranked = midranks(x, y);
    let u = ranked.rank_sum_x - (m * (m + 1)) as f64 / 2.0;
    let (p_value, method) = if ranked.tie_term == 0.0 && m < EXACT_BELOW && n < EXACT_BELOW {
        (exact_p_value(u, m, n), Method::Exact)
    } else {
        (normal_p_value(u, m, n, ranked.tie_term), Method::Normal)
    };
    Some(MannWhitney { u, p_value, method })
}

struct Ranked {
    /// Sum of the midranks (1-based) of the values of `x` in the pooled sample.
    rank_sum_x: f64,
    /// `Σ (t³ − t)` over groups of `t` tied values (0 without ties).
    tie_term: f64,
}

fn midranks(x: &[f64], y: &[f64]) -> Ranked {
    let mut pooled: Vec<(f64, bool)> = x
        .iter()
        .map(|&v| (v, true))
        .chain(y.iter().map(|&v| (v, false)))
        .collect();
    // NaN was refused, so this is the usual order; -0.0 and 0.0 tie (as in R).
    pooled.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal));
    let (mut rank_sum_x, mut tie_term) = (0.0, 0.0);
    let mut start = 0;
    while start < pooled.len() {
        let end = start
            + pooled[start..]
                .iter()
                .take_while(|(v, _)| *v == pooled[start].0)
                .count();
        // Ranks start+1 ..= end share their mean.
        let midrank = (start + 1 + end) as f64 / 2.0;
        let in_x = pooled[start..end].iter().filter(|(_, is_x)| *is_x).count();
        rank_sum_x += midrank * in_x as f64;
        let t = (end - start) as f64;
        tie_term += t * t * t - t;
        start = end;
    }
    Ranked {
        rank_sum_x,
        tie_term,
    }
}

/// R's normal approximation: `z = (u − mn/2 − ½·sign) / σ`, with
/// `σ² = mn/12 · ((m + n + 1) − Σ(t³ − t) / ((m + n)(m + n − 1)))`.
fn normal_p_value(u: f64, m: usize, n: usize, tie_term: f64) -> f64 {
    let (mf, nf) = (m as f64, n as f64);
    let total = mf + nf;
    let ties = if total > 1.0 {
        tie_term / (total * (total - 1.0))
    } else {
        0.0
    };
    let variance = mf * nf / 12.0 * ((total + 1.0) - ties);
    if variance <= 0.0 {
        // Every value is the same: no evidence of any difference.
        return 1.0;
    }
    let centred = u - mf * nf / 2.0;
    let z = (centred - 0.5 * centred.signum()) / variance.sqrt();
    (2.0 * normal_cdf(-z.abs())).min(1.0)
}

/// `P(U ≤ u)` and `P(U ≥ u)` from the exact null distribution, two-sided as R does it.
fn exact_p_value(u: f64, m: usize, n: usize) -> f64 {
    let counts = u_distribution(m, n);
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    // Without ties `u` is a whole number.
    let u = u.round() as usize;
    let tail = if 2 * u > m * n {
        counts[u..].iter().map(|&c| c as f64).sum::<f64>()
    } else {
        counts[..=u].iter().map(|&c| c as f64).sum::<f64>()
    };
    (2.0 * tail / total).min(1.0)
}

/// `counts[u]` = number of the `C(m + n, m)` equally likely arrangements of the pooled
/// ranks in which `U = u`. These are the coefficients of the Gaussian binomial coefficient
/// `[m + n choose m]_q = Π_{i=1..m} (1 − q^(n+i)) / (1 − q^i)`, built one factor at a time;
/// after step `i` the polynomial is `[n + i choose i]_q`, so every intermediate coefficient
/// is bounded by `C(m + n, m)` in magnitude (< 2^127 for m, n < 50).
pub(crate) fn u_distribution(m: usize, n: usize) -> Vec<i128> {
    let mut poly = vec![0i128; m * n + 1];
    poly[0] = 1;
    for i in 1..=m {
        // Multiply by (1 − q^(n+i)); descending so each coefficient reads the old value.
        let shift = n + i;
        for k in (shift..poly.len()).rev() {
            poly[k] -= poly[k - shift];
        }
        // Divide by (1 − q^i): b[k] = a[k] + b[k − i] (exact: the quotient is a polynomial).
        for k in i..poly.len() {
            poly[k] += poly[k - i];
        }
    }
    poly
}

/// The standard normal distribution function.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

/// The complementary error function, to about 1e-14 relative: the everywhere-positive
/// series of `erf` below 2.5 (no cancellation) and the continued fraction of `erfc` above
/// (which converges fast there).
fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 2.5 {
        // erf(x) = 2/√π · e^(−x²) · Σ 2ⁿ x^(2n+1) / (1·3·…·(2n+1))
        let x2 = x * x;
        let (mut term, mut sum, mut k) = (x, x, 0.0);
        while term > sum * 1e-17 {
            k += 1.0;
            term *= 2.0 * x2 / (2.0 * k + 1.0);
            sum += term;
        }
        1.0 - 2.0 / std::f64::consts::PI.sqrt() * (-x2).exp() * sum
    } else if x > 27.0 {
        0.0
    } else {
        // erfc(x) = e^(−x²)/√π · 1/(x + ½/(x + 1/(x + (3/2)/(x + …)))), evaluated backwards.
        let mut fraction = x;
        for k in (1..=60).rev() {
            fraction = x + (k as f64 / 2.0) / fraction;
        }
        (-x * x).exp() / (std::f64::consts::PI.sqrt() * fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64, relative: f64) {
        assert!(
            (actual - expected).abs() <= relative * expected.abs(),
            "{actual} vs {expected}"
        );
    }

    /// The reference distribution, by brute force: every way of choosing which of the
    /// `m + n` pooled positions belong to `x`, counting U as pairs x > y (positions are
    /// ranks, so no ties).
    fn enumerated_distribution(m: usize, n: usize) -> Vec<i128> {
        let mut counts = vec![0i128; m * n + 1];
        for mask in 0u32..(1 << (m + n)) {
            if mask.count_ones() as usize != m {
                continue;
            }
            let mut u = 0;
            for i in 0..m + n {
                for j in 0..i {
                    // i is an x above the y at j.
                    if mask & (1 << i) != 0 && mask & (1 << j) == 0 {
                        u += 1;
                    }
                }
            }
            counts[u] += 1;
        }
        counts
    }

    #[test]
    fn the_counted_u_distribution_matches_brute_force_enumeration() {
        for m in 1..=6 {
            for n in 1..=6 {
                assert_eq!(
                    u_distribution(m, n),
                    enumerated_distribution(m, n),
                    "{m}×{n}"
                );
            }
        }
        // Hand-checked: m = 2, n = 2 has C(4, 2) = 6 arrangements, U = 0,1,2,2,3,4.
        assert_eq!(u_distribution(2, 2), [1, 1, 2, 1, 1]);
        // The largest sizes still count exactly: the total is C(98, 49) ≈ 2.5e28.
        let big = u_distribution(49, 49);
        let total: i128 = big.iter().sum();
        assert_eq!(total, 25_477_612_258_980_856_902_730_428_600);
        assert!(big.iter().all(|&c| c > 0));
        assert_eq!(big.first(), big.last());
    }

    #[test]
    fn a_hand_computed_small_case() {
        // x = {3, 4}, y = {1, 2}: every x beats every y, U = 4 = m·n. Exactly one of the 6
        // arrangements is this extreme in each direction: p = 2 · 1/6.
        let test = mann_whitney(&[3.0, 4.0], &[1.0, 2.0]).expect("test");
        assert_eq!(test.u, 4.0);
        assert_eq!(test.method, Method::Exact);
        assert_close(test.p_value, 1.0 / 3.0, 1e-15);
        // x = {1, 3}, y = {2, 4}: U = 1 (3 > 2); P(U ≤ 1) = 2/6, p = 2/3.
        let test = mann_whitney(&[1.0, 3.0], &[2.0, 4.0]).expect("test");
        assert_eq!(test.u, 1.0);
        assert_close(test.p_value, 2.0 / 3.0, 1e-15);
        // The middle of the distribution caps at 1.
        let test = mann_whitney(&[1.0, 4.0], &[2.0, 3.0]).expect("test");
        assert_eq!((test.u, test.p_value), (2.0, 1.0));
    }

    #[test]
    fn exact_p_values_match_r_wilcox_test() {
        // R's `?wilcox.test` example: wilcox.test(x, y) gives W = 35, p-value = 0.2544
        // (0.1272 one-sided); exactly 2 · 382/3003, checked by enumerating all
        // C(15, 5) = 3003 arrangements.
        let x = [0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46];
        let y = [1.15, 0.88, 0.90, 0.74, 1.21];
        let test = mann_whitney(&x, &y).expect("test");
        assert_eq!((test.u, test.method), (35.0, Method::Exact));
        assert_close(test.p_value, 0.254_412_254_412_254_4, 1e-12);
        // Swapping the samples mirrors U and keeps p.
        let swapped = mann_whitney(&y, &x).expect("test");
        assert_eq!(swapped.u, 15.0);
        assert_close(swapped.p_value, test.p_value, 1e-12);
        // Complete separation of 5 and 5: p = 2 / C(10, 5) = 2/252.
        let test =
            mann_whitney(&[6.0, 7.0, 8.0, 9.0, 10.0], &[1.0, 2.0, 3.0, 4.0, 5.0]).expect("test");
        assert_close(test.p_value, 2.0 / 252.0, 1e-14);
    }

    #[test]
    fn ties_use_midranks_and_the_corrected_normal_approximation() {
        // x = {1, 2, 2}, y = {2, 3}: pooled ranks 1, (2,3,4 → 3), 5. Rank sum of x =
        // 1 + 3 + 3 = 7, U = 7 − 6 = 1 (1 vs 2: 0; the 2s vs 2: ½ each; vs 3: 0).
        // Σ(t³ − t) = 24; σ² = 6/12 · (6 − 24/20) = 2.4; z = (1 − 3 + ½)/√2.4;
        // p = 2Φ(z) = 0.3329…, what R's wilcox.test reports (with a warning about ties).
        let test = mann_whitney(&[1.0, 2.0, 2.0], &[2.0, 3.0]).expect("test");
        assert_eq!((test.u, test.method), (1.0, Method::Normal));
        let z: f64 = -1.5 / 2.4f64.sqrt();
        assert_close(test.p_value, 2.0 * normal_cdf(z), 1e-15);
        assert_close(test.p_value, 0.332_9, 1e-3);
        // Sparse counts: errors in 10 of 30 intervals against none in 30 (the case where
        // Kayenta's interval rule is known to pass). U = 10·30 + 20·30/2 = 600 of 900;
        // the only ties are the 50 zeros.
        let canary: Vec<f64> = (0..30)
            .map(|i| if i < 10 { f64::from(i + 1) } else { 0.0 })
            .collect();
        let baseline = vec![0.0; 30];
        let test = mann_whitney(&canary, &baseline).expect("test");
        assert_eq!(test.u, 600.0);
        let variance: f64 = 900.0 / 12.0 * (61.0 - (125_000.0 - 50.0) / (60.0 * 59.0));
        let expected = 2.0 * normal_cdf(-(150.0 - 0.5) / variance.sqrt());
        assert_close(test.p_value, expected, 1e-13);
        assert!(test.p_value < 1e-3, "{}", test.p_value);
    }

    #[test]
    fn large_samples_without_ties_use_the_normal_approximation() {
        // 50 vs 50, x shifted by 10 ranks: no ties, so σ² = 2500/12 · 101.
        let x: Vec<f64> = (0..50).map(|i| f64::from(i) + 10.5).collect();
        let y: Vec<f64> = (0..50).map(f64::from).collect();
        let test = mann_whitney(&x, &y).expect("test");
        assert_eq!(test.method, Method::Normal);
        // Each x = i + 10.5 beats y values 0..=min(49, i + 10): U = Σ min(50, i + 11).
        let u: f64 = (0..50).map(|i: i32| f64::from((i + 11).min(50))).sum();
        assert_eq!(test.u, u);
        let z = (u - 1250.0 - 0.5) / (2500.0 / 12.0 * 101.0f64).sqrt();
        assert_close(test.p_value, 2.0 * normal_cdf(-z), 1e-15);
    }

    #[test]
    fn identical_samples_pass_and_bad_input_is_refused() {
        let test = mann_whitney(&[0.0; 20], &[0.0; 40]).expect("test");
        assert_eq!((test.u, test.p_value), (400.0, 1.0));
        assert_eq!(mann_whitney(&[], &[1.0]), None);
        assert_eq!(mann_whitney(&[1.0], &[]), None);
        assert_eq!(mann_whitney(&[f64::NAN], &[1.0]), None);
        // Infinities rank like any value.
        let test = mann_whitney(&[f64::INFINITY], &[1.0]).expect("test");
        assert_eq!(test.u, 1.0);
    }

    #[test]
    fn the_normal_distribution_function_matches_reference_values() {
        // References: Python's math.erfc (C library), Φ(z) = erfc(−z/√2)/2.
        assert_close(erfc(1.0), 0.157_299_207_050_285_13, 1e-14);
        assert_close(erfc(0.3), 0.671_373_240_540_872_6, 1e-14);
        assert_close(erfc(2.4), 6.885_138_966_450_789e-4, 1e-13);
        assert_close(erfc(2.6), 2.360_344_165_293_490_8e-4, 1e-13);
        assert_close(erfc(3.0), 2.209_049_699_858_544e-5, 1e-13);
        assert_close(erfc(5.0), 1.537_459_794_428_035e-12, 1e-13);
        assert_close(erfc(-1.0), 1.842_700_792_949_715, 1e-15);
        assert_eq!(erfc(0.0), 1.0);
        assert_close(normal_cdf(1.959_963_984_540_054), 0.975, 1e-14);
        assert_close(normal_cdf(-5.0), 2.866_515_718_791_946e-7, 1e-12);
        assert_eq!(normal_cdf(-40.0), 0.0);
        assert_eq!(normal_cdf(40.0), 1.0);
    }
}
