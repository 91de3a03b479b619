//! The one arithmetic kernel the layers share: a weighted sum of ciphertexts
//! by plaintext multipliers with lazy modular reduction, computed on the raw
//! NTT coefficients (fhe.rs's own `dot_product_scalar` takes fhe plaintexts,
//! whose uncentred lift costs ~log2(t) noise bits per product).

use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rq::{traits::TryConvertFrom, Context, Poly, Representation};
use ndarray::Array2;

use super::error::{HeError, Result};

/// A multiplier ready for one ciphertext context (level).
#[derive(Debug, Clone)]
pub enum Prepared {
    /// An integer, as residues modulo each ciphertext prime (Q − |w| for negative w).
    Scalar(Vec<u64>),
    /// A polynomial with centred coefficients, in NTT form, one row per prime.
    Poly(Array2<u64>),
}

impl Prepared {
    /// An integer multiplier for the context `ctx`.
    pub fn scalar(w: i64, ctx: &Arc<Context>) -> Prepared {
        Prepared::Scalar(ctx.moduli().iter().map(|&q| (w as i128).rem_euclid(q as i128) as u64).collect())
    }

    /// A polynomial multiplier (centred coefficients, length ≤ degree) for `ctx`.
    pub fn poly(coeffs: &[i64], ctx: &Arc<Context>) -> Result<Prepared> {
        let mut p = Poly::try_convert_from(coeffs, ctx, true, Representation::PowerBasis)?;
        p.change_representation(Representation::Ntt);
        Ok(Prepared::Poly(p.coefficients().to_owned()))
    }

    /// True for the integer 0 (a term that can be skipped).
    pub fn is_zero(&self) -> bool {
        matches!(self, Prepared::Scalar(r) if r.iter().all(|&x| x == 0))
    }
}

/// Σ_k cts[k] · ws[k], reduced lazily. All ciphertexts must share parameters,
/// level and size. Terms whose multiplier is the integer 0 are skipped unless
/// all are (the result is then a valid encryption of 0).
pub fn weighted_sum(cts: &[&Ciphertext], ws: &[&Prepared], par: &Arc<BfvParameters>) -> Result<Ciphertext> {
    if cts.is_empty() || cts.len() != ws.len() {
        return Err(HeError::Value(format!(
            "weighted sum needs as many ciphertexts as weights and at least one (got {} and {})",
            cts.len(),
            ws.len()
        )));
    }
    let first = cts[0];
    let ctx = first[0].ctx().clone();
    let nparts = first.len();
    for ct in cts {
        if ct.len() != nparts || ct[0].ctx() != &ctx {
            return Err(HeError::Value("ciphertexts of a weighted sum must share size and level".into()));
        }
    }
    let moduli = ctx.moduli_operators();
    let nmod = moduli.len();
    let degree = first[0].coefficients().shape()[1];
    for w in ws {
        let ok = match w {
            Prepared::Scalar(r) => r.len() == nmod,
            Prepared::Poly(a) => a.shape() == [nmod, degree],
        };
        if !ok {
            return Err(HeError::Value("a multiplier was prepared for another ciphertext level".into()));
        }
    }
    let mut terms: Vec<usize> = (0..cts.len()).filter(|&k| !ws[k].is_zero()).collect();
    if terms.is_empty() {
        terms.push(0);
    }
    // How many products of two residues fit in a u128 before reducing.
    let limits: Vec<u64> = ctx
        .moduli()
        .iter()
        .map(|&q| {
            let b = 64 - q.leading_zeros();
            let room = 128u32.saturating_sub(2 * b).min(62);
            (1u64 << room).max(2) - 1
        })
        .collect();

    let mut parts = Vec::with_capacity(nparts);
    let mut acc = vec![0u128; degree];
    for part in 0..nparts {
        let mut out = Array2::<u64>::zeros((nmod, degree));
        for j in 0..nmod {
            acc.iter_mut().for_each(|a| *a = 0);
            let mut count = 0u64;
            let qj = &moduli[j];
            for &k in &terms {
                let x = cts[k][part].coefficients();
                let xr = x.row(j);
                let xs = xr.as_slice().ok_or_else(|| HeError::Backend("non-contiguous polynomial".into()))?;
                match ws[k] {
                    Prepared::Scalar(r) => {
                        let w = r[j] as u128;
                        for (a, &xi) in acc.iter_mut().zip(xs) {
                            *a += xi as u128 * w;
                        }
                    }
                    Prepared::Poly(arr) => {
                        let wr = arr.row(j);
                        let ws_ = wr.as_slice().ok_or_else(|| HeError::Backend("non-contiguous multiplier".into()))?;
                        for ((a, &xi), &wi) in acc.iter_mut().zip(xs).zip(ws_) {
                            *a += xi as u128 * wi as u128;
                        }
                    }
                }
                count += 1;
                if count == limits[j] {
                    for a in acc.iter_mut() {
                        *a = qj.reduce_u128(*a) as u128;
                    }
                    count = 1;
                }
            }
            let mut row = out.row_mut(j);
            for (o, &a) in row.iter_mut().zip(&acc) {
                *o = qj.reduce_u128(a);
            }
        }
        parts.push(Poly::try_convert_from(out, &ctx, true, Representation::Ntt)?);
    }
    Ok(Ciphertext::new(parts, par)?)
}
