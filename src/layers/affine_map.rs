//! [`AffineMap`]: the shared form of convolutions, linear layers and pooling
//! (a weighted sum per output element), how its weights become plaintext
//! multipliers, the scale and value bound it leads to, and its evaluation
//! over every image of a [`CipherTensor`] with the lazy-reduction kernel.

use std::collections::HashMap;
use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rq::Poly;
use rayon::prelude::*;

use super::kernel::weighted_sums;
use crate::he::encoding::fractional_encode;
use crate::he::error::value_err;
use crate::he::growth::{negacyclic_bound, Growth};
use crate::he::tensor::{check_fits, shaped, Element};
use crate::he::{CipherTensor, Encoding, HeError, HeParameters, Multiplier, Result};

/// A map's encoded biases: one per distinct value (by its bits), a
/// polynomial per plaintext modulus; see [`AffineMap::bias_polys`].
pub(crate) type BiasPolys = HashMap<u64, Vec<Poly>>;

/// A linear map applied to every image independently.
#[derive(Debug, Clone)]
pub struct AffineMap {
    /// Input shape of one image (without the batch axis).
    pub in_shape: Vec<usize>,
    /// Output shape of one image.
    pub out_shape: Vec<usize>,
    /// For every output element (row-major): (input flat index, weight index).
    pub terms: Vec<Vec<(u32, u32)>>,
    /// Weights; the real multiplier is `weights[i] / divisor`.
    pub weights: Vec<f64>,
    /// Exact divisor (average pooling's k²): batch tracks it in the scale
    /// instead of rounding 1/k², and then `weights` must be integers.
    pub divisor: f64,
    /// Bias per output element (empty for none).
    pub bias: Vec<f64>,
    /// Batch: the layer's own weight scale (None: the context's).
    pub weight_scale_bits: Option<u32>,
}

impl AffineMap {
    /// Batch: the scale after the map for an input at `scale`, and the
    /// factor its weights are scaled by (2^weight_scale_bits, or 1 for a
    /// divided map, whose divisor joins the scale). Fractional: (1, 1).
    pub fn output_scale(&self, params: &HeParameters, scale: f64) -> (f64, f64) {
        match params.encoding() {
            Encoding::Batch { .. } if self.divisor != 1.0 => (scale * self.divisor, 1.0),
            Encoding::Batch {
                weight_scale_bits, ..
            } => {
                let f = (self.weight_scale_bits.unwrap_or(weight_scale_bits) as f64).exp2();
                (scale * f, f)
            }
            Encoding::Fractional { .. } => (1.0, 1.0),
        }
    }

    /// The bound on the outputs' plaintext magnitudes for inputs bounded by
    /// `growth` (batch: integers at the scale; fractional: per coefficient).
    pub fn output_growth(
        &self,
        params: &HeParameters,
        growth: &Growth,
        scale_out: f64,
        weight_factor: f64,
    ) -> Result<Growth> {
        match (growth, params.encoding()) {
            (Growth::Integer(b), Encoding::Batch { .. }) => {
                let mut worst: f64 = 0.0;
                for (o, terms) in self.terms.iter().enumerate() {
                    let s: f64 = terms
                        .iter()
                        .map(|&(_, w)| (self.weights[w as usize] * weight_factor).round().abs())
                        .sum();
                    let bias = self
                        .bias
                        .get(o)
                        .map(|&x| (x * scale_out).round().abs())
                        .unwrap_or(0.0);
                    worst = worst.max(s * b + bias);
                }
                Ok(Growth::Integer(worst))
            }
            (
                Growth::Poly(g),
                Encoding::Fractional {
                    base,
                    int_digits,
                    frac_digits,
                },
            ) => {
                let m = params.m();
                let encode = |v: f64| fractional_encode(v, m, base, int_digits, frac_digits);
                let enc: Vec<Vec<(usize, f64)>> = self
                    .weights
                    .iter()
                    .map(|&w| {
                        encode(w / self.divisor).map(|c| {
                            c.iter()
                                .enumerate()
                                .filter(|(_, &x)| x != 0)
                                .map(|(i, &x)| (i, x.abs() as f64))
                                .collect()
                        })
                    })
                    .collect::<Result<_>>()?;
                let mut s = vec![0.0; m];
                let mut per_out = vec![0.0; m];
                for terms in &self.terms {
                    per_out.iter_mut().for_each(|x| *x = 0.0);
                    for &(_, w) in terms {
                        for &(i, x) in &enc[w as usize] {
                            per_out[i] += x;
                        }
                    }
                    for (a, b) in s.iter_mut().zip(&per_out) {
                        *a = f64::max(*a, *b);
                    }
                }
                let mut out = negacyclic_bound(g, &s);
                let mut bias_bound = vec![0.0; m];
                for &b in &self.bias {
                    for (a, c) in bias_bound.iter_mut().zip(encode(b)?) {
                        *a = f64::max(*a, c.abs() as f64);
                    }
                }
                for (a, b) in out.iter_mut().zip(bias_bound) {
                    *a += b;
                }
                Ok(Growth::Poly(out))
            }
            _ => Err(HeError::Value(
                "growth bound does not match the encoding".into(),
            )),
        }
    }

    /// Output indices grouped by the inputs they read (the same inputs in the
    /// same order), at most 16 per group.
    pub fn groups(&self) -> Vec<Vec<usize>> {
        let mut index: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (o, t) in self.terms.iter().enumerate() {
            let key: Vec<u32> = t.iter().map(|&(i, _)| i).collect();
            match index.get(&key) {
                Some(&g) if groups[g].len() < 16 => groups[g].push(o),
                _ => {
                    index.insert(key, groups.len());
                    groups.push(vec![o]);
                }
            }
        }
        groups
    }

    /// The bias encoded for ciphertexts like `x` at `level` and the output
    /// scale `scale`: one entry per distinct value (per output channel),
    /// reused at every position. Empty for a map without bias.
    pub(crate) fn bias_polys(
        &self,
        x: &CipherTensor,
        scale: f64,
        level: usize,
    ) -> Result<BiasPolys> {
        let mut encoded = BiasPolys::new();
        for &b in &self.bias {
            if let std::collections::hash_map::Entry::Vacant(slot) = encoded.entry(b.to_bits()) {
                slot.insert(x.constant_polys(&[b], scale, level)?);
            }
        }
        Ok(encoded)
    }

    /// The outputs `members` (one group of [`AffineMap::groups`]) of one
    /// image, for plaintext modulus `k` (parameters `par`): the weighted sums
    /// of `inputs` (that image's flat input elements) by the `prepared`
    /// multipliers, each read once for the whole group, plus the bias
    /// (`bias` from [`AffineMap::bias_polys`]). A group that reads no input
    /// (all padding) gets 0 · x, a valid encryption of 0.
    pub(crate) fn group_outputs(
        &self,
        inputs: &[&Element],
        k: usize,
        members: &[usize],
        prepared: &[Multiplier],
        bias: &BiasPolys,
        par: &Arc<BfvParameters>,
    ) -> Result<Vec<Ciphertext>> {
        let terms = &self.terms[members[0]];
        let mut cts = if terms.is_empty() {
            let zero = Multiplier::scalar(0, inputs[0][k][0].ctx()).apply(&inputs[0][k], par)?;
            vec![zero; members.len()]
        } else {
            let cts: Vec<&Ciphertext> =
                terms.iter().map(|&(i, _)| &inputs[i as usize][k]).collect();
            let ws: Vec<Vec<&Multiplier>> = members
                .iter()
                .map(|&o| {
                    self.terms[o]
                        .iter()
                        .map(|&(_, w)| &prepared[w as usize])
                        .collect()
                })
                .collect();
            let ws: Vec<&[&Multiplier]> = ws.iter().map(|w| w.as_slice()).collect();
            weighted_sums(&cts, &ws, par)?
        };
        if !self.bias.is_empty() {
            for (ct, &o) in cts.iter_mut().zip(members) {
                let poly = &bias[&self.bias[o].to_bits()][k];
                if ct[0].ctx() != poly.ctx() {
                    return value_err("a constant was encoded for another modulus level");
                }
                let mut parts: Vec<Poly> = ct.iter().cloned().collect();
                parts[0] += poly;
                *ct = Ciphertext::new(parts, par)?;
            }
        }
        Ok(cts)
    }

    /// Encodes the weights as multipliers for ciphertexts at `level`.
    pub fn prepare_weights(&self, params: &HeParameters, level: usize) -> Result<Vec<Multiplier>> {
        let ctx = params.bfv()[0].context_at_level(level)?.clone();
        self.weights
            .par_iter()
            .map(|&w| match params.encoding() {
                // Batch: round(w · 2^weight_scale_bits), the scale grows by that
                // factor; a divided map (pooling) keeps integer weights and puts the
                // divisor into the scale instead.
                Encoding::Batch {
                    weight_scale_bits, ..
                } => {
                    let x = if self.divisor != 1.0 {
                        if w.fract() != 0.0 {
                            return Err(HeError::Value(
                                "a divided map needs integer weights in the batch encoding".into(),
                            ));
                        }
                        w
                    } else {
                        (w * (self.weight_scale_bits.unwrap_or(weight_scale_bits) as f64).exp2())
                            .round()
                    };
                    if !x.is_finite() || x.abs() >= 2f64.powi(62) {
                        return Err(HeError::Value(format!("weight {w} is out of range")));
                    }
                    Ok(Multiplier::scalar(x as i64, &ctx))
                }
                // Fractional: the (centred) encoding of the real multiplier.
                Encoding::Fractional {
                    base,
                    int_digits,
                    frac_digits,
                } => Multiplier::poly(
                    &fractional_encode(
                        w / self.divisor,
                        params.m(),
                        base,
                        int_digits,
                        frac_digits,
                    )?,
                    &ctx,
                ),
            })
            .collect()
    }

    /// Applies the map to every image of `x`. `prepared` comes from
    /// [`AffineMap::prepare_weights`] at `x`'s level; `name` names the layer in errors.
    pub fn apply(
        &self,
        x: &CipherTensor,
        prepared: &[Multiplier],
        name: &str,
    ) -> Result<CipherTensor> {
        let start = x.image_axes_start();
        let img_shape = &x.data().shape()[start..];
        if img_shape != self.in_shape.as_slice() {
            return Err(HeError::Value(format!(
                "{name}: expects input of shape {:?} per image, got {:?}",
                self.in_shape, img_shape
            )));
        }
        if prepared.len() != self.weights.len() {
            return Err(HeError::Value(format!(
                "{name}: weights were prepared for another map"
            )));
        }
        let params = x.params();
        let level = x.level()?;
        let (scale_out, weight_factor) = self.output_scale(params, x.scale());
        let growth = self.output_growth(params, x.growth(), scale_out, weight_factor)?;
        check_fits(params, &growth, scale_out, name)?;
        let imgs = x.physical_images();
        let in_per_img: usize = self.in_shape.iter().product::<usize>().max(1);
        let out_per_img: usize = self.out_shape.iter().product::<usize>().max(1);
        let flat: Vec<&Element> = x.data().iter().collect();
        let ncomp = params.p().len();
        let bfv = params.bfv();
        // Outputs that read the same inputs (a convolution's channels at one
        // position, a linear layer's features) are computed together: each
        // input is read once for all of them.
        let groups = self.groups();
        let bias = self.bias_polys(x, scale_out, level)?;
        let jobs: Vec<(usize, usize, usize)> = (0..imgs)
            .flat_map(|i| (0..groups.len()).flat_map(move |g| (0..ncomp).map(move |k| (i, g, k))))
            .collect();
        let sums: Vec<Vec<Ciphertext>> = jobs
            .par_iter()
            .map(|&(img, g, k)| {
                let base = img * in_per_img;
                self.group_outputs(
                    &flat[base..base + in_per_img],
                    k,
                    &groups[g],
                    prepared,
                    &bias,
                    &bfv[k],
                )
            })
            .collect::<Result<_>>()?;
        let mut slots: Vec<Vec<Option<Ciphertext>>> =
            (0..imgs * out_per_img).map(|_| vec![None; ncomp]).collect();
        for (&(img, g, k), cts) in jobs.iter().zip(sums) {
            for (&o, ct) in groups[g].iter().zip(cts) {
                slots[img * out_per_img + o][k] = Some(ct);
            }
        }
        let out: Vec<Element> = slots
            .into_iter()
            .map(|e| {
                e.into_iter()
                    .map(|c| {
                        c.ok_or_else(|| {
                            HeError::Backend("an output of the map was not computed".into())
                        })
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        let mut shape = if start == 1 { vec![imgs] } else { vec![] };
        shape.extend_from_slice(&self.out_shape);
        let data = shaped(&shape, out)?;
        Ok(x.with_data(data, scale_out, growth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make, random, FRAC};

    const BATCH: Encoding = Encoding::Batch {
        scale_bits: 8,
        weight_scale_bits: 8,
    };
    use crate::layers::{Affine, Geometry};
    use ndarray::{ArrayD, IxDyn};

    /// The fixed-point reference of a batch affine map: integers at the input
    /// scale times integer weights, plus the bias at the output scale.
    fn reference(x: &ArrayD<f64>, map: &AffineMap, scale: f64, wf: f64) -> Vec<Vec<f64>> {
        let n = x.shape()[0];
        let xs = x
            .to_shape((n, map.in_shape.iter().product::<usize>()))
            .unwrap();
        (0..n)
            .map(|i| {
                map.terms
                    .iter()
                    .enumerate()
                    .map(|(o, t)| {
                        let s: f64 = t
                            .iter()
                            .map(|&(j, w)| {
                                (xs[[i, j as usize]] * scale).round()
                                    * (map.weights[w as usize] * wf).round()
                            })
                            .sum();
                        (s + map
                            .bias
                            .get(o)
                            .map(|b| (b * scale * wf).round())
                            .unwrap_or(0.0))
                            / (scale * wf)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn batch_conv_is_exactly_its_fixed_point_reference() {
        let ctx = make(2048, vec![], BATCH, None);
        let g = Geometry::Conv2d {
            out_channels: 2,
            in_channels: 3,
            kernel: (2, 2),
            stride: (2, 1),
            padding: (1, 0),
            dilation: (1, 1),
            groups: 1,
        };
        let w = random(&[2 * 3 * 2 * 2], -1.0, 1.0)
            .into_raw_vec_and_offset()
            .0;
        let layer = Affine::new(g, w, Some(vec![0.25, -0.5])).unwrap();
        let x = random(&[4, 3, 3, 4], -1.0, 1.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let map = layer.map_for(&[3, 3, 4]).unwrap();
        let y = map
            .apply(
                &t,
                &map.prepare_weights(t.params(), t.level().unwrap()).unwrap(),
                "Conv2d",
            )
            .unwrap();
        assert_eq!(y.shape(), vec![4, 2, 2, 3]);
        assert_eq!(y.scale(), 256.0 * 256.0);
        let d = ctx.decrypt(&y).unwrap();
        let want = reference(&x, &map, 256.0, 256.0);
        for (i, row) in want.iter().enumerate() {
            let got: Vec<f64> = d.index_axis(ndarray::Axis(0), i).iter().cloned().collect();
            assert_eq!(&got, row, "image {i}");
        }
        // Growth: the bound holds and a map whose outputs could wrap is refused.
        match y.growth() {
            Growth::Integer(b) => assert!(d.iter().all(|v| (v * y.scale()).abs() <= *b)),
            g => panic!("{g:?}"),
        }
        let big = Affine::new(
            Geometry::Linear {
                in_features: 18,
                out_features: 1,
            },
            vec![1e4; 18],
            None,
        )
        .unwrap();
        let flat = t.reshape_images(&[36]).unwrap();
        assert!(Affine::new(
            Geometry::Linear {
                in_features: 36,
                out_features: 1
            },
            vec![1e4; 36],
            None
        )
        .unwrap()
        .forward(&flat)
        .is_err());
        assert!(
            big.forward(&flat).is_err(),
            "a shape mismatch is an error, not a panic"
        );
    }

    #[test]
    fn pooling_keeps_the_divisor_in_the_scale_and_fractional_matches_floats() {
        let ctx = make(2048, vec![], BATCH, None);
        let pool = Affine::new(
            Geometry::AvgPool2d {
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
            },
            vec![1.0],
            None,
        )
        .unwrap();
        let x = random(&[2, 1, 4, 4], -1.0, 1.0);
        let y = pool.forward(&ctx.encrypt(x.view()).unwrap()).unwrap();
        assert_eq!(
            y.scale(),
            256.0 * 4.0,
            "the divisor joins the scale, nothing is rounded"
        );
        let frac = make(2048, vec![65537], FRAC, None);
        let lin = Affine::new(
            Geometry::Linear {
                in_features: 3,
                out_features: 2,
            },
            vec![0.5, -1.0, 2.0, 0.25, 0.0, -0.75],
            Some(vec![1.0, -2.0]),
        )
        .unwrap();
        let x = random(&[2, 3], -2.0, 2.0);
        let d = frac
            .decrypt(&lin.forward(&frac.encrypt(x.view()).unwrap()).unwrap())
            .unwrap();
        for i in 0..2 {
            let want = [
                0.5 * x[[i, 0]] - x[[i, 1]] + 2.0 * x[[i, 2]] + 1.0,
                0.25 * x[[i, 0]] - 0.75 * x[[i, 2]] - 2.0,
            ];
            for o in 0..2 {
                assert!((d[[i, o]] - want[o]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn probe_takes_the_heaviest_output_row() {
        let lin = Affine::new(
            Geometry::Linear {
                in_features: 3,
                out_features: 3,
            },
            vec![0.1, 0.1, 0.1, -2.0, 1.0, 0.5, 0.3, 0.3, 0.3],
            Some(vec![0.0, 0.5, 9.0]),
        )
        .unwrap();
        let m = lin.probe_map();
        assert_eq!(m.in_shape, vec![3]);
        assert_eq!(m.terms, vec![vec![(0, 3), (1, 4), (2, 5)]]);
        assert_eq!(m.bias, vec![0.5]);
        assert_eq!(
            &m.weights[3..6],
            &[2.0, 1.0, 0.5],
            "the probe takes |w|: signed weights could cancel"
        );
        let ctx = make(2048, vec![], BATCH, None);
        let probe = ctx
            .encrypt(ArrayD::from_elem(IxDyn(&[1]), 1.0).view())
            .unwrap();
        let out = lin.probe(&probe).unwrap();
        assert_eq!(out.shape(), vec![1]);
        assert_eq!(ctx.decrypt(&out).unwrap()[[0]], 2.0 + 1.0 + 0.5 + 0.5);
    }
}
