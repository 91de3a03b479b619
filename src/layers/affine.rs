//! Convolutions, linear layers and average pooling as [`AffineMap`]s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::affine_map::AffineMap;
use crate::he::{CipherTensor, HeError, Multiplier, Result};

/// The shape of an affine layer; the map's terms are derived from it and the input shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Geometry {
    /// torch.nn.Conv2d: weights [out, in/groups, kh, kw].
    Conv2d {
        /// Output channels.
        out_channels: usize,
        /// Input channels.
        in_channels: usize,
        /// Kernel (height, width).
        kernel: (usize, usize),
        /// Stride (h, w).
        stride: (usize, usize),
        /// Zero padding (h, w).
        padding: (usize, usize),
        /// Dilation (h, w).
        dilation: (usize, usize),
        /// Groups.
        groups: usize,
    },
    /// torch.nn.Conv1d: weights [out, in/groups, k]; input [C, L].
    Conv1d {
        /// Output channels.
        out_channels: usize,
        /// Input channels.
        in_channels: usize,
        /// Kernel length.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding.
        padding: usize,
        /// Dilation.
        dilation: usize,
        /// Groups.
        groups: usize,
    },
    /// torch.nn.Linear: weights [out, in]; any input whose size is `in` (flattened).
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
    },
    /// torch.nn.AvgPool2d with count_include_pad=True (torch's default).
    AvgPool2d {
        /// Kernel (h, w).
        kernel: (usize, usize),
        /// Stride (h, w).
        stride: (usize, usize),
        /// Zero padding (h, w).
        padding: (usize, usize),
    },
}

/// Output length along one axis (None: the input is shorter than the
/// kernel's span). Needs k, s, d ≥ 1 ([`Geometry::check`]).
fn out_len(n: usize, k: usize, s: usize, p: usize, d: usize) -> Option<usize> {
    let span = d * (k - 1) + 1;
    (n + 2 * p >= span).then(|| (n + 2 * p - span) / s + 1)
}

/// The shortest input along one axis that has an output.
fn min_len(k: usize, p: usize, d: usize) -> usize {
    (d * (k - 1) + 1).saturating_sub(2 * p).max(1)
}

impl Geometry {
    /// torch's name of the layer.
    pub fn name(&self) -> &'static str {
        match self {
            Geometry::Conv2d { .. } => "Conv2d",
            Geometry::Conv1d { .. } => "Conv1d",
            Geometry::Linear { .. } => "Linear",
            Geometry::AvgPool2d { .. } => "AvgPool2d",
        }
    }

    /// Refuses geometries no input fits: zero kernels, strides or
    /// dilations, groups that do not divide the channels.
    pub fn check(&self) -> Result<()> {
        let positive = |values: &[usize], what: &str| {
            if values.contains(&0) {
                Err(HeError::Value(format!(
                    "{}: {what} must be positive",
                    self.name()
                )))
            } else {
                Ok(())
            }
        };
        let groups_divide = |groups: usize, in_channels: usize, out_channels: usize| {
            if groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
                Err(HeError::Value(format!(
                    "{}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}",
                    self.name()
                )))
            } else {
                Ok(())
            }
        };
        match *self {
            Geometry::Conv2d {
                out_channels,
                in_channels,
                kernel,
                stride,
                dilation,
                groups,
                ..
            } => {
                groups_divide(groups, in_channels, out_channels)?;
                positive(
                    &[
                        kernel.0, kernel.1, stride.0, stride.1, dilation.0, dilation.1,
                    ],
                    "kernel, stride and dilation",
                )
            }
            Geometry::Conv1d {
                out_channels,
                in_channels,
                kernel,
                stride,
                dilation,
                groups,
                ..
            } => {
                groups_divide(groups, in_channels, out_channels)?;
                positive(&[kernel, stride, dilation], "kernel, stride and dilation")
            }
            Geometry::Linear { .. } => Ok(()),
            Geometry::AvgPool2d { kernel, stride, .. } => positive(
                &[kernel.0, kernel.1, stride.0, stride.1],
                "kernel and stride",
            ),
        }
    }

    /// Output shape of one image.
    pub fn output_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        self.check()?;
        let bad = |want: &str| {
            Err(HeError::Value(format!(
                "{}: expects input {want} per image, got {in_shape:?}",
                self.name()
            )))
        };
        match *self {
            Geometry::Conv2d {
                out_channels,
                in_channels,
                kernel,
                stride,
                padding,
                dilation,
                ..
            } => {
                if in_shape.len() != 3 || in_shape[0] != in_channels {
                    return bad(&format!("[{in_channels}, H, W]"));
                }
                match (
                    out_len(in_shape[1], kernel.0, stride.0, padding.0, dilation.0),
                    out_len(in_shape[2], kernel.1, stride.1, padding.1, dilation.1),
                ) {
                    (Some(h), Some(w)) => Ok(vec![out_channels, h, w]),
                    _ => bad(&format!(
                        "[{in_channels}, H, W] with H ≥ {} and W ≥ {} (kernel {kernel:?}, padding {padding:?}, dilation {dilation:?})",
                        min_len(kernel.0, padding.0, dilation.0),
                        min_len(kernel.1, padding.1, dilation.1)
                    )),
                }
            }
            Geometry::Conv1d {
                out_channels,
                in_channels,
                kernel,
                stride,
                padding,
                dilation,
                ..
            } => {
                if in_shape.len() != 2 || in_shape[0] != in_channels {
                    return bad(&format!("[{in_channels}, L]"));
                }
                match out_len(in_shape[1], kernel, stride, padding, dilation) {
                    Some(l) => Ok(vec![out_channels, l]),
                    None => bad(&format!(
                        "[{in_channels}, L] with L ≥ {} (kernel {kernel}, padding {padding}, dilation {dilation})",
                        min_len(kernel, padding, dilation)
                    )),
                }
            }
            Geometry::Linear {
                in_features,
                out_features,
            } => {
                if in_shape.iter().product::<usize>() != in_features {
                    return bad(&format!("of {in_features} features"));
                }
                Ok(vec![out_features])
            }
            Geometry::AvgPool2d {
                kernel,
                stride,
                padding,
            } => {
                if in_shape.len() != 3 {
                    return bad("[C, H, W]");
                }
                match (
                    out_len(in_shape[1], kernel.0, stride.0, padding.0, 1),
                    out_len(in_shape[2], kernel.1, stride.1, padding.1, 1),
                ) {
                    (Some(h), Some(w)) => Ok(vec![in_shape[0], h, w]),
                    _ => bad(&format!(
                        "[C, H, W] with H ≥ {} and W ≥ {} (kernel {kernel:?}, padding {padding:?})",
                        min_len(kernel.0, padding.0, 1),
                        min_len(kernel.1, padding.1, 1)
                    )),
                }
            }
        }
    }
}

/// An affine layer: geometry, weights, bias, and caches of its maps and encoded weights.
pub struct Affine {
    geometry: Geometry,
    weights: Vec<f64>,
    bias: Vec<f64>,
    weight_scale_bits: Option<u32>,
    maps: Mutex<HashMap<Vec<usize>, Arc<AffineMap>>>,
    prepared: Mutex<HashMap<([u8; 16], usize), Arc<Vec<Multiplier>>>>,
}

impl Affine {
    /// Validates the weights against the geometry.
    pub fn new(geometry: Geometry, weights: Vec<f64>, bias: Option<Vec<f64>>) -> Result<Affine> {
        geometry.check()?;
        let (expected, outs) = match geometry {
            Geometry::Conv2d {
                out_channels,
                in_channels,
                kernel,
                groups,
                ..
            } => (
                out_channels * (in_channels / groups) * kernel.0 * kernel.1,
                out_channels,
            ),
            Geometry::Conv1d {
                out_channels,
                in_channels,
                kernel,
                groups,
                ..
            } => (out_channels * (in_channels / groups) * kernel, out_channels),
            Geometry::Linear {
                in_features,
                out_features,
            } => (in_features * out_features, out_features),
            Geometry::AvgPool2d { .. } => (1, 0),
        };
        if weights.len() != expected {
            return Err(HeError::Value(format!(
                "{}: expected {expected} weights, got {}",
                geometry.name(),
                weights.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(HeError::Value(format!(
                "{}: weight {w} is not finite",
                geometry.name()
            )));
        }
        let bias = bias.unwrap_or_default();
        if !bias.is_empty() && bias.len() != outs {
            return Err(HeError::Value(format!(
                "{}: expected {outs} biases, got {}",
                geometry.name(),
                bias.len()
            )));
        }
        Ok(Affine {
            geometry,
            weights,
            bias,
            weight_scale_bits: None,
            maps: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
        })
    }

    /// The layer with a weight scale of its own (batch encoding: weights
    /// become round(w · 2^bits) instead of the context's
    /// `weight_scale_bits`), for contexts with per-layer weight scales.
    /// Average pooling has no weight scale (its divisor joins the scale).
    pub fn with_weight_scale_bits(mut self, bits: u32) -> Result<Affine> {
        if matches!(self.geometry, Geometry::AvgPool2d { .. }) {
            return Err(HeError::Value(
                "AvgPool2d has no weight scale (its divisor joins the scale)".into(),
            ));
        }
        if bits > 40 {
            return Err(HeError::Value(format!(
                "weight_scale_bits must be at most 40, got {bits}"
            )));
        }
        self.weight_scale_bits = Some(bits);
        Ok(self)
    }

    /// The layer's own weight scale, if it has one (else the context's).
    pub fn weight_scale_bits(&self) -> Option<u32> {
        self.weight_scale_bits
    }

    /// The layer's shape.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Weights, row-major in torch's layout (AvgPool2d: `[1.0]`).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Bias per output channel / feature (empty for none).
    pub fn bias(&self) -> &[f64] {
        &self.bias
    }

    /// The map of the output with the largest Σ|w| over its inputs, all of
    /// which are one probe value, with |w| for every weight and |b| for the
    /// bias: the worst case of a layer's plaintext growth and noise (copies
    /// of one value add up coherently; signed weights could cancel and leave
    /// a ciphertext far less noisy than any real one), without padding. Its
    /// input is `[terms]`, its output one element.
    pub fn probe_map(&self) -> AffineMap {
        self.probe_map_with(true)
    }

    /// [`Affine::probe_map`], with the weights' signs kept when `abs` is false.
    fn probe_map_with(&self, abs: bool) -> AffineMap {
        let (rows, divisor): (Vec<Vec<u32>>, f64) = match self.geometry {
            Geometry::Conv2d { out_channels, .. } | Geometry::Conv1d { out_channels, .. } => {
                let per = self.weights.len() / out_channels.max(1);
                (
                    (0..out_channels)
                        .map(|o| (o * per..(o + 1) * per).map(|w| w as u32).collect())
                        .collect(),
                    1.0,
                )
            }
            Geometry::Linear {
                in_features,
                out_features,
            } => (
                (0..out_features)
                    .map(|o| {
                        (o * in_features..(o + 1) * in_features)
                            .map(|w| w as u32)
                            .collect()
                    })
                    .collect(),
                1.0,
            ),
            Geometry::AvgPool2d {
                kernel: (kh, kw), ..
            } => (vec![vec![0; kh * kw]], (kh * kw) as f64),
        };
        let weight_sum = |r: &Vec<u32>| {
            r.iter()
                .map(|&w| self.weights[w as usize].abs())
                .sum::<f64>()
        };
        let worst = (0..rows.len())
            .max_by(|&a, &b| weight_sum(&rows[a]).total_cmp(&weight_sum(&rows[b])))
            .unwrap_or(0);
        let row = rows.into_iter().nth(worst).unwrap_or_default();
        AffineMap {
            in_shape: vec![row.len()],
            out_shape: vec![1],
            terms: vec![row
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .collect()],
            weights: self
                .weights
                .iter()
                .map(|&w| if abs { w.abs() } else { w })
                .collect(),
            divisor,
            weight_scale_bits: self.weight_scale_bits,
            bias: self
                .bias
                .get(worst)
                .map(|&b| vec![if abs { b.abs() } else { b }])
                .unwrap_or_default(),
        }
    }

    fn build_map(&self, in_shape: &[usize]) -> Result<AffineMap> {
        let out_shape = self.geometry.output_shape(in_shape)?;
        let mut terms: Vec<Vec<(u32, u32)>> = Vec::new();
        let mut bias = Vec::new();
        let mut divisor = 1.0;
        match self.geometry {
            Geometry::Conv2d {
                out_channels,
                in_channels,
                kernel: (kh, kw),
                stride,
                padding,
                dilation,
                groups,
            } => {
                let (h, w) = (in_shape[1] as isize, in_shape[2] as isize);
                let (ho, wo) = (out_shape[1], out_shape[2]);
                let (cin_g, cout_g) = (in_channels / groups, out_channels / groups);
                for o in 0..out_channels {
                    let g = o / cout_g;
                    for y in 0..ho {
                        for x in 0..wo {
                            let mut t = Vec::new();
                            for ci in 0..cin_g {
                                let c = g * cin_g + ci;
                                for ky in 0..kh {
                                    let iy = (y * stride.0 + ky * dilation.0) as isize
                                        - padding.0 as isize;
                                    if iy < 0 || iy >= h {
                                        continue;
                                    }
                                    for kx in 0..kw {
                                        let ix = (x * stride.1 + kx * dilation.1) as isize
                                            - padding.1 as isize;
                                        if ix < 0 || ix >= w {
                                            continue;
                                        }
                                        let input = (c as isize * h + iy) * w + ix;
                                        let weight = ((o * cin_g + ci) * kh + ky) * kw + kx;
                                        t.push((input as u32, weight as u32));
                                    }
                                }
                            }
                            terms.push(t);
                            if !self.bias.is_empty() {
                                bias.push(self.bias[o]);
                            }
                        }
                    }
                }
            }
            Geometry::Conv1d {
                out_channels,
                in_channels,
                kernel,
                stride,
                padding,
                dilation,
                groups,
            } => {
                let l = in_shape[1] as isize;
                let lo = out_shape[1];
                let (cin_g, cout_g) = (in_channels / groups, out_channels / groups);
                for o in 0..out_channels {
                    let g = o / cout_g;
                    for x in 0..lo {
                        let mut t = Vec::new();
                        for ci in 0..cin_g {
                            let c = g * cin_g + ci;
                            for k in 0..kernel {
                                let ix = (x * stride + k * dilation) as isize - padding as isize;
                                if ix < 0 || ix >= l {
                                    continue;
                                }
                                t.push((
                                    (c as isize * l + ix) as u32,
                                    ((o * cin_g + ci) * kernel + k) as u32,
                                ));
                            }
                        }
                        terms.push(t);
                        if !self.bias.is_empty() {
                            bias.push(self.bias[o]);
                        }
                    }
                }
            }
            Geometry::Linear {
                in_features,
                out_features,
            } => {
                for o in 0..out_features {
                    terms.push(
                        (0..in_features)
                            .map(|i| (i as u32, (o * in_features + i) as u32))
                            .collect(),
                    );
                }
                bias = self.bias.clone();
            }
            Geometry::AvgPool2d {
                kernel: (kh, kw),
                stride,
                padding,
            } => {
                let (h, w) = (in_shape[1] as isize, in_shape[2] as isize);
                let (ho, wo) = (out_shape[1], out_shape[2]);
                // count_include_pad: always divide by kh·kw; padded positions add nothing.
                divisor = (kh * kw) as f64;
                for c in 0..in_shape[0] {
                    for y in 0..ho {
                        for x in 0..wo {
                            let mut t = Vec::new();
                            for ky in 0..kh {
                                let iy = (y * stride.0 + ky) as isize - padding.0 as isize;
                                if iy < 0 || iy >= h {
                                    continue;
                                }
                                for kx in 0..kw {
                                    let ix = (x * stride.1 + kx) as isize - padding.1 as isize;
                                    if ix < 0 || ix >= w {
                                        continue;
                                    }
                                    t.push((((c as isize * h + iy) * w + ix) as u32, 0));
                                }
                            }
                            terms.push(t);
                        }
                    }
                }
            }
        }
        Ok(AffineMap {
            in_shape: in_shape.to_vec(),
            out_shape,
            terms,
            weights: self.weights.clone(),
            divisor,
            weight_scale_bits: self.weight_scale_bits,
            bias,
        })
    }

    /// The map for an input shape (cached).
    pub fn map_for(&self, in_shape: &[usize]) -> Result<Arc<AffineMap>> {
        let mut maps = self
            .maps
            .lock()
            .map_err(|_| HeError::Backend("layer cache poisoned".into()))?;
        if let Some(m) = maps.get(in_shape) {
            return Ok(m.clone());
        }
        let m = Arc::new(self.build_map(in_shape)?);
        maps.insert(in_shape.to_vec(), m.clone());
        Ok(m)
    }

    /// Runs the layer.
    pub fn forward(&self, x: &CipherTensor) -> Result<CipherTensor> {
        let map = self.map_for(x.image_shape())?;
        self.apply(&map, x)
    }

    /// [`Affine::probe_map`] on copies of `probe`, a tensor of one element.
    pub fn probe(&self, probe: &CipherTensor) -> Result<CipherTensor> {
        // Fractional weights are polynomials that rarely cancel: signed
        // weights track a real run's noise within a few bits there.
        let fractional = matches!(
            probe.params().encoding(),
            crate::he::Encoding::Fractional { .. }
        );
        let map = self.probe_map_with(!fractional);
        let element = probe
            .data()
            .iter()
            .next()
            .ok_or_else(|| HeError::Value("the probe is empty".into()))?;
        // Fractional tensors hold their images along axis 0; batch ones in the slots.
        let mut shape = if probe.batch().is_none() {
            vec![1]
        } else {
            vec![]
        };
        shape.extend_from_slice(&map.in_shape);
        let copies = ndarray::ArrayD::from_elem(ndarray::IxDyn(&shape), element.clone());
        // The probe's weights are |w|: encoded here, not taken from the layer's cache.
        let x = probe.with_data(copies, probe.scale(), probe.growth().clone());
        let prepared = map.prepare_weights(x.params(), x.level()?)?;
        let out = map.apply(&x, &prepared, self.geometry.name())?;
        let single = out
            .data()
            .iter()
            .next()
            .cloned()
            .ok_or_else(|| HeError::Value("the probe map has no output".into()))?;
        Ok(out.with_data(
            ndarray::ArrayD::from_elem(probe.data().raw_dim(), single),
            out.scale(),
            out.growth().clone(),
        ))
    }

    /// `map` (one of this layer's, all of which share its weights) on `x`,
    /// with the weights encoded for `x`'s parameters and level once and cached.
    fn apply(&self, map: &AffineMap, x: &CipherTensor) -> Result<CipherTensor> {
        let prepared = self.prepared(map, x)?;
        map.apply(x, &prepared, self.geometry.name())
    }

    /// The weights of `map` encoded for `x`'s parameters and level (cached).
    pub(crate) fn prepared(
        &self,
        map: &AffineMap,
        x: &CipherTensor,
    ) -> Result<Arc<Vec<Multiplier>>> {
        let level = x.level()?;
        let key = (x.params().fingerprint(), level);
        let cached = self
            .prepared
            .lock()
            .map_err(|_| HeError::Backend("layer cache poisoned".into()))?
            .get(&key)
            .cloned();
        let prepared = match cached {
            Some(p) => p,
            None => {
                let p = Arc::new(map.prepare_weights(x.params(), level)?);
                let mut cache = self
                    .prepared
                    .lock()
                    .map_err(|_| HeError::Backend("layer cache poisoned".into()))?;
                // Bounded: a layer serves few parameter sets at a time.
                if cache.len() >= 8 {
                    cache.clear();
                }
                cache.insert(key, p.clone());
                p
            }
        };
        Ok(prepared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv2d(
        in_channels: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Geometry {
        Geometry::Conv2d {
            out_channels: 4,
            in_channels,
            kernel,
            stride,
            padding,
            dilation: (1, 1),
            groups: 1,
        }
    }

    #[test]
    fn output_shapes_follow_torch() {
        assert_eq!(
            conv2d(1, (5, 5), (2, 2), (1, 1))
                .output_shape(&[1, 28, 28])
                .unwrap(),
            vec![4, 13, 13]
        );
        let conv1d = Geometry::Conv1d {
            out_channels: 3,
            in_channels: 2,
            kernel: 3,
            stride: 1,
            padding: 0,
            dilation: 2,
            groups: 1,
        };
        assert_eq!(conv1d.output_shape(&[2, 10]).unwrap(), vec![3, 6]);
        let linear = Geometry::Linear {
            in_features: 192,
            out_features: 10,
        };
        assert_eq!(linear.output_shape(&[12, 4, 4]).unwrap(), vec![10]);
        let pool = Geometry::AvgPool2d {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
        };
        assert_eq!(pool.output_shape(&[4, 24, 24]).unwrap(), vec![4, 12, 12]);
    }

    #[test]
    fn input_too_small_names_the_shortest_that_fits() {
        let err = conv2d(1, (5, 3), (1, 1), (1, 0))
            .output_shape(&[1, 2, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("H ≥ 3 and W ≥ 3"), "{err}");
        let err = conv2d(1, (5, 5), (1, 1), (0, 0))
            .output_shape(&[2, 28, 28])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expects input [1, H, W] per image, got [2, 28, 28]"),
            "{err}"
        );
    }

    #[test]
    fn degenerate_geometries_are_errors_not_panics() {
        assert!(conv2d(1, (0, 5), (1, 1), (0, 0))
            .output_shape(&[1, 28, 28])
            .is_err());
        assert!(conv2d(1, (5, 5), (0, 1), (0, 0))
            .output_shape(&[1, 28, 28])
            .is_err());
        let pool = Geometry::AvgPool2d {
            kernel: (2, 2),
            stride: (0, 2),
            padding: (0, 0),
        };
        assert!(pool
            .output_shape(&[1, 4, 4])
            .unwrap_err()
            .to_string()
            .contains("must be positive"));
        let grouped = Geometry::Conv1d {
            out_channels: 3,
            in_channels: 2,
            kernel: 3,
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 2,
        };
        assert!(grouped
            .output_shape(&[2, 10])
            .unwrap_err()
            .to_string()
            .contains("groups=2"));
    }
}
