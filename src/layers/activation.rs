//! Activations as layers: the square and polynomials Σ c_k x^k, built from
//! the core's ciphertext products and the lazy-reduction kernel.

use fhe::bfv::Ciphertext;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::kernel::weighted_sum;
use super::{Affine, AffineMap};
use crate::he::encoding::fractional_encode;
use crate::he::error::value_err;
use crate::he::growth::{negacyclic_bound, Growth};
use crate::he::tensor::{check_fits, shaped, Element};
use crate::he::{CipherTensor, Encoding, HeContext, HeError, Multiplier, Result};

/// x² element-wise. `x` is consumed: each input ciphertext is freed as soon
/// as its square exists (an encrypted CNN's memory peaks at its first square).
pub fn square(ctx: &HeContext, x: CipherTensor) -> Result<CipherTensor> {
    ctx.square(x)
}

/// Whether `map` is a sum pooling [`square_pool`] can fuse with the square
/// before it: the batch encoding, unit weights, no bias, and every input
/// in at most one output (non-overlapping windows).
fn sums_disjoint_windows(map: &AffineMap, x: &CipherTensor) -> bool {
    if !matches!(x.params().encoding(), Encoding::Batch { .. })
        || !map.bias.is_empty()
        || map.divisor == 1.0
    {
        return false;
    }
    if map.weights.iter().any(|&w| w != 1.0) || map.terms.iter().any(|t| t.is_empty()) {
        return false;
    }
    let mut used = vec![false; map.in_shape.iter().product::<usize>()];
    for &(i, _) in map.terms.iter().flatten() {
        if std::mem::replace(&mut used[i as usize], true) {
            return false;
        }
    }
    true
}

/// Whether a fused square relinearizes its input before the affine layer
/// `before` rather than each of the square's inputs after it: where the
/// affine layer has no more outputs than inputs per image (LeNet-1's second
/// conv: 576 inputs, 768 outputs) that is fewer relinearizations, and the
/// affine layer's weighted sums then run on two-part ciphertexts (a third
/// cheaper than on three). The key switch's noise is then multiplied by the
/// affine layer's weights (a few bits: the planner's probes, which take the
/// same path, see it).
pub(crate) fn relinearizes_first(before: Option<&AffineMap>, in_shape: &[usize]) -> bool {
    before.is_some_and(|m| {
        in_shape.iter().product::<usize>() <= m.out_shape.iter().product::<usize>()
    })
}

/// [`before` →] x² → the average pooling `pool`, as one step: each pooled
/// output adds the tensor squares of its window before BFV scales the sum
/// back (one scaling per pooled output instead of one per square, the most
/// expensive part of a square), and with `before` (an affine layer) each
/// square's input is computed where it is needed, so the affine layer's
/// output is never held whole (the memory peak of an encrypted CNN). Any
/// pooling that is not a sum over disjoint windows runs unfused.
pub fn square_pool(
    ctx: &HeContext,
    x: CipherTensor,
    before: Option<&Affine>,
    pool: &Affine,
) -> Result<CipherTensor> {
    ctx.check(&x)?;
    let params = x.params().clone();
    let level = x.level()?;
    let bmap = before.map(|b| b.map_for(x.image_shape())).transpose()?;
    let sq_in_shape = bmap
        .as_ref()
        .map_or_else(|| x.image_shape().to_vec(), |m| m.out_shape.clone());
    let map = pool.map_for(&sq_in_shape)?;
    if !sums_disjoint_windows(&map, &x) {
        let y = match before {
            Some(b) => b.forward(&x)?,
            None => x,
        };
        return pool.forward(&square(ctx, y)?);
    }
    ctx.can_square(level)?;
    // Relinearized before the affine layer when it has no more inputs than
    // outputs (see [`relinearizes_first`]).
    let x = if relinearizes_first(bmap.as_deref(), x.image_shape()) {
        ctx.relinearize(x)?
    } else {
        x
    };
    // Scales and bounds as the three layers would give them, checked in order.
    let (b_scale, b_growth, prepared, bias) = match (before, &bmap) {
        (Some(b), Some(m)) => {
            let (scale, wf) = m.output_scale(&params, x.scale());
            let growth = m.output_growth(&params, x.growth(), scale, wf)?;
            check_fits(&params, &growth, scale, b.geometry().name())?;
            let polys = m.bias_polys(&x, scale, level)?;
            (scale, growth, Some(b.prepared(m, &x)?), polys)
        }
        _ => (x.scale(), x.growth().clone(), None, Default::default()),
    };
    let sq_growth = b_growth.mul(&b_growth);
    let sq_scale = b_scale * b_scale;
    check_fits(&params, &sq_growth, sq_scale, "square")?;
    let (scale_out, weight_factor) = map.output_scale(&params, sq_scale);
    let growth = map.output_growth(&params, &sq_growth, scale_out, weight_factor)?;
    check_fits(&params, &growth, scale_out, pool.geometry().name())?;
    let start = x.image_axes_start();
    let imgs = x.physical_images();
    let in_per: usize = x.image_shape().iter().product::<usize>().max(1);
    let sq_per: usize = sq_in_shape.iter().product::<usize>().max(1);
    let out_per: usize = map.out_shape.iter().product::<usize>().max(1);
    let flat: Vec<&Element> = x.data().iter().collect();
    let ncomp = params.p().len();
    let bfv = params.bfv();
    // The square's input j of image `img`, component k.
    // The square's inputs are computed a group at a time: the affine layer's
    // outputs that read the same inputs (a conv's channels at one position)
    // in one pass of the kernel. Without an affine layer a group is one input.
    let (bgroups, slot_of): (Vec<Vec<usize>>, Vec<(usize, usize)>) = match &bmap {
        Some(m) => {
            let groups = m.groups();
            let mut slot = vec![(0, 0); sq_per];
            for (g, members) in groups.iter().enumerate() {
                for (i, &j) in members.iter().enumerate() {
                    slot[j] = (g, i);
                }
            }
            (groups, slot)
        }
        None => (
            (0..sq_per).map(|j| vec![j]).collect(),
            (0..sq_per).map(|j| (j, 0)).collect(),
        ),
    };
    let group_inputs =
        |img: usize, g: usize, k: usize| -> Result<Vec<std::borrow::Cow<'_, Ciphertext>>> {
            let base = img * in_per;
            let (Some(m), Some(prepared)) = (&bmap, &prepared) else {
                return Ok(bgroups[g]
                    .iter()
                    .map(|&j| std::borrow::Cow::Borrowed(&flat[img * sq_per + j][k]))
                    .collect());
            };
            let cts = m.group_outputs(
                &flat[base..base + in_per],
                k,
                &bgroups[g],
                prepared,
                &bias,
                &bfv[k],
            )?;
            Ok(cts.into_iter().map(std::borrow::Cow::Owned).collect())
        };
    // Pooled outputs whose windows' inputs come from the same groups, slot by
    // slot, are computed together (each group once); one job per such set
    // and plaintext modulus.
    let mut by_signature: std::collections::HashMap<Vec<usize>, usize> =
        std::collections::HashMap::new();
    let mut pgroups: Vec<Vec<usize>> = Vec::new();
    for (o, terms) in map.terms.iter().enumerate() {
        let sig: Vec<usize> = terms.iter().map(|&(j, _)| slot_of[j as usize].0).collect();
        match by_signature.get(&sig) {
            Some(&g) if pgroups[g].len() < 16 => pgroups[g].push(o),
            _ => {
                by_signature.insert(sig, pgroups.len());
                pgroups.push(vec![o]);
            }
        }
    }
    let jobs: Vec<(usize, usize, usize)> = (0..imgs)
        .flat_map(|i| (0..pgroups.len()).flat_map(move |g| (0..ncomp).map(move |k| (i, g, k))))
        .collect();
    let results: Vec<Vec<Ciphertext>> = jobs
        .par_iter()
        .map(|&(img, pg, k)| {
            let outs = &pgroups[pg];
            let mut accs: Vec<Option<crate::he::square::Tensor>> =
                (0..outs.len()).map(|_| None).collect();
            for slot in 0..map.terms[outs[0]].len() {
                let g = slot_of[map.terms[outs[0]][slot].0 as usize].0;
                let inputs = group_inputs(img, g, k)?;
                for (acc, &o) in accs.iter_mut().zip(outs) {
                    let j = map.terms[o][slot].0 as usize;
                    ctx.square_add(k, &inputs[slot_of[j].1], level, acc)?;
                }
            }
            accs.into_iter()
                .map(|acc| ctx.square_finish(k, acc, level))
                .collect()
        })
        .collect::<Result<_>>()?;
    let mut slots: Vec<Vec<Option<Ciphertext>>> =
        (0..imgs * out_per).map(|_| vec![None; ncomp]).collect();
    for (&(img, pg, k), cts) in jobs.iter().zip(results) {
        for (&o, ct) in pgroups[pg].iter().zip(cts) {
            slots[img * out_per + o][k] = Some(ct);
        }
    }
    let cts: Vec<Ciphertext> = slots
        .into_iter()
        .flatten()
        .map(|c| {
            c.ok_or_else(|| {
                HeError::Backend("an output of the fused square was not computed".into())
            })
        })
        .collect::<Result<_>>()?;
    let mut it = cts.into_iter();
    let out: Vec<Element> = (0..imgs * out_per)
        .map(|_| it.by_ref().take(ncomp).collect())
        .collect();
    let mut shape = if start == 1 { vec![imgs] } else { vec![] };
    shape.extend_from_slice(&map.out_shape);
    let data = shaped(&shape, out)?;
    Ok(x.with_data(data, scale_out, growth))
}

/// Σ_k coeffs[k] · x^k element-wise (coefficients lowest degree first).
pub fn polynomial(ctx: &HeContext, x: &CipherTensor, coeffs: &[f64]) -> Result<CipherTensor> {
    ctx.check(x)?;
    // Powers are products: their input needs two parts (a square's output has three).
    let x = &ctx.relinearized(x)?;
    let d = coeffs.iter().rposition(|&c| c != 0.0).unwrap_or(0);
    if d == 0 {
        return value_err(
            "a polynomial activation needs degree ≥ 1 (a constant is not an activation)",
        );
    }
    // Products switch down a level: every power joins the sum at the deepest one.
    let mut powers = vec![x.clone()];
    for _ in 1..d {
        let next = ctx.multiply(powers.last().unwrap_or(x), x)?;
        powers.push(next);
    }
    let level = powers.last().unwrap_or(x).level()?;
    let powers = powers
        .iter()
        .map(|p| p.switch_to_level(level))
        .collect::<Result<Vec<_>>>()?;
    let params = ctx.params();
    let ring = params.bfv()[0].context_at_level(level)?.clone();
    let (mults, scale_out, growth): (Vec<Multiplier>, f64, Growth) = match params.encoding() {
        Encoding::Batch {
            weight_scale_bits, ..
        } => {
            // Every term is brought to scale s^d · 2^wsb with exact integer factors.
            let s = x.scale();
            let f = (weight_scale_bits as f64).exp2();
            let mut ms = Vec::new();
            let mut bound = 0.0;
            for k in 1..=d {
                let c = (coeffs[k] * f * s.powi((d - k) as i32)).round();
                if c.abs() >= 2f64.powi(62) {
                    return Err(HeError::PlaintextOverflow {
                        message: format!(
                            "polynomial coefficient {} does not fit at scale {s}",
                            coeffs[k]
                        ),
                        bound: coeffs[k].abs(),
                        limit: 2f64.powi(62) / (f * s.powi((d - k) as i32)),
                    });
                }
                if let Growth::Integer(b) = powers[k - 1].growth() {
                    bound += c.abs() * b;
                }
                ms.push(Multiplier::scalar(c as i64, &ring));
            }
            let scale_out = s.powi(d as i32) * f;
            (ms, scale_out, Growth::Integer(bound))
        }
        Encoding::Fractional {
            base,
            int_digits,
            frac_digits,
        } => {
            let mut ms = Vec::new();
            let mut g = vec![0.0; params.m()];
            for k in 1..=d {
                let c = fractional_encode(coeffs[k], params.m(), base, int_digits, frac_digits)?;
                let cb: Vec<f64> = c.iter().map(|&v| v.abs() as f64).collect();
                if let Growth::Poly(pg) = &powers[k - 1].growth() {
                    for (a, b) in g.iter_mut().zip(negacyclic_bound(pg, &cb)) {
                        *a += b;
                    }
                }
                ms.push(Multiplier::poly(&c, &ring)?);
            }
            (ms, 1.0, Growth::Poly(g))
        }
    };
    check_fits(params, &growth, scale_out, "polynomial")?;
    let n = x.data().len();
    let flats: Vec<Vec<&Element>> = powers.iter().map(|p| p.data().iter().collect()).collect();
    let ncomp = params.p().len();
    let out: Result<Vec<Element>> = (0..n)
        .into_par_iter()
        .map(|j| {
            (0..ncomp)
                .map(|k| {
                    let cts: Vec<&Ciphertext> = flats.iter().map(|f| &f[j][k]).collect();
                    let ws: Vec<&Multiplier> = mults.iter().collect();
                    weighted_sum(&cts, &ws, &params.bfv()[k])
                })
                .collect()
        })
        .collect();
    let data = shaped(x.data().shape(), out?)?;
    let t = x.with_data(data, scale_out, growth);
    if coeffs[0] != 0.0 {
        t.add_plain(&ArrayD::from_elem(IxDyn(&[]), coeffs[0]))
    } else {
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make, random, FRAC};

    fn max_err(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn polynomials_mix_levels() {
        // x and x² live at different levels once products switch down.
        let ctx = make(4096, vec![953983721], FRAC, None);
        let x = random(&[1, 3], -2.0, 2.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let y = polynomial(&ctx, &t, &[0.1, 0.5, 0.25]).unwrap();
        assert!(
            max_err(
                &ctx.decrypt(&y).unwrap(),
                &x.mapv(|v| 0.1 + 0.5 * v + 0.25 * v * v)
            ) < 1e-6
        );
        let batch = Encoding::Batch {
            scale_bits: 8,
            weight_scale_bits: 8,
        };
        let ctx = make(8192, vec![], batch, None);
        let x = random(&[4, 2], -2.0, 2.0);
        let q = x.mapv(|v| (v * 256.0).round() / 256.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let y = polynomial(&ctx, &t, &[0.0, -1.0, 0.0, 0.5]).unwrap();
        assert!(max_err(&ctx.decrypt(&y).unwrap(), &q.mapv(|v| -v + 0.5 * v.powi(3))) < 1e-9);
        assert!(t.switch_to_level(1).unwrap().switch_to_level(0).is_err());
    }

    #[test]
    fn fused_conv_square_pool_matches_the_layers_one_by_one() {
        use crate::layers::{Affine, Geometry, Layer};
        use std::sync::Arc;
        let batch = Encoding::Batch {
            scale_bits: 6,
            weight_scale_bits: 6,
        };
        // Two plaintext primes: the fused step's jobs cover every CRT component.
        let ctx = crate::he::context::tests::make_n(4096, vec![], 2, batch, None);
        let g = Geometry::Conv2d {
            out_channels: 3,
            in_channels: 2,
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 1),
            dilation: (1, 1),
            groups: 1,
        };
        let w = random(&[3 * 2 * 9], -1.0, 1.0).into_raw_vec_and_offset().0;
        let conv = Arc::new(Layer::Affine(
            Affine::new(g, w, Some(vec![0.5, -0.25, 0.125])).unwrap(),
        ));
        let pool = Arc::new(Layer::Affine(
            Affine::new(
                Geometry::AvgPool2d {
                    kernel: (2, 2),
                    stride: (2, 2),
                    padding: (0, 0),
                },
                vec![1.0],
                None,
            )
            .unwrap(),
        ));
        let x = random(&[5, 2, 4, 6], -1.0, 1.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let plain = pool
            .forward(
                &ctx,
                &Layer::Square
                    .forward(&ctx, &conv.forward(&ctx, &t).unwrap())
                    .unwrap(),
            )
            .unwrap();
        let (before, sq, after) = Layer::fuse_square(Some(&conv), &pool).unwrap();
        let before = before.expect("an affine layer before the square is absorbed");
        let fused = after
            .forward(
                &ctx,
                &sq.forward(&ctx, &before.forward(&ctx, &t).unwrap())
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(before.name(), "Conv2d+Square+AvgPool2d");
        assert_eq!(
            (fused.shape(), fused.scale()),
            (plain.shape(), plain.scale())
        );
        assert_eq!(
            ctx.decrypt_integers(&fused).unwrap(),
            ctx.decrypt_integers(&plain).unwrap()
        );
        assert!(
            fused.data().iter().all(|e| e.iter().all(|c| c.len() == 3)),
            "not relinearized"
        );
        // And the reference agrees with both.
        let r = crate::layers::encode_inputs(x.view(), batch).unwrap();
        let r = before.reference(&r, batch).unwrap();
        assert_eq!(r.scale, plain.scale());
        // Three-part results serialize, add to two-part ones, and feed a product.
        let bytes = crate::he::serialize::tensor_to_bytes(&fused);
        let back = crate::he::serialize::tensor_from_bytes(&bytes, &ctx).unwrap();
        let fresh = ctx
            .encrypt(ArrayD::zeros(IxDyn(&[5, 3, 2, 3])).view())
            .unwrap();
        let fresh = fresh
            .with_data(fresh.data().clone(), back.scale(), back.growth().clone())
            .switch_to_level(back.level().unwrap())
            .unwrap();
        assert_eq!(
            ctx.decrypt_integers(&back.add(&fresh).unwrap()).unwrap(),
            ctx.decrypt_integers(&plain).unwrap()
        );
        // (m=4096 has no budget for a second product: that it runs is the check.)
        let sq2 = ctx.multiply(&back, &back).unwrap();
        assert!(sq2.data().iter().all(|e| e.iter().all(|c| c.len() == 2)));
    }

    #[test]
    fn square_consumes_and_matches() {
        let batch = Encoding::Batch {
            scale_bits: 8,
            weight_scale_bits: 8,
        };
        let ctx = make(4096, vec![], batch, None);
        let x = random(&[5, 3], -3.0, 3.0);
        let q = x.mapv(|v| (v * 256.0).round() / 256.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let y = square(&ctx, t).unwrap();
        assert_eq!(y.scale(), 65536.0);
        assert_eq!(ctx.decrypt(&y).unwrap(), q.mapv(|v| v * v));
        // Degree 0 is not an activation.
        let t = ctx.encrypt(x.view()).unwrap();
        assert!(polynomial(&ctx, &t, &[1.0]).is_err());
        let frac = make(2048, vec![65537], FRAC, None);
        let t = frac.encrypt(x.view()).unwrap();
        assert!(
            max_err(
                &frac.decrypt(&square(&frac, t).unwrap()).unwrap(),
                &x.mapv(|v| v * v)
            ) < 1e-6
        );
    }
}
