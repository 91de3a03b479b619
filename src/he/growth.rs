//! Bounds on the plaintext values a tensor holds, tracked through every
//! operation so that a plaintext modulus that is too small shows up as a
//! named layer instead of silently wrapped values.
//!
//! Batch encoding: a bound on |integer| in every slot, compared with T/2 (T
//! the product of the plaintext moduli). Fractional encoding: a bound per
//! coefficient position (the maximum over all ciphertexts), since a product
//! convolves digit sequences; wraps at deep fractional positions are harmless,
//! so the report also gives the decode error that wrapping could cause.

use serde::{Deserialize, Serialize};

/// A bound on plaintext magnitudes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Growth {
    /// Batch: |value · scale| ≤ bound in every slot.
    Integer(f64),
    /// Fractional: |coefficient i| ≤ bound[i], for every ciphertext.
    Poly(Vec<f64>),
}

/// What the bound means against the plaintext modulus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthReport {
    /// Largest possible |coefficient| (fractional) or |integer| (batch).
    pub coeff_bound: f64,
    /// p/2 (fractional) or T/2 (batch): what the bound must stay under.
    pub limit: f64,
    /// Upper bound of the decode error wrapped coefficients could cause (0 if none wrap).
    pub wrap_error_bound: f64,
}

impl GrowthReport {
    /// True when no coefficient can wrap.
    pub fn fits(&self) -> bool {
        self.coeff_bound < self.limit
    }
}

fn nonzero(v: &[f64]) -> Vec<(usize, f64)> {
    v.iter()
        .enumerate()
        .filter(|(_, &x)| x != 0.0)
        .map(|(i, &x)| (i, x))
        .collect()
}

/// Bound of |a·b| coefficient-wise modulo x^m + 1 given bounds on |a| and |b|.
pub fn negacyclic_bound(a: &[f64], b: &[f64]) -> Vec<f64> {
    let m = a.len();
    let mut out = vec![0.0; m];
    let (na, nb) = (nonzero(a), nonzero(b));
    for &(i, x) in &na {
        for &(j, y) in &nb {
            out[(i + j) % m] += x * y;
        }
    }
    out
}

impl Growth {
    /// Bound of a sum of two tensors.
    pub fn add(&self, other: &Growth) -> Growth {
        match (self, other) {
            (Growth::Integer(a), Growth::Integer(b)) => Growth::Integer(a + b),
            (Growth::Poly(a), Growth::Poly(b)) => {
                Growth::Poly(a.iter().zip(b).map(|(x, y)| x + y).collect())
            }
            (a, _) => a.clone(),
        }
    }

    /// Bound after multiplying by `k`-times (a sum of k terms of this bound).
    pub fn times(&self, k: f64) -> Growth {
        match self {
            Growth::Integer(a) => Growth::Integer(a * k),
            Growth::Poly(a) => Growth::Poly(a.iter().map(|x| x * k).collect()),
        }
    }

    /// Bound of a product of two tensors' elements.
    pub fn mul(&self, other: &Growth) -> Growth {
        match (self, other) {
            (Growth::Integer(a), Growth::Integer(b)) => Growth::Integer(a * b),
            (Growth::Poly(a), Growth::Poly(b)) => Growth::Poly(negacyclic_bound(a, b)),
            (a, _) => a.clone(),
        }
    }

    /// The report against plaintext modulus product `t` (fractional: `base`).
    pub fn report(&self, t: f64, base: u32) -> GrowthReport {
        let limit = t / 2.0;
        match self {
            Growth::Integer(a) => GrowthReport {
                coeff_bound: *a,
                limit,
                wrap_error_bound: if *a < limit { 0.0 } else { f64::INFINITY },
            },
            Growth::Poly(v) => {
                let m = v.len();
                let b = base as f64;
                let mut err = 0.0;
                for (i, &x) in v.iter().enumerate() {
                    if x >= limit {
                        let w = if i < m / 2 {
                            b.powi(i as i32)
                        } else {
                            b.powi(-((m - i) as i32))
                        };
                        err += x * w;
                    }
                }
                GrowthReport {
                    coeff_bound: v.iter().cloned().fold(0.0, f64::max),
                    limit,
                    wrap_error_bound: err,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negacyclic_wraps_positions() {
        let mut a = vec![0.0; 8];
        let mut b = vec![0.0; 8];
        a[7] = 2.0;
        b[1] = 3.0;
        b[0] = 1.0;
        let c = negacyclic_bound(&a, &b);
        assert_eq!(c[0], 6.0);
        assert_eq!(c[7], 2.0);
    }

    #[test]
    fn report_weights_positions() {
        let mut v = vec![0.0; 16];
        v[15] = 100.0; // fractional digit 1: weight 1/2
        let r = Growth::Poly(v).report(101.0, 2);
        assert!(!r.fits());
        assert_eq!(r.wrap_error_bound, 50.0);
    }
}
