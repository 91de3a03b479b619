//! `pycrcnn._engine.PackedModel`: a planned model in the packed
//! layout (conversions only; the layout lives in `crate::model::packed`).

use std::sync::Arc;

use numpy::PyReadonlyArrayDyn;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_py;
use super::layers::PyLayer;
use crate::layers::Layer;
use crate::model::packed::{HiddenMap, PackedModel, PackedSpec, PackedStage, Stage, SQUARE};

/// The integers of a planned packed model (made by `pycrcnn.plan(..., layout="packed")`).
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

fn stage_of(name: &str, pm: &PackedModel) -> PyResult<Stage> {
    let parsed = match name {
        "conv" => Some(Stage::Conv),
        "square" => Some(Stage::Act(0)),
        "linear" => Some(Stage::Linear),
        _ => name
            .strip_prefix("act")
            .and_then(|j| j.parse().ok().map(Stage::Act))
            .or_else(|| {
                name.strip_prefix("map")
                    .and_then(|j| j.parse().ok().map(Stage::Map))
            }),
    };
    match parsed {
        Some(s) if pm.stages().contains(&s) => Ok(s),
        _ => Err(super::errors::HEError::new_err(format!(
            "stage must be one of {:?}, got {name:?}",
            stage_names(pm)
        ))),
    }
}

fn stage_names(pm: &PackedModel) -> Vec<String> {
    pm.stages()
        .into_iter()
        .map(|s| match s {
            Stage::Conv => "conv".to_string(),
            Stage::Act(j) => format!("act{j}"),
            Stage::Map(j) => format!("map{j}"),
            Stage::Linear => "linear".to_string(),
        })
        .collect()
}

/// A hidden map from Python: (out_shape, dense int64 weight [out, in], bias [out]).
type PyMap<'py> = (
    (usize, usize, usize),
    PyReadonlyArrayDyn<'py, i64>,
    Vec<i128>,
);

fn hidden_map(m: PyMap<'_>) -> PyResult<HiddenMap> {
    let (shape, w, b) = m;
    let w = w.as_array();
    if w.ndim() != 2 {
        return Err(super::errors::HEError::new_err(format!(
            "a hidden map's weight must be 2-d [out, in], got shape {:?}",
            w.shape()
        )));
    }
    let rows = w
        .outer_iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .filter(|(_, &v)| v != 0)
                .map(|(f, &v)| (f, v))
                .collect()
        })
        .collect();
    Ok(HiddenMap {
        out_shape: [shape.0, shape.1, shape.2],
        rows,
        bias: b,
    })
}

#[pymethods]
impl PyPackedModel {
    /// Integer weights (int64 arrays): conv weight [out, in, kh, kw], conv
    /// bias [out], fused linear weight [classes, features]; its bias [classes]
    /// (Python ints: at the output scale they may pass 64 bits).
    #[new]
    /// `activations`: [c0, c1, c2] integers per activation (default one
    /// square); `maps`: the hidden maps between activations, each
    /// (out_shape (C, H, W), weight [out, in], bias [out]).
    #[pyo3(signature = (in_shape, conv_weight, conv_bias, stride, padding, linear_weight, linear_bias, input_bits, output_bits, activations=None, maps=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        in_shape: (usize, usize, usize),
        conv_weight: PyReadonlyArrayDyn<'_, i64>,
        conv_bias: PyReadonlyArrayDyn<'_, i64>,
        stride: usize,
        padding: usize,
        linear_weight: PyReadonlyArrayDyn<'_, i64>,
        linear_bias: Vec<i128>,
        input_bits: u32,
        output_bits: u32,
        activations: Option<Vec<[i128; 3]>>,
        maps: Option<Vec<PyMap<'_>>>,
    ) -> PyResult<PyPackedModel> {
        let shape = conv_weight.as_array().shape().to_vec();
        if shape.len() != 4 {
            return Err(super::errors::HEError::new_err(format!(
                "conv_weight must be 4-d [out, in, kh, kw], got shape {shape:?}"
            )));
        }
        let spec = PackedSpec {
            in_shape: [in_shape.0, in_shape.1, in_shape.2],
            conv_shape: [shape[0], shape[1], shape[2], shape[3]],
            conv_weight: ints(&conv_weight),
            conv_bias: ints(&conv_bias),
            stride,
            padding,
            activations: activations.unwrap_or_else(|| vec![SQUARE]),
            maps: maps
                .unwrap_or_default()
                .into_iter()
                .map(hidden_map)
                .collect::<PyResult<_>>()?,
            linear_weight: ints(&linear_weight),
            linear_bias,
            input_bits,
            output_bits,
        };
        Ok(PyPackedModel {
            inner: Arc::new(PackedModel::new(spec).map_err(to_py)?),
        })
    }

    /// The exact output integers for one integer image [C, H, W] (Python ints).
    fn reference(&self, x: PyReadonlyArrayDyn<'_, i64>) -> PyResult<Vec<i128>> {
        self.inner.spec().reference(&ints(&x)).map_err(to_py)
    }

    /// The layout at degree m with n_moduli ciphertext primes: slots, blocks,
    /// diagonals, rotations and the keys needed (`rotation_needs`: [(level, steps)]).
    fn layout<'py>(
        &self,
        py: Python<'py>,
        m: usize,
        n_moduli: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let lay = self.inner.spec().layout(m, n_moduli).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("slots", lay.n)?;
        d.set_item("block", lay.block)?;
        d.set_item("conv_out", (lay.ho, lay.wo))?;
        d.set_item("row_pitch", lay.pitch)?;
        d.set_item("input_ciphertexts", lay.inputs)?;
        d.set_item("classes", lay.classes)?;
        d.set_item("diagonals", (lay.d, lay.d1, lay.d2))?;
        d.set_item("rotations", lay.rotations())?;
        d.set_item("linear_level", lay.lin_level)?;
        d.set_item("activation_levels", lay.act_levels.clone())?;
        d.set_item("map_diagonals", lay.map_diagonals())?;
        d.set_item(
            "map_rotations",
            lay.maps.iter().map(|m| m.rotations()).collect::<Vec<_>>(),
        )?;
        d.set_item(
            "map_baby_steps",
            lay.maps.iter().map(|m| m.babies).collect::<Vec<_>>(),
        )?;
        d.set_item(
            "map_giant_steps",
            lay.maps.iter().map(|m| m.giants.len()).collect::<Vec<_>>(),
        )?;
        d.set_item("row_shift", lay.row_shift())?;
        d.set_item("product_levels", lay.product_levels())?;
        let needs: Vec<(usize, Vec<usize>)> = lay
            .rotation_needs()
            .into_iter()
            .map(|n| (n.level, n.steps))
            .collect();
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

    /// The stages in order: "conv", "act0", ("map0", "act1", ...), "linear".
    #[getter]
    fn stages(&self) -> Vec<String> {
        stage_names(&self.inner)
    }

    /// The activations' integer coefficients [c0, c1, c2].
    #[getter]
    fn activations(&self) -> Vec<[i128; 3]> {
        self.inner.spec().activations.clone()
    }

    /// One stage (a name of `stages`; "square" is "act0") as an engine layer of `ctx`.
    fn layer(&self, py: Python<'_>, ctx: &Bound<'_, PyAny>, stage: &str) -> PyResult<PyLayer> {
        let s = stage_of(stage, &self.inner)?;
        PyLayer::from_engine(
            py,
            ctx,
            Layer::Packed(PackedStage::new(self.inner.clone(), s)),
        )
    }

    fn __repr__(&self) -> String {
        let sp = self.inner.spec();
        format!(
            "PackedModel(in={:?}, conv={:?}, stride={}, padding={}, activations={}, classes={})",
            sp.in_shape,
            sp.conv_shape,
            sp.stride,
            sp.padding,
            sp.activations.len(),
            sp.classes()
        )
    }
}
