//! `pycrcnn._engine.Layer`: an encrypted layer bound to a context; weights are
//! encoded on first use and reused.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::context::{as_f64_array, PyContext};
use super::errors::HEError;
use super::pool::run;
use super::tensor::{wrap_tensor, PyCipherTensor};
use crate::he::HeContext;
use crate::layers::{Affine, Geometry, Layer};

/// An encrypted layer: call it on a CipherTensor.
#[pyclass(name = "Layer", module = "pycrcnn._engine", frozen)]
pub struct PyLayer {
    layer: Arc<Layer>,
    ctx: Py<PyContext>,
}

fn weights_of(w: &Bound<'_, PyAny>, ndim: usize, what: &str) -> PyResult<(Vec<usize>, Vec<f64>)> {
    let a = as_f64_array(w)?;
    let v = a.as_array();
    if v.ndim() != ndim {
        return Err(HEError::new_err(format!(
            "{what}: weights must have {ndim} dimensions, got shape {:?}",
            v.shape()
        )));
    }
    Ok((v.shape().to_vec(), v.iter().cloned().collect()))
}

fn bias_of(b: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<f64>>> {
    match b {
        None => Ok(None),
        Some(x) if x.is_none() => Ok(None),
        Some(x) => Ok(Some(as_f64_array(x)?.as_array().iter().cloned().collect())),
    }
}

fn new_layer(py: Python<'_>, ctx: &Bound<'_, PyAny>, layer: Layer) -> PyResult<PyLayer> {
    let c = super::tensor::context_arg(ctx)?;
    let _ = py;
    Ok(PyLayer {
        layer: Arc::new(layer),
        ctx: c.unbind(),
    })
}

fn affine(
    geometry: Geometry,
    weights: Vec<f64>,
    bias: Option<Vec<f64>>,
    weight_scale_bits: Option<u32>,
) -> PyResult<Layer> {
    Affine::new(geometry, weights, bias)
        .and_then(|a| match weight_scale_bits {
            Some(bits) => a.with_weight_scale_bits(bits),
            None => Ok(a),
        })
        .map(Layer::Affine)
        .map_err(super::errors::to_py)
}

impl PyLayer {
    /// An engine layer bound to the context `ctx`.
    pub fn from_engine(py: Python<'_>, ctx: &Bound<'_, PyAny>, layer: Layer) -> PyResult<PyLayer> {
        new_layer(py, ctx, layer)
    }

    /// The engine layer.
    pub fn layer(&self) -> &Arc<Layer> {
        &self.layer
    }

    /// The input tensor, its Context and engine context; refuses tensors made
    /// under other parameters than the layer's.
    fn input<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyCipherTensor>, Py<PyContext>, Arc<HeContext>)> {
        let tensor = x
            .cast::<PyCipherTensor>()
            .map_err(|_| {
                HEError::new_err(
                    "a layer takes a CipherTensor (or the seed's object array, via pycrcnn.layers)",
                )
            })?
            .clone();
        let ctx_obj = tensor.get().context_ref().clone_ref(py);
        let ctx = ctx_obj.bind(py).get().get();
        if ctx.params().fingerprint() != self.ctx.bind(py).get().get().params().fingerprint() {
            return Err(HEError::new_err(
                "the tensor was encrypted under other parameters than the layer's context",
            ));
        }
        Ok((tensor, ctx_obj, ctx))
    }
}

#[pymethods]
impl PyLayer {
    /// torch.nn.Conv2d: weight [out, in/groups, kh, kw]. `weight_scale_bits`
    /// (Conv1d and Linear too): the layer's own weight scale (batch; default
    /// the context's).
    #[staticmethod]
    #[pyo3(signature = (ctx, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, weight_scale_bits=None))]
    #[allow(clippy::too_many_arguments)]
    fn conv2d(
        py: Python<'_>,
        ctx: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
        weight_scale_bits: Option<u32>,
    ) -> PyResult<PyLayer> {
        let (shape, w) = weights_of(weight, 4, "Conv2d")?;
        let g = Geometry::Conv2d {
            out_channels: shape[0],
            in_channels: shape[1] * groups.max(1),
            kernel: (shape[2], shape[3]),
            stride,
            padding,
            dilation,
            groups,
        };
        new_layer(py, ctx, affine(g, w, bias_of(bias)?, weight_scale_bits)?)
    }

    /// torch.nn.Conv1d: weight [out, in/groups, k]; input [N, C, L].
    #[staticmethod]
    #[pyo3(signature = (ctx, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, weight_scale_bits=None))]
    #[allow(clippy::too_many_arguments)]
    fn conv1d(
        py: Python<'_>,
        ctx: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
        weight_scale_bits: Option<u32>,
    ) -> PyResult<PyLayer> {
        let (shape, w) = weights_of(weight, 3, "Conv1d")?;
        let g = Geometry::Conv1d {
            out_channels: shape[0],
            in_channels: shape[1] * groups.max(1),
            kernel: shape[2],
            stride,
            padding,
            dilation,
            groups,
        };
        new_layer(py, ctx, affine(g, w, bias_of(bias)?, weight_scale_bits)?)
    }

    /// torch.nn.Linear: weight [out, in]; inputs are flattened per image.
    #[staticmethod]
    #[pyo3(signature = (ctx, weight, bias=None, weight_scale_bits=None))]
    fn linear(
        py: Python<'_>,
        ctx: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        weight_scale_bits: Option<u32>,
    ) -> PyResult<PyLayer> {
        let (shape, w) = weights_of(weight, 2, "Linear")?;
        let g = Geometry::Linear {
            in_features: shape[1],
            out_features: shape[0],
        };
        new_layer(py, ctx, affine(g, w, bias_of(bias)?, weight_scale_bits)?)
    }

    /// torch.nn.AvgPool2d (count_include_pad=True); stride defaults to the kernel size.
    #[staticmethod]
    #[pyo3(signature = (ctx, kernel_size, stride=None, padding=(0, 0)))]
    fn avg_pool2d(
        py: Python<'_>,
        ctx: &Bound<'_, PyAny>,
        kernel_size: (usize, usize),
        stride: Option<(usize, usize)>,
        padding: (usize, usize),
    ) -> PyResult<PyLayer> {
        let g = Geometry::AvgPool2d {
            kernel: kernel_size,
            stride: stride.unwrap_or(kernel_size),
            padding,
        };
        new_layer(py, ctx, affine(g, vec![1.0], None, None)?)
    }

    /// x².
    #[staticmethod]
    fn square(py: Python<'_>, ctx: &Bound<'_, PyAny>) -> PyResult<PyLayer> {
        new_layer(py, ctx, Layer::Square)
    }

    /// Σ coefficients[k] x^k (lowest degree first).
    #[staticmethod]
    fn polynomial(
        py: Python<'_>,
        ctx: &Bound<'_, PyAny>,
        coefficients: Vec<f64>,
    ) -> PyResult<PyLayer> {
        if coefficients.iter().all(|&c| c == 0.0) || coefficients.len() < 2 {
            return Err(HEError::new_err(
                "a polynomial activation needs a non-zero coefficient of degree ≥ 1",
            ));
        }
        if coefficients.iter().any(|c| !c.is_finite()) {
            return Err(HEError::new_err("polynomial coefficients must be finite"));
        }
        new_layer(py, ctx, Layer::Polynomial(coefficients))
    }

    /// Flattens every image to one axis.
    #[staticmethod]
    fn flatten(py: Python<'_>, ctx: &Bound<'_, PyAny>) -> PyResult<PyLayer> {
        new_layer(py, ctx, Layer::Flatten)
    }

    /// Decrypt + re-encrypt (needs the secret key).
    #[staticmethod]
    fn rencryption(py: Python<'_>, ctx: &Bound<'_, PyAny>) -> PyResult<PyLayer> {
        new_layer(py, ctx, Layer::Rencryption)
    }

    /// Runs the layer on a CipherTensor. The keys come from the tensor's own
    /// context: weights do not depend on keys, so one encoded layer serves
    /// every key with the same parameters (a server's many clients).
    fn __call__(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let (tensor, ctx_obj, ctx) = self.input(py, x)?;
        let t = tensor.get().get();
        let layer = self.layer.clone();
        let out = run(py, || layer.forward(&ctx, &t))?;
        wrap_tensor(py, out, ctx_obj)
    }

    /// This square fused with the layer `before` it (absorbed when affine)
    /// and the average pooling `next` after it: the layers to use in place
    /// of `(before, square, next)` (`before` is `None` when it stays as it
    /// is), or `None` when this is not a square or `next` not an average
    /// pooling. The fused layer computes all three; the absorbed ones pass
    /// their input through.
    #[pyo3(signature = (next, before=None))]
    fn fuse_with(
        &self,
        py: Python<'_>,
        next: &PyLayer,
        before: Option<&PyLayer>,
    ) -> Option<(Option<PyLayer>, PyLayer, PyLayer)> {
        // The fractional encoding gains nothing (its pooling multiplies by an
        // encoded 1/k², which a sum of tensors cannot take): unfused there.
        let batch = matches!(
            self.ctx.get().get().params().encoding(),
            crate::he::Encoding::Batch { .. }
        );
        if !batch || !matches!(*self.layer, Layer::Square) {
            return None;
        }
        let wrap = |layer: Layer, ctx: &Py<PyContext>| PyLayer {
            layer: Arc::new(layer),
            ctx: ctx.clone_ref(py),
        };
        Layer::fuse_square(before.map(|b| &b.layer), &next.layer).map(|(b, square, pool)| {
            (
                b.map(|l| wrap(l, &self.ctx)),
                wrap(square, &self.ctx),
                wrap(pool, &next.ctx),
            )
        })
    }

    /// torch-like name.
    #[getter]
    fn name(&self) -> String {
        self.layer.name()
    }

    /// True for layers that multiply ciphertexts (they cost noise budget).
    #[getter]
    fn multiplies_ciphertexts(&self) -> bool {
        self.layer.multiplies_ciphertexts()
    }

    /// Output shape of one image for an input shape of one image.
    fn output_shape(&self, in_shape: Vec<usize>) -> PyResult<Vec<usize>> {
        self.layer
            .output_shape(&in_shape)
            .map_err(super::errors::to_py)
    }

    /// The layer's parameters.
    fn describe<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("type", self.layer.name())?;
        match &*self.layer {
            Layer::Affine(a) => match &a.geometry() {
                Geometry::Conv2d {
                    out_channels,
                    in_channels,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                } => {
                    d.set_item("in_channels", in_channels)?;
                    d.set_item("out_channels", out_channels)?;
                    d.set_item("kernel_size", kernel)?;
                    d.set_item("stride", stride)?;
                    d.set_item("padding", padding)?;
                    d.set_item("dilation", dilation)?;
                    d.set_item("groups", groups)?;
                    d.set_item("bias", !a.bias().is_empty())?;
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
                    d.set_item("in_channels", in_channels)?;
                    d.set_item("out_channels", out_channels)?;
                    d.set_item("kernel_size", kernel)?;
                    d.set_item("stride", stride)?;
                    d.set_item("padding", padding)?;
                    d.set_item("dilation", dilation)?;
                    d.set_item("groups", groups)?;
                    d.set_item("bias", !a.bias().is_empty())?;
                }
                Geometry::Linear {
                    in_features,
                    out_features,
                } => {
                    d.set_item("in_features", in_features)?;
                    d.set_item("out_features", out_features)?;
                    d.set_item("bias", !a.bias().is_empty())?;
                }
                Geometry::AvgPool2d {
                    kernel,
                    stride,
                    padding,
                } => {
                    d.set_item("kernel_size", kernel)?;
                    d.set_item("stride", stride)?;
                    d.set_item("padding", padding)?;
                }
            },
            Layer::Polynomial(c) => d.set_item("coefficients", c.clone())?,
            _ => {}
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Layer({})", self.layer.name())
    }
}
