//! CipherTensor: an n-dimensional array of ciphertexts with its encoding
//! metadata, and the element-wise and affine operations the layers need.

use std::sync::Arc;

use std::borrow::Cow;
use std::collections::HashMap;

use fhe::bfv::{Ciphertext, Encoding as FheEncoding, Plaintext};
use fhe_math::rq::{traits::TryConvertFrom, Poly, Representation};
use fhe_traits::FheEncoder;
use num_bigint::BigUint;
use ndarray::{ArrayD, Axis, IxDyn};
use rayon::prelude::*;

use super::encoding::{centre, fractional_encode, reduce_i128};
use super::error::{value_err, HeError, Result};
use super::growth::{Growth, GrowthReport};
use super::kernel::{weighted_sum, Prepared};
use super::params::{Encoding, HeParameters};

/// One encrypted value (fractional) or one slot vector (batch): a ciphertext
/// per plaintext modulus (several only when CRT is in use).
pub type Element = Vec<Ciphertext>;

/// An array of ciphertexts and what it takes to read them.
#[derive(Debug, Clone)]
pub struct CipherTensor {
    /// Physical array: the logical shape (fractional) or the logical shape
    /// without the batch axis (batch, where the batch lives in the slots).
    pub data: ArrayD<Element>,
    /// Batch encoding: the number of images N in the slots. `None` for fractional.
    pub batch: Option<usize>,
    /// Batch encoding: slots hold round(value · scale). 1 for fractional.
    pub scale: f64,
    /// Bound on the plaintext magnitudes.
    pub growth: Growth,
    /// The parameters the ciphertexts belong to.
    pub params: Arc<HeParameters>,
    /// The key the ciphertexts were made under.
    pub key_id: [u8; 16],
}

/// A linear map applied to every image independently: the shared form of
/// convolution, linear layers and pooling.
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
}

impl CipherTensor {
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
        let first = self.data.iter().next().ok_or_else(|| HeError::Value("empty tensor".into()))?;
        Ok(self.params.bfv[0].level_of_context(first[0][0].ctx())?)
    }

    /// Number of ciphertexts it holds.
    pub fn n_ciphertexts(&self) -> usize {
        self.data.len() * self.params.p.len()
    }

    fn with_data(&self, data: ArrayD<Element>, scale: f64, growth: Growth) -> CipherTensor {
        CipherTensor { data, batch: self.batch, scale, growth, params: self.params.clone(), key_id: self.key_id }
    }

    fn check_same(&self, other: &CipherTensor) -> Result<()> {
        if !Arc::ptr_eq(&self.params, &other.params) {
            return value_err(if self.params.fingerprint != other.params.fingerprint {
                "the tensors belong to different parameters"
            } else {
                "the tensors belong to different contexts; load both with the same Context"
            });
        }
        if self.key_id != other.key_id {
            return value_err("the tensors were encrypted under different keys");
        }
        if self.batch != other.batch {
            return value_err(format!("batch sizes differ: {:?} and {:?}", self.batch, other.batch));
        }
        if self.data.shape() != other.data.shape() {
            return value_err(format!("shapes differ: {:?} and {:?}", self.shape(), other.shape()));
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

    fn zip_map(&self, other: &CipherTensor, f: impl Fn(&Ciphertext, &Ciphertext) -> Ciphertext + Sync) -> Result<ArrayD<Element>> {
        let a: Vec<&Element> = self.data.iter().collect();
        let b: Vec<&Element> = other.data.iter().collect();
        let out: Vec<Element> = a.par_iter().zip(b.par_iter()).map(|(x, y)| x.iter().zip(y.iter()).map(|(cx, cy)| f(cx, cy)).collect()).collect();
        shaped(self.data.shape(), out)
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
    fn combine(&self, other: &CipherTensor, what: &str, f: impl Fn(&Ciphertext, &Ciphertext) -> Ciphertext + Sync) -> Result<CipherTensor> {
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
        let b = values
            .broadcast(IxDyn(&logical))
            .ok_or_else(|| HeError::Value(format!("values of shape {:?} do not broadcast to {:?}", values.shape(), logical)))?;
        match self.batch {
            None => Ok((b.iter().map(|&v| vec![v]).collect(), false)),
            Some(n) => {
                let per_image = values.ndim() == logical.len() && values.shape()[0] == n && n > 1;
                let phys = self.data.len();
                let flat = b.to_shape((n, phys)).map_err(|e| HeError::Value(e.to_string()))?;
                Ok(((0..phys).map(|j| flat.column(j).to_vec()).collect(), per_image))
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

    /// Batch: refuses a result whose values may exceed the plaintext range
    /// (they would wrap silently). Fractional bounds are reported, not refused.
    fn check_fits(&self, growth: &Growth, what: &str) -> Result<()> {
        check_fits(&self.params, growth, self.scale, what)
    }

    /// Bound of plain constants added at the current scale.
    fn constant_growth(&self, vals: impl Iterator<Item = f64>) -> Result<Growth> {
        match self.params.encoding {
            Encoding::Batch { .. } => Ok(Growth::Integer(vals.map(|v| (v * self.scale).round().abs()).fold(0.0, f64::max))),
            Encoding::Fractional { base, int_digits, frac_digits } => {
                let mut g = vec![0.0; self.params.m];
                for v in vals {
                    let c = fractional_encode(v, self.params.m, base, int_digits, frac_digits)?;
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
        let polys = self.constant_polys(v, level)?;
        add_polys(e, &polys, &self.params)
    }

    /// What adding the plain value(s) `v` adds to each component's first
    /// polynomial: Δ·m with m the centred encoding of `v` (one value: a
    /// constant over the batch; N values: one per slot).
    fn constant_polys(&self, v: &[f64], level: usize) -> Result<Vec<Poly>> {
        let par = &self.params;
        (0..par.p.len())
            .map(|k| {
                let t = par.p[k];
                let coeffs: Vec<i64> = match par.encoding {
                    Encoding::Batch { .. } => {
                        let ints: Vec<i128> = v.iter().map(|&x| (x * self.scale).round() as i128).collect();
                        if ints.iter().all(|&x| x == ints[0]) {
                            // A constant over all slots is the constant polynomial.
                            vec![centre(reduce_i128(ints[0], t), t)]
                        } else {
                            // Values per slot. fhe.rs will not decode a SIMD plaintext as
                            // a polynomial, but its Δ·m is exact modulo Q for additions
                            // (the uncentred lift costs noise only in products): take it
                            // from the sum with a zero ciphertext.
                            let slots: Vec<u64> = ints.iter().map(|&x| reduce_i128(x, t)).collect();
                            let pt = Plaintext::try_encode(&slots[..], FheEncoding::simd_at_level(level), &par.bfv[k])?;
                            let ctx = par.bfv[k].context_at_level(level)?;
                            let zero = Ciphertext::new(vec![Poly::zero(ctx, Representation::Ntt), Poly::zero(ctx, Representation::Ntt)], &par.bfv[k])?;
                            let sum = &zero + &pt;
                            return Ok(sum[0].clone());
                        }
                    }
                    Encoding::Fractional { base, int_digits, frac_digits } => {
                        fractional_encode(v[0], par.m, base, int_digits, frac_digits)?
                    }
                };
                let ctx = par.bfv[k].context_at_level(level)?;
                let mut poly = Poly::try_convert_from(&coeffs[..], ctx, true, Representation::PowerBasis)?;
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
        // The growth of an element-wise product is the worst single weight.
        let map = AffineMap {
            in_shape: vec![1],
            out_shape: vec![uniq.len()],
            terms: (0..uniq.len() as u32).map(|u| vec![(0, u)]).collect(),
            weights: uniq,
            divisor: 1.0,
            bias: vec![],
        };
        let (scale_out, weight_factor) = self.affine_scale(&map);
        let growth = self.affine_growth(&map, scale_out, weight_factor)?;
        check_fits(&self.params, &growth, scale_out, "multiply")?;
        let prepared = prepare_weights(&self.params, &map, self.level()?)?;
        let elems: Vec<&Element> = self.data.iter().collect();
        let out: Result<Vec<Element>> = elems
            .par_iter()
            .zip(widx.par_iter())
            .map(|(e, &u)| {
                e.iter()
                    .enumerate()
                    .map(|(k, ct)| weighted_sum(&[ct], &[&prepared[u as usize]], &self.params.bfv[k]))
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

    /// Number of images stored along physical axis 0 (fractional) or 1 (batch).
    fn physical_images(&self) -> usize {
        if self.image_axes_start() == 1 {
            self.data.shape()[0]
        } else {
            1
        }
    }

    /// Applies `map` to every image. `prepared` comes from [`prepare_weights`]
    /// at this tensor's level. `name` names the layer in errors.
    pub fn apply_affine(&self, map: &AffineMap, prepared: &[Prepared], name: &str) -> Result<CipherTensor> {
        let start = self.image_axes_start();
        let img_shape = &self.data.shape()[start..];
        if img_shape != map.in_shape.as_slice() {
            return value_err(format!(
                "{name}: expects input of shape {:?} per image, got {:?}",
                map.in_shape, img_shape
            ));
        }
        if prepared.len() != map.weights.len() {
            return value_err(format!("{name}: weights were prepared for another map"));
        }
        let level = self.level()?;
        let (scale_out, weight_factor) = self.affine_scale(map);
        let growth = self.affine_growth(map, scale_out, weight_factor)?;
        check_fits(&self.params, &growth, scale_out, name)?;
        let imgs = self.physical_images();
        let in_per_img: usize = map.in_shape.iter().product::<usize>().max(1);
        let out_per_img: usize = map.out_shape.iter().product::<usize>().max(1);
        let flat: Vec<&Element> = self.data.iter().collect();
        let ncomp = self.params.p.len();
        let jobs: Vec<(usize, usize)> = (0..imgs).flat_map(|i| (0..out_per_img).map(move |o| (i, o))).collect();
        let out: Result<Vec<Element>> = jobs
            .par_iter()
            .map(|&(img, o)| {
                let terms = &map.terms[o];
                let base = img * in_per_img;
                (0..ncomp)
                    .map(|k| {
                        if terms.is_empty() {
                            // No input reaches this output (all padding): 0 · x, a valid encryption of 0.
                            let zero = Prepared::scalar(0, flat[base][k][0].ctx());
                            return weighted_sum(&[&flat[base][k]], &[&zero], &self.params.bfv[k]);
                        }
                        let (cts, ws): (Vec<&Ciphertext>, Vec<&Prepared>) =
                            terms.iter().map(|&(i, w)| (&flat[base + i as usize][k], &prepared[w as usize])).unzip();
                        weighted_sum(&cts, &ws, &self.params.bfv[k])
                    })
                    .collect::<Result<Element>>()
            })
            .collect();
        let mut out = out?;
        if !map.bias.is_empty() {
            // One encoded bias per distinct value (per output channel), reused at every position.
            let tmp = self.with_data(ArrayD::from_elem(IxDyn(&[]), flat[0].clone()), scale_out, self.growth.clone());
            let mut encoded: HashMap<u64, Vec<Poly>> = HashMap::new();
            for &b in &map.bias {
                if let std::collections::hash_map::Entry::Vacant(slot) = encoded.entry(b.to_bits()) {
                    slot.insert(tmp.constant_polys(&[b], level)?);
                }
            }
            out = out
                .into_par_iter()
                .enumerate()
                .map(|(j, e)| add_polys(&e, &encoded[&map.bias[j % out_per_img].to_bits()], &self.params))
                .collect::<Result<Vec<Element>>>()?;
        }
        let mut shape = if start == 1 { vec![imgs] } else { vec![] };
        shape.extend_from_slice(&map.out_shape);
        let data = shaped(&shape, out)?;
        Ok(self.with_data(data, scale_out, growth))
    }

    /// Batch: the scale after `map` and the factor its weights were scaled by
    /// (2^weight_scale_bits, or 1 for a divided map, whose divisor joins the
    /// scale). Fractional: (1, 1).
    fn affine_scale(&self, map: &AffineMap) -> (f64, f64) {
        match self.params.encoding {
            Encoding::Batch { .. } if map.divisor != 1.0 => (self.scale * map.divisor, 1.0),
            Encoding::Batch { weight_scale_bits, .. } => {
                let f = (weight_scale_bits as f64).exp2();
                (self.scale * f, f)
            }
            Encoding::Fractional { .. } => (1.0, 1.0),
        }
    }

    fn affine_growth(&self, map: &AffineMap, scale_out: f64, weight_factor: f64) -> Result<Growth> {
        match (&self.growth, self.params.encoding) {
            (Growth::Integer(b), Encoding::Batch { .. }) => {
                let mut worst: f64 = 0.0;
                for (o, terms) in map.terms.iter().enumerate() {
                    let s: f64 = terms.iter().map(|&(_, w)| (map.weights[w as usize] * weight_factor).round().abs()).sum();
                    let bias = map.bias.get(o).map(|&x| (x * scale_out).round().abs()).unwrap_or(0.0);
                    worst = worst.max(s * b + bias);
                }
                Ok(Growth::Integer(worst))
            }
            (Growth::Poly(g), Encoding::Fractional { base, int_digits, frac_digits }) => {
                let m = self.params.m;
                let enc: Vec<Vec<(usize, f64)>> = map
                    .weights
                    .iter()
                    .map(|&w| {
                        fractional_encode(w / map.divisor, m, base, int_digits, frac_digits)
                            .map(|c| c.iter().enumerate().filter(|(_, &x)| x != 0).map(|(i, &x)| (i, x.abs() as f64)).collect())
                    })
                    .collect::<Result<_>>()?;
                let mut s = vec![0.0; m];
                let mut per_out = vec![0.0; m];
                for terms in &map.terms {
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
                let mut out = super::growth::negacyclic_bound(g, &s);
                if !map.bias.is_empty() {
                    if let Growth::Poly(bg) = self.constant_growth(map.bias.iter().cloned())? {
                        for (a, b) in out.iter_mut().zip(bg) {
                            *a += b;
                        }
                    }
                }
                Ok(Growth::Poly(out))
            }
            _ => value_err("growth bound does not match the encoding"),
        }
    }

    /// What the growth bound means against the plaintext modulus.
    pub fn growth_report(&self) -> GrowthReport {
        let base = match self.params.encoding {
            Encoding::Fractional { base, .. } => base,
            Encoding::Batch { .. } => 2,
        };
        self.growth.report(self.params.plaintext_product() as f64, base)
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
            .map_err(|_| HeError::Value(format!("cannot reshape {:?} to {:?} per image", self.shape(), image_shape)))?;
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }

    /// Selects `indices` along logical axis `axis` (batch: never axis 0).
    pub fn take(&self, axis: usize, indices: &[usize]) -> Result<CipherTensor> {
        let phys = self.physical_axis(axis)?;
        let len = self.data.shape()[phys];
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(HeError::Value(format!("index {bad} is out of range for axis {axis} of length {len}")));
        }
        let data = self.data.select(Axis(phys), indices);
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }

    /// Removes logical axis `axis` by taking index `i` (batch: never axis 0).
    pub fn index_axis(&self, axis: usize, i: usize) -> Result<CipherTensor> {
        let phys = self.physical_axis(axis)?;
        let len = self.data.shape()[phys];
        if i >= len {
            return Err(HeError::Value(format!("index {i} is out of range for axis {axis} of length {len}")));
        }
        let data = self.data.index_axis(Axis(phys), i).to_owned();
        Ok(self.with_data(data, self.scale, self.growth.clone()))
    }

    fn physical_axis(&self, axis: usize) -> Result<usize> {
        let nd = self.shape().len();
        if axis >= nd {
            return Err(HeError::Value(format!("axis {axis} is out of range for a {nd}-dimensional tensor")));
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
        let first = parts.first().ok_or_else(|| HeError::Value("nothing to stack".into()))?;
        let mut elems = Vec::with_capacity(parts.len());
        let mut growth = first.growth.clone();
        for p in parts {
            if !Arc::ptr_eq(&p.params, &first.params) || p.key_id != first.key_id {
                return value_err("all ciphertexts must come from the same context and key");
            }
            if p.batch != first.batch || p.scale != first.scale {
                return value_err("all ciphertexts must hold the same batch size at the same scale");
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
pub(crate) fn at_common_level<'a>(a: &'a CipherTensor, b: &'a CipherTensor) -> Result<(Cow<'a, CipherTensor>, Cow<'a, CipherTensor>)> {
    let level = a.level()?.max(b.level()?);
    let down = |t: &'a CipherTensor| -> Result<Cow<'a, CipherTensor>> {
        Ok(if t.level()? < level { Cow::Owned(t.switch_to_level(level)?) } else { Cow::Borrowed(t) })
    };
    Ok((down(a)?, down(b)?))
}

/// An array of `shape` from row-major elements.
pub(crate) fn shaped<T>(shape: &[usize], elems: Vec<T>) -> Result<ArrayD<T>> {
    let n = elems.len();
    ArrayD::from_shape_vec(IxDyn(shape), elems).map_err(|_| HeError::Value(format!("{n} elements do not fill shape {shape:?}")))
}

/// Adds `polys[k]` to the first polynomial of component k (a new ciphertext,
/// so that no stale seed of a fresh ciphertext survives).
fn add_polys(e: &Element, polys: &[Poly], params: &HeParameters) -> Result<Element> {
    e.iter()
        .zip(polys)
        .enumerate()
        .map(|(k, (ct, p))| {
            if ct[0].ctx() != p.ctx() {
                return value_err("a constant was encoded for another modulus level");
            }
            let mut parts: Vec<Poly> = ct.iter().cloned().collect();
            parts[0] += p;
            Ok(Ciphertext::new(parts, &params.bfv[k])?)
        })
        .collect()
}

/// Batch encoding: a [`HeError::PlaintextOverflow`] naming `what` when values
/// bounded by `growth` (at `scale`) could wrap modulo the plaintext modulus.
pub(crate) fn check_fits(params: &HeParameters, growth: &Growth, scale: f64, what: &str) -> Result<()> {
    if let Encoding::Batch { .. } = params.encoding {
        let r = growth.report(params.plaintext_product() as f64, 2);
        if !r.fits() {
            return Err(HeError::PlaintextOverflow(format!(
                "{what}: values may reach {:.3e} at scale {scale} but the plaintext modulus allows ±{:.3e}; use smaller scales, more plaintext moduli (CRT) or a rencryption",
                r.coeff_bound / scale,
                r.limit / scale
            )));
        }
    }
    Ok(())
}

/// Element-wise maximum of two bounds.
pub fn growth_max(a: &Growth, b: &Growth) -> Growth {
    match (a, b) {
        (Growth::Integer(x), Growth::Integer(y)) => Growth::Integer(x.max(*y)),
        (Growth::Poly(x), Growth::Poly(y)) => Growth::Poly(x.iter().zip(y).map(|(p, q)| p.max(*q)).collect()),
        (x, _) => x.clone(),
    }
}

/// Encodes an affine map's weights for ciphertexts at `level`.
pub fn prepare_weights(params: &HeParameters, map: &AffineMap, level: usize) -> Result<Vec<Prepared>> {
    let ctx = params.bfv[0].context_at_level(level)?.clone();
    map.weights
        .par_iter()
        .map(|&w| match params.encoding {
            // Batch: round(w · 2^weight_scale_bits), the scale grows by that
            // factor; a divided map (pooling) keeps integer weights and puts the
            // divisor into the scale instead.
            Encoding::Batch { weight_scale_bits, .. } => {
                let x = if map.divisor != 1.0 {
                    if w.fract() != 0.0 {
                        return value_err("a divided map needs integer weights in the batch encoding");
                    }
                    w
                } else {
                    (w * (weight_scale_bits as f64).exp2()).round()
                };
                if !x.is_finite() || x.abs() >= 2f64.powi(62) {
                    return value_err(format!("weight {w} is out of range"));
                }
                Ok(Prepared::scalar(x as i64, &ctx))
            }
            // Fractional: the (centred) encoding of the real multiplier.
            Encoding::Fractional { base, int_digits, frac_digits } => {
                Prepared::poly(&fractional_encode(w / map.divisor, params.m, base, int_digits, frac_digits)?, &ctx)
            }
        })
        .collect()
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
        let d = ctx.decrypt(&t.add_plain(&ArrayD::from_elem(IxDyn(&[]), 0.5)).unwrap()).unwrap();
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
        assert!(matches!(s.add_plain(&v), Err(crate::he::HeError::PlaintextOverflow(_))));
        let v = v.mapv(|a| a / 4.0);
        let d = ctx.decrypt(&s.add_plain(&v).unwrap()).unwrap();
        for i in 0..3 {
            for j in 0..2 {
                assert_eq!(d[[i, j]], quant(x[[i, j]], 16) * -0.5 + v[[i, 0]]);
            }
        }
        let budget = ctx.noise_budget(&t.add_plain(&v).unwrap()).unwrap();
        // Sums are bounded too.
        let big = ctx.encrypt(ArrayD::from_elem(IxDyn(&[2, 1]), 100.0).view()).unwrap();
        assert!(big.add(&big).is_ok());
        let mut s = big.clone();
        let mut refused = false;
        for _ in 0..10 {
            match s.add(&s) {
                Ok(n) => s = n,
                Err(crate::he::HeError::PlaintextOverflow(_)) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused);
        assert!(budget >= ctx.noise_budget(&t).unwrap() - 1, "adding a constant must cost (almost) no budget");
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
        let sq = ctx.square(&t).unwrap();
        let d = ctx.decrypt(&sq.add_plain(&v).unwrap()).unwrap();
        for i in 0..2 {
            for j in 0..2 {
                assert!((d[[i, j]] - (x[[i, j]].powi(2) + v[[j]])).abs() < 1e-7);
            }
        }
    }
}
