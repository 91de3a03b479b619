//! The ciphertext square, cheaper than fhe.rs's general product.
//!
//! fhe.rs's `Multiplicator` multiplies two ciphertexts: it extends all four
//! input polynomials to a larger RNS basis, forms four products, scales the
//! three results back by t/Q and relinearizes. A square needs half the
//! extensions (the operands are one ciphertext) and three products
//! (c0², 2·c0·c1, c1²), and it need not relinearize: a three-part
//! ciphertext decrypts, adds, and multiplies by plaintexts like a two-part
//! one, so a square followed only by linear layers stays three-part
//! (relinearization is paid only where a product feeds another product, see
//! [`crate::he::HeContext::relinearized`]).
//!
//! [`Squarer::tensor`] and [`Squarer::finish`] are split so that a layer can
//! add several squares in the extended basis and scale the sum back once
//! (a square followed by a sum pooling): BFV's scaling by t/Q is linear up
//! to its rounding, so the sum of tensors scaled once decrypts to the same
//! plaintext as the sum of scaled squares, with less rounding noise.

use std::sync::Arc;

use rayon::prelude::*;

use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rns::ScalingFactor;
use fhe_math::rq::{scaler::Scaler, Context, Poly, Representation};
use fhe_math::zq::primes::generate_prime;
use num_bigint::BigUint;

use super::error::{HeError, Result};

/// The tensor square of a ciphertext in the extended basis (NTT form):
/// (c0², 2·c0·c1, c1²), before scaling by t/Q.
pub struct Tensor {
    parts: [Poly; 3],
}

impl Tensor {
    /// Adds another tensor (same squarer) in place.
    pub fn add_assign(&mut self, other: &Tensor) {
        for (a, b) in self.parts.iter_mut().zip(&other.parts) {
            *a += b;
        }
    }
}

/// Squares ciphertexts of one plaintext modulus at one level.
#[derive(Debug)]
pub struct Squarer {
    par: Arc<BfvParameters>,
    base: Arc<Context>,
    extend: Scaler,
    down: Scaler,
}

impl Squarer {
    /// A squarer for ciphertexts of `par` at `level`. The extended basis is
    /// fhe.rs's default one (the level's moduli and enough 62-bit primes to
    /// hold the product without wrapping).
    pub fn new(par: &Arc<BfvParameters>, level: usize) -> Result<Squarer> {
        let base = par.context_at_level(level)?.clone();
        let modulus_bits: usize = par.moduli_sizes()[..base.moduli().len()].iter().sum();
        let extra = (modulus_bits + 60).div_ceil(62);
        let mut basis = base.moduli().to_vec();
        let mut upper = 1u64 << 62;
        while basis.len() < base.moduli().len() + extra {
            upper = generate_prime(62, 2 * par.degree() as u64, upper)
                .ok_or_else(|| HeError::Backend("no 62-bit prime left for the extended basis".into()))?;
            if !basis.contains(&upper) {
                basis.push(upper);
            }
        }
        let ext_ctx = Arc::new(Context::new(&basis, par.degree())?);
        let extend = Scaler::new(&base, &ext_ctx, ScalingFactor::one())?;
        let down = Scaler::new(&ext_ctx, &base, ScalingFactor::new(&BigUint::from(par.plaintext()), base.modulus()))?;
        Ok(Squarer { par: par.clone(), base, extend, down })
    }

    /// The tensor square of a two-part ciphertext at this squarer's level.
    pub fn tensor(&self, ct: &Ciphertext) -> Result<Tensor> {
        if ct.len() != 2 {
            return Err(HeError::Value(format!("a square takes a two-part (relinearized) ciphertext, got {} parts", ct.len())));
        }
        if ct[0].ctx() != &self.base {
            return Err(HeError::Value("the ciphertext is not at the level this square was prepared for".into()));
        }
        // The three products in parallel (one square per task in the packed
        // layout, whose 5 CRT primes would otherwise take 3 rounds on 2 threads).
        let (c0, c1) = rayon::join(|| ct[0].scale(&self.extend), || ct[1].scale(&self.extend));
        let (c0, c1) = (c0?, c1?);
        let (square0, (cross, square1)) = rayon::join(
            || &c0 * &c0,
            || {
                rayon::join(
                    || {
                        let mut cross = &c0 * &c1;
                        let twice = cross.clone();
                        cross += &twice;
                        cross
                    },
                    || &c1 * &c1,
                )
            },
        );
        Ok(Tensor { parts: [square0, cross, square1] })
    }

    /// Scales a tensor (or a sum of tensors) back by t/Q: a three-part
    /// ciphertext at this squarer's level.
    pub fn finish(&self, t: Tensor) -> Result<Ciphertext> {
        let parts = Vec::from(t.parts)
            .into_par_iter()
            .map(|mut p| {
                p.change_representation(Representation::PowerBasis);
                let mut q = p.scale(&self.down)?;
                q.change_representation(Representation::Ntt);
                Ok(q)
            })
            .collect::<Result<Vec<Poly>>>()?;
        Ok(Ciphertext::new(parts, &self.par)?)
    }

    /// The three-part square of `ct`.
    pub fn square(&self, ct: &Ciphertext) -> Result<Ciphertext> {
        self.finish(self.tensor(ct)?)
    }
}
