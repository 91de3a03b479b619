//! `pycrcnn._engine.PackedModel`: a planned single-square model in the packed
//! layout (conversions only; the layout lives in `crate::model::packed`).

use std::sync::Arc;

use numpy::PyReadonlyArrayDyn;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_py;
use super::layers::PyLayer;
use crate::layers::Layer;
use crate::model::packed::{PackedModel, PackedSpec, PackedStage, Stage};

/// The integers of a planned single-square model (made by `pycrcnn.plan(..., layout="packed")`).
#[pyclass(name = "PackedModel", module = "pycrcnn._engine", frozen)]
pub struct PyPackedModel {
    inner: Arc<PackedModel>,
}

impl PyPackedModel {
    /// The engine model.
    pub fn get(&self) -> &Arc<PackedModel> {
        &self.inner
    }

    /// Wraps an engine model.
    pub fn wrap(inner: Arc<PackedModel>) -> PyPackedModel {
        PyPackedModel { inner }
    }
}

fn ints(a: &PyReadonlyArrayDyn<'_, i64>) -> Vec<i64> {
    a.as_array().iter().copied().collect()
}

fn stage_of(name: &str) -> PyResult<Stage> {
    match name {
        "conv" => Ok(Stage::Conv),
        "square" => Ok(Stage::Square),
        "linear" => Ok(Stage::Linear),
        other => Err(super::errors::HEError::new_err(format!("stage must be 'conv', 'square' or 'linear', got {other:?}"))),
    }
}

#[pymethods]
impl PyPackedModel {
    /// Integer weights (int64 arrays): conv weight [out, in, kh, kw], conv
    /// bias [out], fused linear weight [classes, out·Ho·Wo], its bias [classes].
    #[new]
    #[pyo3(signature = (in_shape, conv_weight, conv_bias, stride, padding, linear_weight, linear_bias, input_bits, output_bits))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        in_shape: (usize, usize, usize),
        conv_weight: PyReadonlyArrayDyn<'_, i64>,
        conv_bias: PyReadonlyArrayDyn<'_, i64>,
        stride: usize,
        padding: usize,
        linear_weight: PyReadonlyArrayDyn<'_, i64>,
        linear_bias: PyReadonlyArrayDyn<'_, i64>,
        input_bits: u32,
        output_bits: u32,
    ) -> PyResult<PyPackedModel> {
        let shape = conv_weight.as_array().shape().to_vec();
        if shape.len() != 4 {
            return Err(super::errors::HEError::new_err(format!("conv_weight must be 4-d [out, in, kh, kw], got shape {shape:?}")));
        }
        let spec = PackedSpec {
            in_shape: [in_shape.0, in_shape.1, in_shape.2],
            conv_shape: [shape[0], shape[1], shape[2], shape[3]],
            conv_weight: ints(&conv_weight),
            conv_bias: ints(&conv_bias),
            stride,
            padding,
            linear_weight: ints(&linear_weight),
            linear_bias: ints(&linear_bias),
            input_bits,
            output_bits,
        };
        Ok(PyPackedModel { inner: Arc::new(PackedModel::new(spec).map_err(to_py)?) })
    }

    /// The exact output integers for one integer image [C, H, W] (Python ints).
    fn reference(&self, x: PyReadonlyArrayDyn<'_, i64>) -> PyResult<Vec<i128>> {
        self.inner.spec().reference(&ints(&x)).map_err(to_py)
    }

    /// The layout at degree m with n_moduli ciphertext primes: slots, blocks,
    /// diagonals, rotations and the keys needed (`rotation_needs`: [(level, steps)]).
    fn layout<'py>(&self, py: Python<'py>, m: usize, n_moduli: usize) -> PyResult<Bound<'py, PyDict>> {
        let lay = self.inner.spec().layout(m, n_moduli).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("slots", lay.n)?;
        d.set_item("block", lay.block)?;
        d.set_item("conv_out", (lay.ho, lay.wo))?;
        d.set_item("input_ciphertexts", lay.inputs)?;
        d.set_item("classes", lay.classes)?;
        d.set_item("diagonals", (lay.d, lay.d1, lay.d2))?;
        d.set_item("rotations", lay.rotations())?;
        d.set_item("linear_level", lay.lin_level)?;
        let needs: Vec<(usize, Vec<usize>)> = lay.rotation_needs().into_iter().map(|n| (n.level, n.steps)).collect();
        d.set_item("rotation_needs", needs)?;
        Ok(d)
    }

    /// Input scale bits and output scale bits.
    #[getter]
    fn scales(&self) -> (u32, u32) {
        (self.inner.spec().input_bits, self.inner.spec().output_bits)
    }

    /// Output classes.
    #[getter]
    fn classes(&self) -> usize {
        self.inner.spec().classes()
    }

    /// Input shape [C, H, W].
    #[getter]
    fn in_shape(&self) -> Vec<usize> {
        self.inner.spec().in_shape.to_vec()
    }

    /// One stage ("conv", "square", "linear") as an engine layer of `ctx`.
    fn layer(&self, py: Python<'_>, ctx: &Bound<'_, PyAny>, stage: &str) -> PyResult<PyLayer> {
        let s = stage_of(stage)?;
        PyLayer::from_engine(py, ctx, Layer::Packed(PackedStage::new(self.inner.clone(), s)))
    }

    fn __repr__(&self) -> String {
        let sp = self.inner.spec();
        format!("PackedModel(in={:?}, conv={:?}, stride={}, padding={}, classes={})", sp.in_shape, sp.conv_shape, sp.stride, sp.padding, sp.classes())
    }
}

