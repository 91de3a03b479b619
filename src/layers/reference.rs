//! The batch encoding's exact integer arithmetic, in plaintext: what every
//! slot of an encrypted batch run holds, computed with the same rounding of
//! inputs, weights, biases and polynomial coefficients as the encrypted
//! layers. An encrypted run whose values never wrap decrypts to exactly this.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

use super::Layer;
use crate::he::{Encoding, HeError, Result};

/// A batch of plaintext integers (`[N, ...]`) at a fixed-point scale.
#[derive(Debug, Clone)]
pub struct IntTensor {
    /// The integers, the batch axis first.
    pub values: ArrayD<i128>,
    /// Real value = integer / scale.
    pub scale: f64,
}

fn overflow(what: &str) -> HeError {
    HeError::PlaintextOverflow {
        message: format!("{what}: the exact integers exceed 127 bits (no plaintext modulus of the engine holds them)"),
        bound: f64::INFINITY,
        limit: 2f64.powi(127),
    }
}

fn scales(encoding: Encoding) -> Result<(u32, u32)> {
    match encoding {
        Encoding::Batch {
            scale_bits,
            weight_scale_bits,
        } => Ok((scale_bits, weight_scale_bits)),
        Encoding::Fractional { .. } => Err(HeError::Value(
            "the integer reference is the batch encoding's arithmetic".into(),
        )),
    }
}

/// Inputs as the encryptor encodes them: round(x · 2^scale_bits).
pub fn encode_inputs(x: ArrayViewD<f64>, encoding: Encoding) -> Result<IntTensor> {
    let (scale_bits, _) = scales(encoding)?;
    if x.ndim() == 0 {
        return Err(HeError::Value(
            "the batch encoding needs at least one axis (the batch)".into(),
        ));
    }
    if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
        return Err(HeError::Value(format!(
            "cannot encode {bad}: only finite numbers"
        )));
    }
    let scale = (scale_bits as f64).exp2();
    Ok(IntTensor {
        values: x.mapv(|v| (v * scale).round() as i128),
        scale,
    })
}

impl Layer {
    /// The layer on plaintext integers, exactly as the encrypted layer
    /// computes them in the batch encoding.
    pub fn reference(&self, x: &IntTensor, encoding: Encoding) -> Result<IntTensor> {
        let (scale_bits, weight_scale_bits) = scales(encoding)?;
        let n = x.values.shape()[0];
        let img_shape = x.values.shape()[1..].to_vec();
        let name = self.name();
        match self {
            Layer::Affine(a) => {
                let map = a.map_for(&img_shape)?;
                let (scale_out, factor) =
                    if map.divisor != 1.0 { (x.scale * map.divisor, 1.0) } else {
                        let f = (map.weight_scale_bits.unwrap_or(weight_scale_bits) as f64).exp2();
                        (x.scale * f, f)
                    };
                let weights: Vec<i128> = map.weights.iter().map(|&w| if map.divisor != 1.0 { w as i128 } else { (w * factor).round() as i128 }).collect();
                let out_per: usize = map.out_shape.iter().product::<usize>().max(1);
                let in_per: usize = map.in_shape.iter().product::<usize>().max(1);
                let bias: Vec<i128> = (0..out_per).map(|o| map.bias.get(o).map_or(0, |&b| (b * scale_out).round() as i128)).collect();
                let flat = x.values.as_standard_layout();
                let flat = flat.as_slice().ok_or_else(|| HeError::Value("non-contiguous input".into()))?;
                let rows: Vec<Vec<i128>> = (0..n)
                    .into_par_iter()
                    .map(|img| {
                        let xs = &flat[img * in_per..(img + 1) * in_per];
                        map.terms
                            .iter()
                            .enumerate()
                            .map(|(o, terms)| {
                                let mut acc = bias[o];
                                for &(i, w) in terms {
                                    acc = xs[i as usize]
                                        .checked_mul(weights[w as usize])
                                        .and_then(|p| acc.checked_add(p))
                                        .ok_or_else(|| overflow(&name))?;
                                }
                                Ok(acc)
                            })
                            .collect::<Result<Vec<i128>>>()
                    })
                    .collect::<Result<_>>()?;
                let mut shape = vec![n];
                shape.extend_from_slice(&map.out_shape);
                let values = ArrayD::from_shape_vec(IxDyn(&shape), rows.into_iter().flatten().collect())
                    .map_err(|e| HeError::Value(e.to_string()))?;
                Ok(IntTensor { values, scale: scale_out })
            }
            Layer::Square => {
                let values = checked_map(&x.values, |v| v.checked_mul(v)).ok_or_else(|| overflow(&name))?;
                Ok(IntTensor { values, scale: x.scale * x.scale })
            }
            Layer::SquarePool(f) => {
                let y = match f.before.as_ref() {
                    Some(b) => b.reference(x, encoding)?,
                    None => x.clone(),
                };
                f.pool.reference(&Layer::Square.reference(&y, encoding)?, encoding)
            }
            Layer::Absorbed(_) => Ok(x.clone()),
            Layer::Polynomial(coeffs) => {
                let d = coeffs.iter().rposition(|&c| c != 0.0).unwrap_or(0);
                if d == 0 {
                    return Err(HeError::Value("a polynomial activation needs degree ≥ 1 (a constant is not an activation)".into()));
                }
                let s = x.scale;
                let f = (weight_scale_bits as f64).exp2();
                let c: Vec<i128> = (0..=d).map(|k| if k == 0 { 0 } else { (coeffs[k] * f * s.powi((d - k) as i32)).round() as i128 }).collect();
                let scale_out = s.powi(d as i32) * f;
                let c0 = if coeffs[0] != 0.0 { (coeffs[0] * scale_out).round() as i128 } else { 0 };
                let values = checked_map(&x.values, |v| {
                    let mut acc: i128 = 0;
                    let mut power: i128 = 1;
                    for &ck in &c[1..] {
                        power = power.checked_mul(v)?;
                        acc = acc.checked_add(ck.checked_mul(power)?)?;
                    }
                    acc.checked_add(c0)
                })
                .ok_or_else(|| overflow(&name))?;
                Ok(IntTensor { values, scale: scale_out })
            }
            Layer::Flatten => {
                let per: usize = img_shape.iter().product();
                let values = x.values.to_shape(IxDyn(&[n, per])).map_err(|e| HeError::Value(e.to_string()))?.to_owned();
                Ok(IntTensor { values, scale: x.scale })
            }
            Layer::Rencryption => {
                // Decrypted to float64 (integer / scale), encrypted afresh at the input scale.
                let s_in = (scale_bits as f64).exp2();
                Ok(IntTensor { values: x.values.mapv(|v| ((v as f64 / x.scale) * s_in).round() as i128), scale: s_in })
            }
            // The packed layout has a reference of its own (its plan's).
            Layer::Packed(_) => Err(HeError::Value("the batch reference does not evaluate packed stages; use the packed plan's reference".into())),
        }
    }
}

fn checked_map(
    x: &ArrayD<i128>,
    f: impl Fn(i128) -> Option<i128> + Sync + Send,
) -> Option<ArrayD<i128>> {
    let flat: Vec<i128> = x.iter().copied().collect();
    let out: Option<Vec<i128>> = flat.into_par_iter().map(f).collect();
    ArrayD::from_shape_vec(x.raw_dim(), out?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make, random};
    use crate::layers::{Affine, Geometry};
    use std::sync::Arc;

    #[test]
    fn encrypted_layers_decrypt_to_the_reference() {
        let enc = Encoding::Batch {
            scale_bits: 6,
            weight_scale_bits: 5,
        };
        let ctx = make(4096, vec![], enc, None);
        let g = Geometry::Conv2d {
            out_channels: 2,
            in_channels: 1,
            kernel: (2, 2),
            stride: (1, 1),
            padding: (1, 1),
            dilation: (1, 1),
            groups: 1,
        };
        let layers = vec![
            Arc::new(Layer::Affine(
                Affine::new(
                    g,
                    random(&[8], -1.0, 1.0).into_raw_vec_and_offset().0,
                    Some(vec![0.3, -0.7]),
                )
                .unwrap(),
            )),
            Arc::new(Layer::Polynomial(vec![0.25, -0.5, 0.125])),
            Arc::new(Layer::Affine(
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
            )),
            Arc::new(Layer::Flatten),
        ];
        let x = random(&[3, 1, 3, 3], -1.0, 1.0);
        let mut r = encode_inputs(x.view(), enc).unwrap();
        let mut t = ctx.encrypt(x.view()).unwrap();
        for l in &layers {
            r = l.reference(&r, enc).unwrap();
            t = l.forward(&ctx, &t).unwrap();
        }
        assert_eq!(r.scale, t.scale());
        assert_eq!(ctx.decrypt_integers(&t).unwrap(), r.values);
    }
}
