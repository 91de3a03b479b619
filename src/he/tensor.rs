//! CipherTensor: an n-dimensional array of ciphertexts with its encoding
//! metadata, and the element-wise and affine operations the layers need.

use std::sync::Arc;

use std::borrow::Cow;
use std::collections::HashMap;

use fhe::bfv::{Ciphertext, Encoding as FheEncoding, Plaintext};
use fhe_math::rq::{traits::TryConvertFrom, Poly, Representation};
use fhe_traits::FheEncoder;
use ndarray::{ArrayD, Axis, IxDyn};
use num_bigint::BigUint;
use rayon::prelude::*;

use super::encoding::{centre, fractional_encode, reduce_i128};
use super::error::{value_err, HeError, Result};
use super::growth::{negacyclic_bound, Growth, GrowthReport};
use super::multiplier::Multiplier;
use super::params::{Encoding, HeParameters};

/// One encrypted value (fractional) or one slot vector (batch): a ciphertext
/// per plaintext modulus (several only when CRT is in use).
pub type Element = Vec<Ciphertext>;

/// An array of ciphertexts and what it takes to read them.
#[derive(Debug, Clone)]
pub struct CipherTensor {
    data: ArrayD<Element>,
    batch: Option<usize>,
    scale: f64,
    growth: Growth,
    params: Arc<HeParameters>,
    key_id: [u8; 16],
}

impl CipherTensor {
    /// A tensor from its parts (the encryptor's and the loader's constructor).
    pub(crate) fn from_parts(
        data: ArrayD<Element>,
        batch: Option<usize>,
        scale: f64,
        growth: Growth,
        params: Arc<HeParameters>,
        key_id: [u8; 16],
    ) -> CipherTensor {
        CipherTensor {
            data,
            batch,
            scale,
            growth,
            params,
            key_id,
        }
    }

    /// Physical array of elements: the logical shape (fractional) or the
    /// logical shape without the batch axis (batch: the batch is in the slots).
    pub fn data(&self) -> &ArrayD<Element> {
        &self.data
    }

    /// Takes the physical array out (for operations that consume a tensor).
    pub(crate) fn into_data(self) -> ArrayD<Element> {
        self.data
    }

    /// Batch encoding: the number of images N in the slots. `None` for fractional.
    pub fn batch(&self) -> Option<usize> {
        self.batch
    }

    /// Batch encoding: slots hold round(value · scale). 1 for fractional.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Bound on the plaintext magnitudes.
    pub fn growth(&self) -> &Growth {
        &self.growth
    }

    /// The parameters the ciphertexts belong to.
    pub fn params(&self) -> &Arc<HeParameters> {
        &self.params
    }

    /// The key the ciphertexts were made under.
    pub fn key_id(&self) -> [u8; 16] {
        self.key_id
    }

    /// The logical shape: `[N, ...]`.
    pub fn shape(&self) -> Vec<usize> {
        let mut s = self.data.shape().to_vec();
        if let Some(n) = self.batch {
            s.insert(0, n);
        }
        s
    }

    /// The level (number of moduli dropped) of the ciphertexts.
    pub fn level(&self) -> Result<usize> {
        let first = self
            .data
            .iter()
            .next()
            .ok_or_else(|| HeError::Value("empty tensor".into()))?;
        Ok(self.params.bfv()[0].level_of_context(first[0][0].ctx())?)
    }

    /// Number of ciphertexts it holds.
    pub fn n_ciphertexts(&self) -> usize {
        self.data.len() * self.params.p().len()
    }

    /// A tensor of the same batch, parameters and key holding `data` at `scale`.
    pub(crate) fn with_data(
        &self,
        data: ArrayD<Element>,
        scale: f64,
        growth: Growth,
    ) -> CipherTensor {
        CipherTensor {
            data,
            batch: self.batch,
            scale,
            growth,
            params: self.params.clone(),
            key_id: self.key_id,
        }
    }

    fn check_same(&self, other: &CipherTensor) -> Result<()> {
        if !Arc::ptr_eq(&self.params, &other.params) {
            return value_err(if self.params.fingerprint() != other.params.fingerprint() {
                "the tensors belong to different parameters"
            } else {
                "the tensors belong to different contexts; load both with the same Context"
            });
        }
        if self.key_id != other.key_id {
            return value_err("the tensors were encrypted under different keys");
        }
        if self.batch != other.batch {
            return value_err(format!(
                "batch sizes differ: {:?} and {:?}",
                self.batch, other.batch
            ));
        }
        if self.data.shape() != other.data.shape() {
            return value_err(format!(
                "shapes differ: {:?} and {:?}",
                self.shape(),
                other.shape()
            ));
        }
        if self.scale != other.scale {
            return value_err(format!(
                "scales differ ({} and {}): values at different fixed-point scales cannot be added",
                self.scale, other.scale
            ));
        }
        if self.level()? != other.level()? {
            return value_err("the tensors are at different modulus levels");
        }
        Ok(())
    }

    fn zip_map(
        &self,
        other: &CipherTensor,
        f: impl Fn(&Ciphertext, &Ciphertext) -> Ciphertext + Sync,
    ) -> Result<ArrayD<Element>> {
        let a: Vec<&Element> = self.data.iter().collect();
        let b: Vec<&Element> = other.data.iter().collect();
        let out: Vec<Element> = a
            .par_iter()
            .zip(b.par_iter())
            .map(|(x, y)| {
                x.iter()
                    .zip(y.iter())
                    .enumerate()
                    .map(|(k, (cx, cy))| match cx.len().cmp(&cy.len()) {
                        std::cmp::Ordering::Equal => Ok(f(cx, cy)),
                        std::cmp::Ordering::Less => Ok(f(&self.with_parts(k, cx, cy.len())?, cy)),
                        std::cmp::Ordering::Greater => {
                            Ok(f(cx, &self.with_parts(k, cy, cx.len())?))
                        }
                    })
                    .collect::<Result<Element>>()
            })
            .collect::<Result<_>>()?;
        shaped(self.data.shape(), out)
    }

    /// `ct` (plaintext modulus `k`) padded with zero parts to `n` parts: a
    /// two-part ciphertext is a three-part one whose third part is 0, so an
    /// unrelinearized square's output and a two-part ciphertext can be added.
    fn with_parts(&self, k: usize, ct: &Ciphertext, n: usize) -> Result<Ciphertext> {
        let mut parts: Vec<Poly> = ct.iter().cloned().collect();
        while parts.len() < n {
            parts.push(Poly::zero(ct[0].ctx(), fhe_math::rq::Representation::Ntt));
        }
        Ok(Ciphertext::new(parts, &self.params.bfv()[k])?)
    }

    /// Element-wise sum with another tensor of the same shape and scale.
    pub fn add(&self, other: &CipherTensor) -> Result<CipherTensor> {
        self.combine(other, "add", |x, y| x + y)
    }

    /// Element-wise difference.
    pub fn sub(&self, other: &CipherTensor) -> Result<CipherTensor> {
        self.combine(other, "subtract", |x, y| x - y)
    }

    /// `f` element-wise, after bringing the operand that sits higher up the
    /// modulus chain down to the other's level (a product and a fresh
    /// ciphertext can be added, as in SEAL).
    fn combine(
        &self,
        other: &CipherTensor,
        what: &str,
        f: impl Fn(&Ciphertext, &Ciphertext) -> Ciphertext + Sync,
    ) -> Result<CipherTensor> {
        let (a, b) = at_common_level(self, other)?;
        a.check_same(&b)?;
        let growth = a.growth.add(&b.growth);
        a.check_fits(&growth, what)?;
        let data = a.zip_map(&b, f)?;
        Ok(a.with_data(data, a.scale, growth))
    }

    /// Negation.
    pub fn neg(&self) -> CipherTensor {
        let data = self.data.map(|e| e.iter().map(|c| -c).collect());
        self.with_data(data, self.scale, self.growth.clone())
    }

    /// Broadcasts plain values to the logical shape and splits them per
    /// physical element: `[n_elements][N or 1]`, with `per_image` telling
    /// whether they vary across the batch axis.
    fn plain_per_element(&self, values: &ArrayD<f64>) -> Result<(Vec<Vec<f64>>, bool)> {
        let logical = self.shape();
        let b = values.broadcast(IxDyn(&logical)).ok_or_else(|| {
            HeError::Value(format!(
                "values of shape {:?} do not broadcast to {:?}",
                values.shape(),
                logical
            ))
        })?;
        match self.batch {
            None => Ok((b.iter().map(|&v| vec![v]).collect(), false)),
            Some(n) => {
                let per_image = values.ndim() == logical.len() && values.shape()[0] == n && n > 1;
                let phys = self.data.len();
                let flat = b
                    .to_shape((n, phys))
                    .map_err(|e| HeError::Value(e.to_string()))?;
                Ok((
                    (0..phys).map(|j| flat.column(j).to_vec()).collect(),
                    per_image,
                ))
            }
        }
    }

    /// Adds plain values (broadcast to the logical shape) at the tensor's scale.
    pub fn add_plain(&self, values: &ArrayD<f64>) -> Result<CipherTensor> {
        let (vals, _) = self.plain_per_element(values)?;
        let level = self.level()?;
        let extra = self.constant_growth(vals.iter().flatten().cloned())?;
        let elems: Vec<&Element> = self.data.iter().collect();
        let out: Result<Vec<Element>> = elems
            .par_iter()
            .zip(vals.par_iter())
            .map(|(e, v)| self.add_constant_element(e, v, level))
            .collect();
        let data = shaped(self.data.shape(), out?)?;
        let growth = self.growth.add(&extra);
        self.check_fits(&growth, "add")?;
        Ok(self.with_data(data, self.scale, growth))
    }

    /// Adds `polys[k]` to the first polynomial of component k (a new ciphertext,
    /// so that no stale seed of a fresh ciphertext survives).
    pub(crate) fn add_polys(&self, e: &Element, polys: &[Poly]) -> Result<Element> {
        e.iter()
            .zip(polys)
            .enumerate()
            .map(|(k, (ct, p))| {
                if ct[0].ctx() != p.ctx() {
                    return value_err("a constant was encoded for another modulus level");
                }
                let mut parts: Vec<Poly> = ct.iter().cloned().collect();
                parts[0] += p;
                Ok(Ciphertext::new(parts, &self.params.bfv()[k])?)
            })
            .collect()
    }

    /// Batch: refuses a result whose values may exceed the plaintext range
    /// (they would wrap silently). Fractional bounds are reported, not refused.
    fn check_fits(&self, growth: &Growth, what: &str) -> Result<()> {
        check_fits(&self.params, growth, self.scale, what)
    }

    /// Bound of plain constants added at the current scale.
    fn constant_growth(&self, vals: impl Iterator<Item = f64>) -> Result<Growth> {
        match self.params.encoding() {
            Encoding::Batch { .. } => Ok(Growth::Integer(
                vals.map(|v| (v * self.scale).round().abs())
                    .fold(0.0, f64::max),
            )),
            Encoding::Fractional {
                base,
                int_digits,
                frac_digits,
            } => {
                let mut g = vec![0.0; self.params.m()];
                for v in vals {
                    let c = fractional_encode(v, self.params.m(), base, int_digits, frac_digits)?;
                    for (gi, ci) in g.iter_mut().zip(c) {
                        *gi = f64::max(*gi, ci.abs() as f64);
                    }
                }
                Ok(Growth::Poly(g))
            }
        }
    }

    /// `e + v` for one element: `v` has one value (constant over the batch) or N.
    fn add_constant_element(&self, e: &Element, v: &[f64], level: usize) -> Result<Element> {
        let polys = self.constant_polys(v, self.scale, level)?;
        self.add_polys(e, &polys)
    }

    /// What adding the plain value(s) `v` adds to each component's first
    /// polynomial: Δ·m with m the centred encoding of `v` (one value: a
    /// constant over the batch; N values: one per slot).
    pub(crate) fn constant_polys(&self, v: &[f64], scale: f64, level: usize) -> Result<Vec<Poly>> {
        let par = &self.params;
        (0..par.p().len())
            .map(|k| {
                let t = par.p()[k];
                let coeffs: Vec<i64> = match par.encoding() {
                    Encoding::Batch { .. } => {
                        let ints: Vec<i128> =
                            v.iter().map(|&x| (x * scale).round() as i128).collect();
                        if ints.iter().all(|&x| x == ints[0]) {
                            // A constant over all slots is the constant polynomial.
                            vec![centre(reduce_i128(ints[0], t), t)]
                        } else {
                            // Values per slot. fhe.rs will not decode a SIMD plaintext as
                            // a polynomial, but its Δ·m is exact modulo Q for additions
                            // (the uncentred lift costs noise only in products): take it
                            // from the sum with a zero ciphertext.
                            let slots: Vec<u64> = ints.iter().map(|&x| reduce_i128(x, t)).collect();
                            let pt = Plaintext::try_encode(
                                &slots[..],
                                FheEncoding::simd_at_level(level),
                                &par.bfv()[k],
                            )?;
                            let ctx = par.bfv()[k].context_at_level(level)?;
                            let zero = Ciphertext::new(
                                vec![
                                    Poly::zero(ctx, Representation::Ntt),
                                    Poly::zero(ctx, Representation::Ntt),
                                ],
                                &par.bfv()[k],
                            )?;
                            let sum = &zero + &pt;
                            return Ok(sum[0].clone());
                        }
                    }
                    Encoding::Fractional {
                        base,
                        int_digits,
                        frac_digits,
                    } => fractional_encode(v[0], par.m(), base, int_digits, frac_digits)?,
                };
                let ctx = par.bfv()[k].context_at_level(level)?;
                let mut poly =
                    Poly::try_convert_from(&coeffs[..], ctx, true, Representation::PowerBasis)?;
                poly.change_representation(Representation::Ntt);
                let delta: BigUint = ctx.modulus() / BigUint::from(t);
                poly *= &delta;
                Ok(poly)
            })
            .collect()
    }

    /// Multiplies element-wise by plain values broadcast to the logical shape
    /// (batch: they must not vary across the batch axis).
    pub fn mul_plain(&self, values: &ArrayD<f64>) -> Result<CipherTensor> {
        let (vals, per_image) = self.plain_per_element(values)?;
        if per_image {
            return value_err(
                "the batch encoding multiplies every image by the same weights: give values without the batch axis (shape of one image)",
            );
        }
        // One multiplier per distinct value (a scalar times a tensor encodes
        // once), applied in place of each element: no copy of the tensor.
        let mut index: HashMap<u64, u32> = HashMap::new();
        let mut uniq: Vec<f64> = Vec::new();
        let widx: Vec<u32> = vals
            .iter()
            .map(|v| {
                *index.entry(v[0].to_bits()).or_insert_with(|| {
                    uniq.push(v[0]);
                    (uniq.len() - 1) as u32
                })
            })
            .collect();
        // Batch: round(w · 2^weight_scale_bits), the scale grows by that factor.
        // Fractional: the centred encoding of w. The bound is the worst single weight's.
        let level = self.level()?;
        let ctx = self.params.bfv()[0].context_at_level(level)?.clone();
        let (multipliers, scale_out, growth) = match (self.params.encoding(), &self.growth) {
            (
                Encoding::Batch {
                    weight_scale_bits, ..
                },
                Growth::Integer(b),
            ) => {
                let f = (weight_scale_bits as f64).exp2();
                let ints: Vec<f64> = uniq.iter().map(|w| (w * f).round()).collect();
                if let Some(w) = ints.iter().find(|x| x.abs() >= 2f64.powi(62)) {
                    return value_err(format!("multiplier {} is out of range", w / f));
                }
                let worst = ints.iter().fold(0.0, |a: f64, x| a.max(x.abs()));
                let ms = ints
                    .iter()
                    .map(|&x| Multiplier::scalar(x as i64, &ctx))
                    .collect::<Vec<_>>();
                (ms, self.scale * f, Growth::Integer(worst * b))
            }
            (
                Encoding::Fractional {
                    base,
                    int_digits,
                    frac_digits,
                },
                Growth::Poly(g),
            ) => {
                let mut ms = Vec::with_capacity(uniq.len());
                let mut worst = vec![0.0; self.params.m()];
                for &w in &uniq {
                    let c = fractional_encode(w, self.params.m(), base, int_digits, frac_digits)?;
                    for (a, &x) in worst.iter_mut().zip(&c) {
                        *a = f64::max(*a, x.abs() as f64);
                    }
                    ms.push(Multiplier::poly(&c, &ctx)?);
                }
                (ms, 1.0, Growth::Poly(negacyclic_bound(g, &worst)))
            }
            _ => return value_err("growth bound does not match the encoding"),
        };
        check_fits(&self.params, &growth, scale_out, "multiply")?;
        let elems: Vec<&Element> = self.data.iter().collect();
        let out: Result<Vec<Element>> = elems
            .par_iter()
            .zip(widx.par_iter())
            .map(|(e, &u)| {
                e.iter()
                    .enumerate()
                    .map(|(k, ct)| multipliers[u as usize].apply(ct, &self.params.bfv()[k]))
                    .collect()
            })
            .collect();
        let data = shaped(self.data.shape(), out?)?;
        Ok(self.with_data(data, scale_out, growth))
    }

    /// Index of the first axis of one image in `data`: 1 for fractional
    /// (axis 0 is the batch), 0 for batch.
    pub fn image_axes_start(&self) -> usize {
        if self.batch.is_some() || self.data.ndim() == 0 {
            0
        } else {
            1
        }
    }

    /// The shape of one image in `data` (the physical axes after the images').
    pub fn image_shape(&self) -> &[usize] {
        &self.data.shape()[self.image_axes_start()..]
    }

    /// Number of images stored along physical axis 0 (fractional) or 1 (batch).
    pub(crate) fn physical_images(&self) -> usize {
        if self.image_axes_start() == 1 {
            self.data.shape()[0]
        } else {
            1
        }
    }

    /// What the growth bound means against the plaintext modulus.
    pub fn growth_report(&self) -> GrowthReport {
        let base = match self.params.encoding() {
            Encoding::Fractional { base, .. } => base,
            Encoding::Batch { .. } => 2,
        };
        self.growth
            .report(self.params.plaintext_product() as f64, base)
    }

    /// Reshapes the physical array of one image (flatten and friends).
    pub fn reshape_images(&self, image_shape: &[usize]) -> Result<CipherTensor> {
        let start = self.image_axes_start();
        let mut shape = self.data.shape()[..start].to_vec();
        shape.extend_from_slice(image_shape);
        let data = self
            .data
            .clone()
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|_| {
                HeError::Value(format!(
                    "cannot reshape {:?} to {:?} per image",
                    self.shape(),
                    image_shape
                ))
            })?;
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }

    /// Selects `indices` along logical axis `axis` (batch: never axis 0).
    pub fn take(&self, axis: usize, indices: &[usize]) -> Result<CipherTensor> {
        let phys = self.physical_axis(axis)?;
        let len = self.data.shape()[phys];
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(HeError::Value(format!(
                "index {bad} is out of range for axis {axis} of length {len}"
            )));
        }
        let data = self.data.select(Axis(phys), indices);
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }

    /// Removes logical axis `axis` by taking index `i` (batch: never axis 0).
    pub fn index_axis(&self, axis: usize, i: usize) -> Result<CipherTensor> {
        let phys = self.physical_axis(axis)?;
        let len = self.data.shape()[phys];
        if i >= len {
            return Err(HeError::Value(format!(
                "index {i} is out of range for axis {axis} of length {len}"
            )));
        }
        let data = self.data.index_axis(Axis(phys), i).to_owned();
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }

    fn physical_axis(&self, axis: usize) -> Result<usize> {
        let nd = self.shape().len();
        if axis >= nd {
            return Err(HeError::Value(format!(
                "axis {axis} is out of range for a {nd}-dimensional tensor"
            )));
        }
        match self.batch {
            Some(_) if axis == 0 => Err(HeError::Value(
                "the batch axis lives in the ciphertext slots; it only takes ':'".into(),
            )),
            Some(_) => Ok(axis - 1),
            None => Ok(axis),
        }
    }

    /// Stacks single-element tensors into one of physical `shape`.
    pub fn stack(parts: &[CipherTensor], shape: &[usize]) -> Result<CipherTensor> {
        let first = parts
            .first()
            .ok_or_else(|| HeError::Value("nothing to stack".into()))?;
        let mut elems = Vec::with_capacity(parts.len());
        let mut growth = first.growth.clone();
        for p in parts {
            if !Arc::ptr_eq(&p.params, &first.params) || p.key_id != first.key_id {
                return value_err("all ciphertexts must come from the same context and key");
            }
            if p.batch != first.batch || p.scale != first.scale {
                return value_err(
                    "all ciphertexts must hold the same batch size at the same scale",
                );
            }
            if p.data.len() != 1 {
                return value_err("stack takes single ciphertexts");
            }
            growth = growth_max(&growth, &p.growth);
            elems.push(p.data.iter().next().cloned().unwrap_or_default());
        }
        let level0 = first.level()?;
        for p in parts {
            if p.level()? != level0 {
                return value_err("all ciphertexts must be at the same modulus level");
            }
        }
        let data = shaped(shape, elems)?;
        Ok(first.with_data(data, first.scale, growth))
    }

    /// Switches every ciphertext down to the last modulus (smallest to send).
    pub fn switch_to_last_level(&self) -> Result<CipherTensor> {
        self.switch_to_level(self.params.levels() - 1)
    }

    /// Switches every ciphertext down to `level` (a no-op at that level; an
    /// error above the current one: ciphertexts only switch down).
    pub fn switch_to_level(&self, level: usize) -> Result<CipherTensor> {
        let current = self.level()?;
        if level == current {
            return Ok(self.clone());
        }
        if level < current || level >= self.params.levels() {
            return value_err(format!(
                "cannot switch ciphertexts at level {current} to level {level}: levels run from {current} down to {}",
                self.params.levels() - 1
            ));
        }
        let elems: Vec<&Element> = self.data.iter().collect();
        let out: Result<Vec<Element>> = elems
            .par_iter()
            .map(|e| {
                e.iter()
                    .map(|ct| {
                        let mut c = ct.clone();
                        c.switch_to_level(level)?;
                        Ok(c)
                    })
                    .collect()
            })
            .collect();
        let data = shaped(self.data.shape(), out?)?;
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }
}

/// `a` and `b` at the deeper of their two modulus levels (switching down the
/// one that sits higher; the other is borrowed as it is).
pub(crate) fn at_common_level<'a>(
    a: &'a CipherTensor,
    b: &'a CipherTensor,
) -> Result<(Cow<'a, CipherTensor>, Cow<'a, CipherTensor>)> {
    let level = a.level()?.max(b.level()?);
    let down = |t: &'a CipherTensor| -> Result<Cow<'a, CipherTensor>> {
        Ok(if t.level()? < level {
            Cow::Owned(t.switch_to_level(level)?)
        } else {
            Cow::Borrowed(t)
        })
    };
    Ok((down(a)?, down(b)?))
}

/// An array of `shape` from row-major elements.
pub(crate) fn shaped<T>(shape: &[usize], elems: Vec<T>) -> Result<ArrayD<T>> {
    let n = elems.len();
    ArrayD::from_shape_vec(IxDyn(shape), elems)
        .map_err(|_| HeError::Value(format!("{n} elements do not fill shape {shape:?}")))
}

/// Batch encoding: a [`HeError::PlaintextOverflow`] naming `what` when values
/// bounded by `growth` (at `scale`) could wrap modulo the plaintext modulus.
pub(crate) fn check_fits(
    params: &HeParameters,
    growth: &Growth,
    scale: f64,
    what: &str,
) -> Result<()> {
    if let Encoding::Batch { .. } = params.encoding() {
        let r = growth.report(params.plaintext_product() as f64, 2);
        // A calibrated context declares a bound below T/2 (checked when it
        // was made): the worst case may exceed it, real inputs do not.
        if !r.fits() && params.calibrated_bound_bits().is_none() {
            let (bound, limit) = (r.coeff_bound / scale, r.limit / scale);
            return Err(HeError::PlaintextOverflow {
                message: format!(
                    "{what}: values may reach {bound:.3e} at scale {scale} but the plaintext modulus allows ±{limit:.3e}; use smaller scales, more plaintext moduli (CRT) or a rencryption"
                ),
                bound,
                limit,
            });
        }
    }
    Ok(())
}

/// Element-wise maximum of two bounds.
pub fn growth_max(a: &Growth, b: &Growth) -> Growth {
    match (a, b) {
        (Growth::Integer(x), Growth::Integer(y)) => Growth::Integer(x.max(*y)),
        (Growth::Poly(x), Growth::Poly(y)) => {
            Growth::Poly(x.iter().zip(y).map(|(p, q)| p.max(*q)).collect())
        }
        (x, _) => x.clone(),
    }
}

#[cfg(test)]
mod tests {
    use crate::he::context::tests::{make, random, BATCH, FRAC};
    use ndarray::{ArrayD, IxDyn};

    fn quant(x: f64, bits: i32) -> f64 {
        (x * 2f64.powi(bits)).round() / 2f64.powi(bits)
    }

    #[test]
    fn batch_constants_scalar_and_per_image() {
        let ctx = make(2048, vec![], BATCH, None);
        let x = random(&[3, 2], -1.0, 1.0);
        let t = ctx.encrypt(x.view()).unwrap();
        // A scalar (the same in every slot).
        let d = ctx
            .decrypt(&t.add_plain(&ArrayD::from_elem(IxDyn(&[]), 0.5)).unwrap())
            .unwrap();
        for (a, b) in d.iter().zip(x.iter()) {
            assert_eq!(*a, quant(*b, 16) + 0.5);
        }
        // Different values per image (slot).
        let v = ArrayD::from_shape_vec(IxDyn(&[3, 1]), vec![1.0, -2.0, 3.25]).unwrap();
        let d = ctx.decrypt(&t.add_plain(&v).unwrap()).unwrap();
        for i in 0..3 {
            for j in 0..2 {
                assert_eq!(d[[i, j]], quant(x[[i, j]], 16) + v[[i, 0]]);
            }
        }
        // After a product: the constant goes in at the product's scale (2^24:
        // p ≈ 2^26 leaves ±2 here; 3.25 would wrap and is refused).
        let w = ArrayD::from_elem(IxDyn(&[]), -0.5);
        let s = t.mul_plain(&w).unwrap();
        assert!(matches!(
            s.add_plain(&v),
            Err(crate::he::HeError::PlaintextOverflow { .. })
        ));
        let v = v.mapv(|a| a / 4.0);
        let d = ctx.decrypt(&s.add_plain(&v).unwrap()).unwrap();
        for i in 0..3 {
            for j in 0..2 {
                assert_eq!(d[[i, j]], quant(x[[i, j]], 16) * -0.5 + v[[i, 0]]);
            }
        }
        let budget = ctx.noise_budget(&t.add_plain(&v).unwrap()).unwrap();
        // Sums are bounded too.
        let big = ctx
            .encrypt(ArrayD::from_elem(IxDyn(&[2, 1]), 100.0).view())
            .unwrap();
        assert!(big.add(&big).is_ok());
        let mut s = big.clone();
        let mut refused = false;
        for _ in 0..10 {
            match s.add(&s) {
                Ok(n) => s = n,
                Err(crate::he::HeError::PlaintextOverflow { .. }) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused);
        assert!(
            budget >= ctx.noise_budget(&t).unwrap() - 1,
            "adding a constant must cost (almost) no budget"
        );
    }

    #[test]
    fn fractional_constants() {
        let ctx = make(2048, vec![65537], FRAC, None);
        let x = random(&[2, 2], -4.0, 4.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let v = ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1.75, 1e6]).unwrap();
        let d = ctx.decrypt(&t.add_plain(&v).unwrap()).unwrap();
        for i in 0..2 {
            for j in 0..2 {
                assert!((d[[i, j]] - (x[[i, j]] + v[[j]])).abs() < 1e-8);
            }
        }
        let sq = ctx.square(t.clone()).unwrap();
        let d = ctx.decrypt(&sq.add_plain(&v).unwrap()).unwrap();
        for i in 0..2 {
            for j in 0..2 {
                assert!((d[[i, j]] - (x[[i, j]].powi(2) + v[[j]])).abs() < 1e-7);
            }
        }
    }
}
