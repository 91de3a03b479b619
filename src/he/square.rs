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
/// (c0², c0·c1, c1²), before scaling by t/Q (the middle part's factor 2 is
/// in its scaling, see [`Squarer::finish`]: no doubling per square).
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
    /// t/Q and 2t/Q (the cross term c0·c1 appears twice in the square).
    down: [Scaler; 2],
    /// t/(Q·q_last) and 2t/(Q·q_last) into the next level's basis: the
    /// scaling back and the modulus switch down as one rounding (one inverse
    /// NTT in the extended basis, the forward NTT on one modulus fewer, no
    /// separate switch).
    down_next: Option<[Scaler; 2]>,
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
            upper = generate_prime(62, 2 * par.degree() as u64, upper).ok_or_else(|| {
                HeError::Backend("no 62-bit prime left for the extended basis".into())
            })?;
            if !basis.contains(&upper) {
                basis.push(upper);
            }
        }
        let ext_ctx = Arc::new(Context::new(&basis, par.degree())?);
        let extend = Scaler::new(&base, &ext_ctx, ScalingFactor::one())?;
        let t = BigUint::from(par.plaintext());
        let twice = &t * 2u32;
        let down = [
            Scaler::new(&ext_ctx, &base, ScalingFactor::new(&t, base.modulus()))?,
            Scaler::new(&ext_ctx, &base, ScalingFactor::new(&twice, base.modulus()))?,
        ];
        // Switching down after the scaling rounds c·t/Q and then c'·Q'/Q;
        // one scaling by t·Q'/Q² = t/(Q·q_last) into Q' rounds once.
        let down_next = match par.context_at_level(level + 1) {
            Ok(next) => {
                let last = *base
                    .moduli()
                    .last()
                    .ok_or_else(|| HeError::Backend("a level without moduli".into()))?;
                let denominator = base.modulus() * BigUint::from(last);
                Some([
                    Scaler::new(&ext_ctx, next, ScalingFactor::new(&t, &denominator))?,
                    Scaler::new(&ext_ctx, next, ScalingFactor::new(&twice, &denominator))?,
                ])
            }
            Err(_) => None,
        };
        Ok(Squarer {
            par: par.clone(),
            base,
            extend,
            down,
            down_next,
        })
    }

    /// The tensor square of a two-part ciphertext at this squarer's level.
    pub fn tensor(&self, ct: &Ciphertext) -> Result<Tensor> {
        if ct.len() != 2 {
            return Err(HeError::Value(format!(
                "a square takes a two-part (relinearized) ciphertext, got {} parts",
                ct.len()
            )));
        }
        if ct[0].ctx() != &self.base {
            return Err(HeError::Value(
                "the ciphertext is not at the level this square was prepared for".into(),
            ));
        }
        // The three products in parallel (the packed layout squares one
        // ciphertext per CRT prime: 5 primes would take 3 rounds on 2 threads).
        // The cross term's factor 2 is in `finish`'s scaling (2t/Q).
        let (c0, c1) = rayon::join(|| ct[0].scale(&self.extend), || ct[1].scale(&self.extend));
        let (c0, c1) = (c0?, c1?);
        let (square0, (cross, square1)) =
            rayon::join(|| &c0 * &c0, || rayon::join(|| &c0 * &c1, || &c1 * &c1));
        Ok(Tensor {
            parts: [square0, cross, square1],
        })
    }

    /// Scales a tensor (or a sum of tensors) back by t/Q: a three-part
    /// ciphertext at this squarer's level.
    pub fn finish(&self, t: Tensor) -> Result<Ciphertext> {
        self.finish_with(t, &self.down)
    }

    /// [`Squarer::finish`] switched down to the next level in the same
    /// rounding (the same plaintext as `finish` followed by
    /// `Ciphertext::switch_down`, at a fraction of the switch's cost).
    pub fn finish_switched(&self, t: Tensor) -> Result<Ciphertext> {
        let down = self.down_next.as_ref().ok_or_else(|| {
            HeError::Value("no level below this square's to switch down to".into())
        })?;
        self.finish_with(t, down)
    }

    fn finish_with(&self, t: Tensor, down: &[Scaler; 2]) -> Result<Ciphertext> {
        let parts = Vec::from(t.parts)
            .into_par_iter()
            .enumerate()
            .map(|(i, mut p)| {
                p.change_representation(Representation::PowerBasis);
                let mut q = p.scale(&down[usize::from(i == 1)])?;
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
