//! The one arithmetic kernel the layers share: a weighted sum of ciphertexts
//! by plaintext [`Multiplier`]s with lazy modular reduction, computed on the
//! raw NTT coefficients (fhe.rs's own `dot_product_scalar` takes fhe
//! plaintexts, whose uncentred lift costs ~log2(t) noise bits per product).

use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rq::{traits::TryConvertFrom, Poly, Representation};
use ndarray::Array2;

use crate::he::{HeError, Multiplier, Result};

/// Σ_k cts[k] · ws[k], reduced lazily. All ciphertexts must share parameters,
/// level and size. Terms whose multiplier is the integer 0 are skipped unless
/// all are (the result is then a valid encryption of 0).
pub fn weighted_sum(
    cts: &[&Ciphertext],
    ws: &[&Multiplier],
    par: &Arc<BfvParameters>,
) -> Result<Ciphertext> {
    let mut out = weighted_sums(cts, &[ws], par)?;
    out.pop()
        .ok_or_else(|| HeError::Backend("weighted sum without output".into()))
}

/// Several weighted sums of the same ciphertexts, Σ_k cts[k] · ws[g][k] for
/// every g, in one pass: each input coefficient is read once for all the
/// sums (the output channels of a convolution at one position share their
/// inputs), so the kernel runs at the speed of its multiply-adds rather
/// than of memory. Terms whose multipliers are all the integer 0 are skipped.
pub fn weighted_sums(
    cts: &[&Ciphertext],
    ws: &[&[&Multiplier]],
    par: &Arc<BfvParameters>,
) -> Result<Vec<Ciphertext>> {
    if cts.is_empty() || ws.is_empty() || ws.iter().any(|w| w.len() != cts.len()) {
        return Err(HeError::Value(format!(
            "weighted sum needs as many ciphertexts as weights and at least one (got {} and {:?})",
            cts.len(),
            ws.iter().map(|w| w.len()).collect::<Vec<_>>()
        )));
    }
    let first = cts[0];
    let ctx = first[0].ctx().clone();
    let nparts = first.len();
    for ct in cts {
        if ct.len() != nparts || ct[0].ctx() != &ctx {
            return Err(HeError::Value(
                "ciphertexts of a weighted sum must share size and level".into(),
            ));
        }
    }
    let moduli = ctx.moduli_operators();
    let nmod = moduli.len();
    let degree = first[0].coefficients().shape()[1];
    for w in ws.iter().flat_map(|w| w.iter()) {
        if !w.fits(nmod, degree) {
            return Err(HeError::Value(
                "a multiplier was prepared for another ciphertext level".into(),
            ));
        }
    }
    let mut terms: Vec<usize> = (0..cts.len())
        .filter(|&k| ws.iter().any(|w| !w[k].is_zero()))
        .collect();
    if terms.is_empty() {
        terms.push(0);
    }
    // One output, one multiplier: the exact product, no accumulator.
    if let ([w], [k]) = (ws, &terms[..]) {
        return Ok(vec![w[*k].apply(cts[*k], par)?]);
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

    // Rows of all terms, resolved once: x rows per (part, modulus).
    let views: Vec<Vec<_>> = terms
        .iter()
        .map(|&k| {
            (0..nparts)
                .map(|part| cts[k][part].coefficients())
                .collect()
        })
        .collect();
    let mut rows: Vec<Vec<&[u64]>> = Vec::with_capacity(terms.len());
    for v in &views {
        let mut r = Vec::with_capacity(nparts * nmod);
        for view in v {
            for j in 0..nmod {
                r.push(
                    view.row(j)
                        .to_slice()
                        .ok_or_else(|| HeError::Backend("non-contiguous polynomial".into()))?,
                );
            }
        }
        rows.push(r);
    }
    // Polynomial multipliers' rows, resolved once.
    let poly_rows = |g: usize, k: usize, j: usize| -> Result<Option<&[u64]>> {
        match ws[g][k] {
            Multiplier::Scalar(_) => Ok(None),
            Multiplier::Poly(arr) => {
                Ok(Some(arr.row(j).to_slice().ok_or_else(|| {
                    HeError::Backend("non-contiguous multiplier".into())
                })?))
            }
        }
    };
    let nout = ws.len();
    // The accumulators cover a chunk of coefficients per output so that they
    // stay in cache while every term streams through them once.
    let chunk: usize = if nout > 4 { 64 } else { 256 };
    let mut acc = vec![0u128; chunk * nout];
    let mut outs: Vec<Vec<Poly>> = (0..nout).map(|_| Vec::with_capacity(nparts)).collect();
    for part in 0..nparts {
        let mut out: Vec<Array2<u64>> = (0..nout)
            .map(|_| Array2::<u64>::zeros((nmod, degree)))
            .collect();
        for j in 0..nmod {
            let qj = &moduli[j];
            let wrows: Vec<Vec<(u128, Option<&[u64]>)>> = (0..nout)
                .map(|g| {
                    terms
                        .iter()
                        .map(|&k| {
                            let s = match ws[g][k] {
                                Multiplier::Scalar(r) => r[j] as u128,
                                Multiplier::Poly(_) => 0,
                            };
                            Ok((s, poly_rows(g, k, j)?))
                        })
                        .collect::<Result<_>>()
                })
                .collect::<Result<_>>()?;
            for start in (0..degree).step_by(chunk) {
                let len = chunk.min(degree - start);
                acc.iter_mut().for_each(|a| *a = 0);
                let mut count = 0u64;
                for t in 0..terms.len() {
                    let xs = &rows[t][part * nmod + j][start..start + len];
                    for (g, wg) in wrows.iter().enumerate() {
                        let a = &mut acc[g * chunk..g * chunk + len];
                        match wg[t] {
                            (w, None) => {
                                for (a, &xi) in a.iter_mut().zip(xs) {
                                    *a += xi as u128 * w;
                                }
                            }
                            (_, Some(wsl)) => {
                                for ((a, &xi), &wi) in
                                    a.iter_mut().zip(xs).zip(&wsl[start..start + len])
                                {
                                    *a += xi as u128 * wi as u128;
                                }
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
                for (g, o) in out.iter_mut().enumerate() {
                    let mut row = o.row_mut(j);
                    let out_row = row
                        .as_slice_mut()
                        .ok_or_else(|| HeError::Backend("non-contiguous output".into()))?;
                    for (o, &a) in out_row[start..start + len]
                        .iter_mut()
                        .zip(&acc[g * chunk..g * chunk + len])
                    {
                        *o = qj.reduce_u128(a);
                    }
                }
            }
        }
        for (g, o) in out.into_iter().enumerate() {
            outs[g].push(Poly::try_convert_from(o, &ctx, true, Representation::Ntt)?);
        }
    }
    outs.into_iter()
        .map(|parts| Ok(Ciphertext::new(parts, par)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make, random, BATCH, FRAC};
    use crate::he::encoding::fractional_encode;
    use fhe::bfv::{Encoding as FheEncoding, Plaintext};
    use fhe_traits::{FheDecoder, FheDecrypter, FheEncoder};
    use rand::Rng;

    /// Σ x_k · w_k computed coefficient by coefficient with a full reduction per product.
    fn naive(cts: &[&Ciphertext], ws: &[&Multiplier]) -> Vec<Array2<u64>> {
        let ctx = cts[0][0].ctx();
        let moduli = ctx.moduli().to_vec();
        (0..cts[0].len())
            .map(|part| {
                let shape = cts[0][part].coefficients().dim();
                let mut out = Array2::<u64>::zeros(shape);
                for (ct, w) in cts.iter().zip(ws) {
                    let x = ct[part].coefficients();
                    for (j, &q) in moduli.iter().enumerate() {
                        for i in 0..shape.1 {
                            let wi = match w {
                                Multiplier::Scalar(r) => r[j],
                                Multiplier::Poly(a) => a[[j, i]],
                            };
                            let prod = (x[[j, i]] as u128 * wi as u128 % q as u128) as u64;
                            out[[j, i]] = ((out[[j, i]] as u128 + prod as u128) % q as u128) as u64;
                        }
                    }
                }
                out
            })
            .collect()
    }

    fn assert_matches_naive(
        cts: &[&Ciphertext],
        ws: &[&Multiplier],
        par: &Arc<BfvParameters>,
    ) -> Ciphertext {
        let got = weighted_sum(cts, ws, par).unwrap();
        let want = naive(cts, ws);
        for (part, w) in want.iter().enumerate() {
            assert_eq!(got[part].coefficients(), w.view(), "part {part}");
        }
        got
    }

    #[test]
    fn scalar_weighted_sum_matches_naive_and_decrypts() {
        let ctx = make(2048, vec![], BATCH, None);
        let par = ctx.params().bfv()[0].clone();
        let t = par.plaintext();
        let x = random(&[4, 5], -1.0, 1.0);
        let enc = ctx.encrypt(x.view()).unwrap();
        let cts: Vec<&Ciphertext> = enc.data().iter().map(|e| &e[0]).collect();
        let mut rng = rand::rng();
        let wints: Vec<i64> = (0..cts.len())
            .map(|_| rng.random_range(-300..300))
            .collect();
        let c0 = cts[0][0].ctx().clone();
        let prepared: Vec<Multiplier> = wints.iter().map(|&w| Multiplier::scalar(w, &c0)).collect();
        let ws: Vec<&Multiplier> = prepared.iter().collect();
        let got = assert_matches_naive(&cts, &ws, &par);
        // The single-scalar fast path (a tensor times a number) agrees too.
        for k in 0..3 {
            assert_matches_naive(&cts[k..k + 1], &ws[k..k + 1], &par);
        }
        // Decrypted: the same as summing the slot vectors with the weights mod t.
        let sk = &ctx.secret().unwrap()[0];
        let slots = |ct: &Ciphertext| {
            Vec::<u64>::try_decode(&sk.try_decrypt(ct).unwrap(), FheEncoding::simd()).unwrap()
        };
        let mut want = vec![0i128; 2048];
        for (ct, &w) in cts.iter().zip(&wints) {
            for (a, v) in want.iter_mut().zip(slots(ct)) {
                *a += v as i128 * w as i128;
            }
        }
        let want: Vec<u64> = want
            .iter()
            .map(|&v| v.rem_euclid(t as i128) as u64)
            .collect();
        assert_eq!(slots(&got), want);
        // And the same as fhe.rs's own ciphertext · plaintext products added up
        // (positive weights only: fhe.rs lifts plaintexts uncentred, so t − |w|
        // would cost ~log2(t) bits of noise per product and exhaust m=2048).
        let pos: Vec<Multiplier> = wints
            .iter()
            .map(|&w| Multiplier::scalar(w.abs(), &c0))
            .collect();
        let got = weighted_sum(&cts, &pos.iter().collect::<Vec<_>>(), &par).unwrap();
        let mut naive_ct: Option<Ciphertext> = None;
        for (ct, &w) in cts.iter().zip(&wints) {
            let pt =
                Plaintext::try_encode(&vec![w.unsigned_abs(); 2048][..], FheEncoding::simd(), &par)
                    .unwrap();
            let prod = *ct * &pt;
            naive_ct = Some(match naive_ct {
                None => prod,
                Some(acc) => &acc + &prod,
            });
        }
        assert_eq!(slots(&naive_ct.unwrap()), slots(&got));
    }

    #[test]
    fn polynomial_weighted_sum_matches_naive() {
        let ctx = make(2048, vec![65537], FRAC, None);
        let par = ctx.params().bfv()[0].clone();
        let x = random(&[1, 25], -3.0, 3.0);
        let enc = ctx.encrypt(x.view()).unwrap();
        let cts: Vec<&Ciphertext> = enc.data().iter().map(|e| &e[0]).collect();
        let ws_f = random(&[25], -1.0, 1.0);
        let c0 = cts[0][0].ctx().clone();
        let prepared: Vec<Multiplier> = ws_f
            .iter()
            .map(|&w| {
                Multiplier::poly(&fractional_encode(w, 2048, 2, 64, 32).unwrap(), &c0).unwrap()
            })
            .collect();
        let ws: Vec<&Multiplier> = prepared.iter().collect();
        let got = assert_matches_naive(&cts, &ws, &par);
        let t = enc.with_data(
            ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), vec![got]),
            enc.scale(),
            enc.growth().clone(),
        );
        let d = ctx.decrypt(&t).unwrap();
        let want: f64 = x.iter().zip(ws_f.iter()).map(|(a, b)| a * b).sum();
        assert!((d[[]] - want).abs() < 1e-7, "{} vs {want}", d[[]]);
    }

    #[test]
    fn lazy_reduction_with_62_bit_moduli() {
        // 62-bit primes leave room for only 15 unreduced products in a u128:
        // 200 terms go through the reduction path many times.
        let ctx = make(4096, vec![], BATCH, Some(vec![62, 47]));
        assert!(ctx.params().moduli().iter().any(|&q| q > 1 << 61));
        let par = ctx.params().bfv()[0].clone();
        let x = random(&[3, 200], -1.0, 1.0);
        let enc = ctx.encrypt(x.view()).unwrap();
        let cts: Vec<&Ciphertext> = enc.data().iter().map(|e| &e[0]).collect();
        let c0 = cts[0][0].ctx().clone();
        let mut rng = rand::rng();
        // Weights near ±q (residues of large negative and positive integers).
        let wints: Vec<i64> = (0..200)
            .map(|k| {
                if k % 2 == 0 {
                    -rng.random_range(1..255)
                } else {
                    rng.random_range(1..255)
                }
            })
            .collect();
        let prepared: Vec<Multiplier> = wints.iter().map(|&w| Multiplier::scalar(w, &c0)).collect();
        let ws: Vec<&Multiplier> = prepared.iter().collect();
        let got = assert_matches_naive(&cts, &ws, &par);
        let out = enc.with_data(
            ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), vec![got]),
            enc.scale(),
            enc.growth().clone(),
        );
        let d = ctx.decrypt(&out).unwrap();
        for img in 0..3 {
            let want: f64 = (0..200)
                .map(|k| (x[[img, k]] * 65536.0).round() * wints[k] as f64)
                .sum::<f64>()
                / 65536.0;
            assert!((d[[img]] - want).abs() < 1e-6, "{} vs {want}", d[[img]]);
        }
        // Polynomial multipliers take the same lazy path.
        let polys: Vec<Multiplier> = (0..200)
            .map(|k| Multiplier::poly(&[wints[k], 0, -1], &c0).unwrap())
            .collect();
        let ws: Vec<&Multiplier> = polys.iter().collect();
        assert_matches_naive(&cts, &ws, &par);
    }

    #[test]
    fn zero_weights_and_bad_arguments() {
        let ctx = make(2048, vec![65537], FRAC, None);
        let par = ctx.params().bfv()[0].clone();
        let x = random(&[1, 2], -3.0, 3.0);
        let enc = ctx.encrypt(x.view()).unwrap();
        let cts: Vec<&Ciphertext> = enc.data().iter().map(|e| &e[0]).collect();
        let c0 = cts[0][0].ctx().clone();
        let zero = Multiplier::scalar(0, &c0);
        assert!(zero.is_zero());
        // All-zero weights still give a valid encryption of 0.
        let z = weighted_sum(&cts, &[&zero, &zero], &par).unwrap();
        let t = enc.with_data(
            ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), vec![z]),
            enc.scale(),
            enc.growth().clone(),
        );
        assert_eq!(ctx.decrypt(&t).unwrap()[[]], 0.0);
        assert!(weighted_sum(&[], &[], &par).is_err());
        assert!(weighted_sum(&cts, &[&zero], &par).is_err());
        // A multiplier prepared for another level is refused, not a panic.
        let lower = par.context_at_level(1).unwrap().clone();
        let w = Multiplier::scalar(3, &lower);
        assert!(weighted_sum(&cts[..1], &[&w], &par).is_err());
        let w = Multiplier::poly(&[1, 2, 3], &lower).unwrap();
        assert!(weighted_sum(&cts[..1], &[&w], &par).is_err());
    }
}
