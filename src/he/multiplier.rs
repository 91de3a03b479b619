//! Plaintext multipliers: a number or a polynomial encoded for one ciphertext
//! level, centred (negative values as Q − |w|), and the product of one
//! ciphertext by one. fhe.rs's own plaintext products lift plaintexts
//! uncentred, which costs ~log2(t) noise bits per product.

use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rq::{traits::TryConvertFrom, Context, Poly, Representation};
use ndarray::Array2;

use super::error::{HeError, Result};

/// A multiplier ready for one ciphertext context (level).
#[derive(Debug, Clone)]
pub enum Multiplier {
    /// An integer, as residues modulo each ciphertext prime (Q − |w| for negative w).
    Scalar(Vec<u64>),
    /// A polynomial with centred coefficients, in NTT form, one row per prime.
    Poly(Array2<u64>),
}

impl Multiplier {
    /// An integer multiplier for the context `ctx`.
    pub fn scalar(w: i64, ctx: &Arc<Context>) -> Multiplier {
        Multiplier::Scalar(
            ctx.moduli()
                .iter()
                .map(|&q| (w as i128).rem_euclid(q as i128) as u64)
                .collect(),
        )
    }

    /// A polynomial multiplier (centred coefficients, length ≤ degree) for `ctx`.
    pub fn poly(coeffs: &[i64], ctx: &Arc<Context>) -> Result<Multiplier> {
        let mut p = Poly::try_convert_from(coeffs, ctx, true, Representation::PowerBasis)?;
        p.change_representation(Representation::Ntt);
        Ok(Multiplier::Poly(p.coefficients().to_owned()))
    }

    /// True for the integer 0 (a term that can be skipped).
    pub fn is_zero(&self) -> bool {
        matches!(self, Multiplier::Scalar(r) if r.iter().all(|&x| x == 0))
    }

    /// Whether the multiplier was made for `n_moduli` primes of a ring of `degree`.
    pub fn fits(&self, n_moduli: usize, degree: usize) -> bool {
        match self {
            Multiplier::Scalar(r) => r.len() == n_moduli,
            Multiplier::Poly(a) => a.shape() == [n_moduli, degree],
        }
    }

    /// `ct · self`, exactly reduced (fhe-math's vectorized Shoup product for
    /// integers, a pointwise NTT product for polynomials).
    pub fn apply(&self, ct: &Ciphertext, par: &Arc<BfvParameters>) -> Result<Ciphertext> {
        let ctx = ct[0].ctx().clone();
        let moduli = ctx.moduli_operators();
        let degree = ct[0].coefficients().shape()[1];
        if !self.fits(moduli.len(), degree) {
            return Err(HeError::Value(
                "a multiplier was prepared for another ciphertext level".into(),
            ));
        }
        let mut parts = Vec::with_capacity(ct.len());
        for part in ct.iter() {
            let mut out = part.coefficients().to_owned();
            for (j, mut row) in out.outer_iter_mut().enumerate() {
                let row = row
                    .as_slice_mut()
                    .ok_or_else(|| HeError::Backend("non-contiguous output".into()))?;
                match self {
                    Multiplier::Scalar(r) => moduli[j].scalar_mul_vec(row, r[j]),
                    Multiplier::Poly(a) => {
                        let w = a.row(j);
                        let w = w
                            .as_slice()
                            .ok_or_else(|| HeError::Backend("non-contiguous multiplier".into()))?;
                        moduli[j].mul_vec(row, w);
                    }
                }
            }
            parts.push(Poly::try_convert_from(
                out,
                &ctx,
                true,
                Representation::Ntt,
            )?);
        }
        Ok(Ciphertext::new(parts, par)?)
    }
}
