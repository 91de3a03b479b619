//! Slot placement and rotation schedule of a packed linear map between two
//! slot layouts (one SIMD row of n slots, cyclic): the part of the packed
//! layout that is pure integer bookkeeping, no encryption.
//!
//! A map sends input feature f (at slot `pos_in[f]`) to output feature f'
//! (at slot `pos_out[f']`) with weight w. Written by diagonals,
//! `y = Σ_k D_k ⊙ rot(x, k)` with `D_k[pos_out[f']] = w` for
//! `k = pos_in[f] − pos_out[f'] (mod n)`. Each diagonal costs one
//! ciphertext × plaintext product, so outputs are placed where their
//! receptive fields share diagonals: output (o, i, j) sits at its receptive
//! field's first input slot plus a per-channel offset, chosen greedily to
//! add the fewest new diagonals. Rotations follow baby-step/giant-step:
//! `k = g + b` with b in a window `[b_lo, b_hi]` containing 0 (baby steps:
//! successive rotations of the input, two chains by 2 and one by −1,
//! multiplied by masks) and the
//! distinct giants g applied by Horner's rule after the products (their key
//! switching noise is then never multiplied by a mask). Horner's gaps use
//! keys for the most frequent gaps and power-of-two steps for the rest.

use std::collections::{BTreeMap, BTreeSet};

use crate::he::{HeError, Result};

/// How to evaluate one map: where its outputs go and the rotations it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPlan {
    /// Slot of each output feature.
    pub pos_out: Vec<usize>,
    /// Diagonal terms: per giant (descending), per baby b (as i64), the
    /// diagonal k = g + b (mod n) — the masks are built from these.
    pub giants: Vec<(usize, Vec<(i64, usize)>)>,
    /// Lowest and highest baby step (b_lo ≤ 0 ≤ b_hi).
    pub babies: (i64, i64),
    /// Horner's rotation sequence: per giant after the first, the steps
    /// taking the accumulator from the previous giant to this one, then
    /// the final steps to rotation 0 (last entry).
    pub horner: Vec<Vec<usize>>,
    /// Number of non-zero diagonals (ciphertext × plaintext products).
    pub diagonals: usize,
    /// Horner's chain cut in two, run in parallel: `(s, d)`: giants
    /// `0..s` and `s..` each by Horner's rule, the first half's
    /// accumulator then rotated by `d` (its offset from the last giant)
    /// and added to the second's, instead of the step from giant `s − 1`
    /// to giant `s`. The two halves run on two threads; the count of
    /// rotations stays (one key more).
    pub split: Option<(usize, usize)>,
    /// Both SIMD rows at work (one row swap more), when planned.
    pub rows: Option<RowSplit>,
}

impl MapPlan {
    /// Rotations per evaluation.
    pub fn rotations(&self) -> usize {
        (self.babies.1 - self.babies.0) as usize + self.giant_steps().len()
    }

    /// The giant-step rotations of one evaluation (with repeats): Horner's
    /// steps, the split's step in place of the gap it replaces.
    pub fn giant_steps(&self) -> Vec<usize> {
        let cut = self.split.map(|(s, _)| s - 1);
        let mut out: Vec<usize> = self
            .horner
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != cut)
            .flat_map(|(_, h)| h.iter().copied())
            .collect();
        out.extend(self.split.map(|(_, d)| d));
        out.extend(self.rows.as_ref().map(|r| r.swap));
        out
    }

    /// What the planner minimizes: rotations (a baby step, with its
    /// special-prime key, costs about two), plus products at about a
    /// sixteenth of a rotation each.
    pub fn cost(&self) -> usize {
        self.rotations() + (self.babies.1 - self.babies.0) as usize + self.diagonals / 16
    }

    /// Where a term of diagonal `k` is computed, as `(row, planned
    /// diagonal)`: row 0 at k when k is planned, else row 1 at k − shift
    /// (the plan covers its diagonals so, see `cover_by_two_rows`).
    pub fn term_row(&self, n: usize) -> impl Fn(usize) -> (usize, usize) + '_ {
        let planned: BTreeSet<usize> = self
            .giants
            .iter()
            .flat_map(|(_, t)| t.iter().map(|&(_, k)| k))
            .collect();
        move |k| match &self.rows {
            Some(r) if !planned.contains(&k) => (1, (k + n - r.shift) % n),
            _ => (0, k),
        }
    }

    /// The baby steps' keys: the babies are two chains run in parallel,
    /// odd b (1, then +2) and even b (+2), and b < 0 by −1 (n − 1).
    pub fn baby_steps(&self, n: usize) -> Vec<usize> {
        let (lo, hi) = self.babies;
        let mut s: Vec<usize> = [1, 2].into_iter().filter(|&b| hi >= b as i64).collect();
        if lo < 0 {
            s.push(n - 1);
        }
        s
    }

    /// Rotation key steps it needs.
    pub fn steps(&self, n: usize) -> Vec<usize> {
        let mut s: Vec<usize> = self.giant_steps();
        s.extend(self.baby_steps(n));
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// Both SIMD rows at work in one map: the input's row 1 holds row 0
/// rotated by `shift` (`R1[s] = R0[s + shift]`, arranged by the client's
/// packing), so the mask of diagonal k reads, in row 1, the diagonal
/// `k + shift`: one product and one rotation serve two diagonals. Each
/// term of the map is computed in row 0 when its diagonal is in the plan's
/// set, else in row 1 (its diagonal minus the shift is); one row swap at
/// the end adds row 1's partial sums to row 0's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSplit {
    /// Row 1 of the input is row 0 rotated by `shift`.
    pub shift: usize,
    /// The row swap's key step (n: see `crate::he::galois`).
    pub swap: usize,
}

/// Places the outputs of a map (rows: per output feature, its (input
/// feature, weight) terms) of logical shape `out_shape` [C, H, W], inputs at
/// `pos_in`, in a row of `n` slots; plans its rotations. With `two_rows`
/// the input's row 1 may hold it rotated (see [`RowSplit`]): the plan uses
/// it when that takes fewer rotations and products.
pub fn plan_map(
    rows: &[Vec<(usize, i64)>],
    out_shape: [usize; 3],
    pos_in: &[usize],
    n: usize,
    two_rows: bool,
) -> Result<MapPlan> {
    let (pos_out, ks) = place_outputs(rows, out_shape, pos_in, n)?;
    let mut best = schedule(ks.clone(), pos_out.clone(), n);
    if two_rows && n >= 8 {
        // Shifts at eighths of the row: channel blocks are powers of two, so
        // some shift maps one block's diagonals onto another's.
        for shift in (1..8).map(|i| i * n / 8) {
            let mut plan = schedule(cover_by_two_rows(&ks, shift, n), pos_out.clone(), n);
            plan.rows = Some(RowSplit { shift, swap: n });
            if plan.cost() < best.cost() {
                best = plan;
            }
        }
    }
    Ok(best)
}

/// The fewest diagonals x such that every needed diagonal k is x (row 0)
/// or x + shift (row 1); of two choices, the one nearer 0 (signed), which
/// keeps the set narrow for the baby/giant schedule.
fn cover_by_two_rows(ks: &[usize], shift: usize, n: usize) -> Vec<usize> {
    let mut needed = vec![false; n];
    ks.iter().for_each(|&k| needed[k] = true);
    let mut covered = vec![false; n];
    let mut out = Vec::new();
    let dist = |k: usize| k.min(n - k);
    for &k in ks {
        if covered[k] {
            continue;
        }
        let below = (k + n - shift) % n;
        let up = (k + shift) % n;
        // x = k also covers k + shift when needed; x = k − shift covers k only.
        let x = if needed[up] && !covered[up] || dist(k) <= dist(below) {
            k
        } else {
            below
        };
        covered[x] |= needed[x];
        let twin = (x + shift) % n;
        covered[twin] |= needed[twin];
        out.push(x);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Greedy placement: each output channel at its anchors (its receptive
/// fields' first input slots) plus the offset that adds the fewest new
/// diagonals. Returns the output slots and the diagonals.
fn place_outputs(
    rows: &[Vec<(usize, i64)>],
    out_shape: [usize; 3],
    pos_in: &[usize],
    n: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let [co, h, w] = out_shape;
    let hw = h * w;
    if co * hw != rows.len() || rows.len() > n {
        return Err(HeError::Parameter(format!(
            "packed map: {} outputs do not fit {n} slots (or the shape {out_shape:?} is wrong)",
            rows.len()
        )));
    }
    // Anchor of spatial position s: its receptive field's first input slot (over all channels).
    let anchor: Vec<usize> = (0..hw)
        .map(|s| {
            (0..co)
                .flat_map(|o| rows[o * hw + s].iter().map(|&(f, _)| pos_in[f]))
                .min()
                .unwrap_or(s)
        })
        .collect();
    let mut occupied = vec![false; n];
    let mut diag = vec![false; n];
    let mut pos_out = vec![0usize; rows.len()];
    let mut seen = vec![false; n];
    for o in 0..co {
        // The channel's diagonals relative to its anchors.
        let mut rel = Vec::new();
        for s in 0..hw {
            for &(f, _) in &rows[o * hw + s] {
                let r = (pos_in[f] + n - anchor[s]) % n;
                if !seen[r] {
                    seen[r] = true;
                    rel.push(r);
                }
            }
        }
        for &r in &rel {
            seen[r] = false;
        }
        let mut best: Option<(usize, usize)> = None;
        for off in 0..n {
            if anchor.iter().any(|&a| occupied[(a + off) % n]) {
                continue;
            }
            let cost = rel.iter().filter(|&&r| !diag[(r + n - off) % n]).count();
            if best.map_or(true, |(c, _)| cost < c) {
                best = Some((cost, off));
                if cost == 0 {
                    break;
                }
            }
        }
        let (_, off) = best.ok_or_else(|| {
            HeError::Parameter(format!(
                "packed map: no room for output channel {o} in {n} slots"
            ))
        })?;
        for s in 0..hw {
            let p = (anchor[s] + off) % n;
            occupied[p] = true;
            pos_out[o * hw + s] = p;
        }
        for &r in &rel {
            diag[(r + n - off) % n] = true;
        }
    }
    Ok((pos_out, (0..n).filter(|&k| diag[k]).collect()))
}

/// Chooses the baby window and Horner's keys for the diagonal set `ks`.
fn schedule(ks: Vec<usize>, pos_out: Vec<usize>, n: usize) -> MapPlan {
    // Diagonals read as signed (−n/2, n/2] or as [0, n): the periods of the
    // two readings differ when d1 does not divide n.
    let mut best: Option<(usize, MapPlan)> = None;
    for signed_mode in [false, true] {
        let signed = |k: usize| {
            if signed_mode && k > n / 2 {
                k as i64 - n as i64
            } else {
                k as i64
            }
        };
        for d1 in 1..=64usize.min(n) {
            for lo in -(d1 as i64 - 1)..=0 {
                // b(k) ∈ [lo, lo + d1): k − b ≡ 0 (mod d1) in the signed sense.
                let mut giants: BTreeMap<usize, Vec<(i64, usize)>> = BTreeMap::new();
                let (mut b_lo, mut b_hi) = (0i64, 0i64);
                for &k in &ks {
                    let sk = signed(k);
                    let b = (sk - lo).rem_euclid(d1 as i64) + lo;
                    b_lo = b_lo.min(b);
                    b_hi = b_hi.max(b);
                    let g = (sk - b).rem_euclid(n as i64) as usize;
                    giants.entry(g).or_default().push((b, k));
                }
                let gs: Vec<usize> = giants.keys().rev().copied().collect();
                let mut gaps: Vec<usize> = gs.windows(2).map(|p| p[0] - p[1]).collect();
                gaps.push(*gs.last().unwrap_or(&0));
                // Baby steps use special-prime keys (about twice a giant step's cost).
                let cost_upper =
                    2 * (b_hi - b_lo) as usize + gaps.iter().filter(|&&g| g > 0).count();
                if best.as_ref().is_some_and(|(c, _)| cost_upper >= *c) {
                    continue;
                }
                let horner = horner_steps(&gaps);
                let split = split_point(&gs, &horner);
                let plan = MapPlan {
                    pos_out: pos_out.clone(),
                    giants: gs.iter().map(|g| (*g, giants[g].clone())).collect(),
                    babies: (b_lo, b_hi),
                    horner,
                    diagonals: ks.len(),
                    split,
                    rows: None,
                };
                let cost = plan.rotations() + (b_hi - b_lo) as usize;
                if best.as_ref().map_or(true, |(c, _)| cost < *c) {
                    best = Some((cost, plan));
                }
            }
        }
    }
    best.map(|(_, p)| p).unwrap_or(MapPlan {
        pos_out,
        giants: vec![],
        babies: (0, 0),
        horner: vec![],
        diagonals: 0,
        split: None,
        rows: None,
    })
}

/// Where to cut Horner's chain over the giants `gs` (descending) so that
/// the two halves take about as many rotations; None when too short to pay.
fn split_point(gs: &[usize], horner: &[Vec<usize>]) -> Option<(usize, usize)> {
    let m = gs.len();
    if m < 4 {
        return None;
    }
    // Rotations of giants 0..s (gaps 0..s-1) and of s..m (gaps s..m-1).
    let cost = |r: std::ops::Range<usize>| horner[r].iter().map(Vec::len).sum::<usize>();
    let s = (2..m - 1).min_by_key(|&s| cost(0..s - 1).max(cost(s..m - 1)))?;
    Some((s, gs[s - 1] - gs[m - 1]))
}

/// Key steps for each gap: the three most frequent gaps get keys of their
/// own, the rest are sums of power-of-two steps.
fn horner_steps(gaps: &[usize]) -> Vec<Vec<usize>> {
    let mut freq: BTreeMap<usize, usize> = BTreeMap::new();
    for &g in gaps.iter().filter(|&&g| g > 0) {
        *freq.entry(g).or_default() += 1;
    }
    let mut by: Vec<(usize, usize)> = freq.into_iter().collect();
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let direct: Vec<usize> = by
        .iter()
        .take(3)
        .filter(|(g, c)| *c > 1 || g.count_ones() > 1)
        .map(|(g, _)| *g)
        .collect();
    gaps.iter()
        .map(|&g| {
            if g == 0 {
                vec![]
            } else if direct.contains(&g) {
                vec![g]
            } else {
                (0..usize::BITS)
                    .filter(|b| g >> b & 1 == 1)
                    .map(|b| 1usize << b)
                    .collect()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `plan` evaluated in the clear: row 0 holds `x`, row 1 (when the plan
    /// uses it) `x` rotated by the shift; babies, masks by diagonal, Horner
    /// over the giants (split as planned), the rows summed. Row 0 out.
    fn evaluate(
        plan: &MapPlan,
        rows: &[Vec<(usize, i64)>],
        pos_in: &[usize],
        x: &[i64],
    ) -> Vec<i64> {
        let n = x.len();
        let rot = |v: &[i64], k: usize| -> Vec<i64> { (0..n).map(|p| v[(p + k) % n]).collect() };
        let shift = plan.rows.as_ref().map_or(0, |r| r.shift);
        let input = [x.to_vec(), rot(x, shift)];
        let term_row = plan.term_row(n);
        // D_k[pos_out[f']] = w, in the row computing that term.
        let weight = |row: usize, q: usize, k: usize| -> i64 {
            let Some(fo) = plan.pos_out.iter().position(|&s| s == q) else {
                return 0;
            };
            rows[fo]
                .iter()
                .filter(|&&(f, _)| term_row((pos_in[f] + n - q) % n) == (row, k))
                .map(|&(_, w)| w)
                .sum()
        };
        let (cut, d) = plan.split.unwrap_or((usize::MAX, 0));
        let mut out = [vec![0i64; n], vec![0i64; n]];
        for (row, out) in out.iter_mut().enumerate() {
            let mut first: Option<Vec<i64>> = None;
            let mut acc: Option<Vec<i64>> = None;
            for (gi, (g, terms)) in plan.giants.iter().enumerate() {
                if gi == cut {
                    first = acc.take();
                } else if let Some(mut a) = acc.take() {
                    for &s in &plan.horner[gi - 1] {
                        a = rot(&a, s);
                    }
                    acc = Some(a);
                }
                let mut inner = vec![0i64; n];
                for &(b, k) in terms {
                    let xb = rot(&input[row], b.rem_euclid(n as i64) as usize);
                    for p in 0..n {
                        // The mask of (g, k) is D_k rotated by −g.
                        inner[p] += weight(row, (p + n - g) % n, k) * xb[p];
                    }
                }
                acc = Some(match acc {
                    Some(a) => a.iter().zip(&inner).map(|(u, v)| u + v).collect(),
                    None => inner,
                });
            }
            let mut y = acc.unwrap();
            if let Some(f) = first {
                y = y.iter().zip(rot(&f, d)).map(|(u, v)| u + v).collect();
            }
            for &s in plan.horner.last().unwrap() {
                y = rot(&y, s);
            }
            *out = y;
        }
        out[0].iter().zip(&out[1]).map(|(u, v)| u + v).collect()
    }

    /// A 2-channel 6×6 input at two blocks of 64 (of 128 slots), a 3×3
    /// stride-1 conv to `co` channels.
    fn conv_map(co: usize) -> (Vec<usize>, Vec<Vec<(usize, i64)>>) {
        let pos_in: Vec<usize> = (0..2)
            .flat_map(|c| (0..6).flat_map(move |i| (0..6).map(move |j| c * 64 + i * 8 + j)))
            .collect();
        let mut rows = Vec::new();
        for o in 0..co {
            for i in 0..4 {
                for j in 0..4 {
                    let mut r = Vec::new();
                    for c in 0..2 {
                        for a in 0..3 {
                            for b in 0..3 {
                                r.push((
                                    c * 36 + (i + a) * 6 + j + b,
                                    (o * 7 + c * 3 + a * 2 + b) as i64 - 9,
                                ));
                            }
                        }
                    }
                    rows.push(r);
                }
            }
        }
        (pos_in, rows)
    }

    fn check(plan: &MapPlan, rows: &[Vec<(usize, i64)>], pos_in: &[usize], n: usize) {
        let x: Vec<i64> = (0..n as i64).map(|v| (v * 37) % 11 - 5).collect();
        let y = evaluate(plan, rows, pos_in, &x);
        for (fo, r) in rows.iter().enumerate() {
            let want: i64 = r.iter().map(|&(f, w)| w * x[pos_in[f]]).sum();
            assert_eq!(y[plan.pos_out[fo]], want, "output {fo}");
        }
    }

    #[test]
    fn evaluating_the_plan_in_the_clear_gives_the_map() {
        let (pos_in, rows) = conv_map(3);
        let plan = plan_map(&rows, [3, 4, 4], &pos_in, 128, false).unwrap();
        assert!(plan.split.is_some() && plan.rows.is_none());
        check(&plan, &rows, &pos_in, 128);
        assert!(plan.diagonals <= 2 * 9 * 3, "{}", plan.diagonals);
    }

    #[test]
    fn two_rows_halve_the_products_and_stay_exact() {
        // Two input channels 64 slots apart: row 1, shifted by 64, reads the
        // second channel where row 0 reads the first.
        let (pos_in, rows) = conv_map(3);
        let one = plan_map(&rows, [3, 4, 4], &pos_in, 128, false).unwrap();
        let two = plan_map(&rows, [3, 4, 4], &pos_in, 128, true).unwrap();
        assert!(two.rows.is_some(), "two rows pay here");
        assert!(two.giant_steps().contains(&128), "the row swap is a step");
        assert!(two.cost() < one.cost(), "{} vs {}", two.cost(), one.cost());
        assert!(
            two.diagonals * 3 <= one.diagonals * 2,
            "{} vs {}",
            two.diagonals,
            one.diagonals
        );
        check(&one, &rows, &pos_in, 128);
        check(&two, &rows, &pos_in, 128);
    }
}
