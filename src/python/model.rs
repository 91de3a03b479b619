//! `pycrcnn._engine.Model`: the Rust model runner for Python. Conversions
//! only: reports become dicts, the per-layer callback is a Python callable.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};

use super::context::PyContext;
use super::errors::{to_py, HEError};
use super::layers::PyLayer;
use super::pool::run;
use super::tensor::{wrap_shared, wrap_tensor, PyCipherTensor};
use crate::he::{CipherTensor, HeError};
use crate::model::{Flow, LayerReport, Model, RunOptions, Step, SwitchResult};

/// An ordered list of encrypted layers run as a whole in Rust.
#[pyclass(name = "Model", module = "pycrcnn._engine", frozen)]
pub struct PyModel {
    model: Model,
}

fn report_dict<'py>(py: Python<'py>, r: &LayerReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("position", r.position)?;
    d.set_item("index", r.index)?;
    d.set_item("name", &r.name)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("shape", r.shape.clone())?;
    d.set_item("level", r.level)?;
    let g = PyDict::new(py);
    g.set_item("coeff_bound", r.growth.coeff_bound)?;
    g.set_item("limit", r.growth.limit)?;
    g.set_item("wrap_error_bound", r.growth.wrap_error_bound)?;
    g.set_item("fits", r.growth.fits())?;
    d.set_item("growth", g)?;
    if let Some(b) = r.noise_budget {
        d.set_item("noise_budget", b)?;
    }
    Ok(d)
}

/// A Rust per-layer callback that calls `callback(report, tensor)` with the
/// GIL; `False` cancels the run, an exception stops it and is kept in
/// `raised` to be re-raised as it is.
fn python_callback(
    callback: Option<Py<PyAny>>,
    ctx: Py<PyContext>,
    raised: Arc<Mutex<Option<PyErr>>>,
) -> impl FnMut(&LayerReport, &Arc<CipherTensor>) -> crate::he::Result<Flow> + Send {
    move |report, tensor| {
        let Some(cb) = &callback else {
            return Ok(Flow::Continue);
        };
        Python::attach(|py| {
            let outcome = (|| -> PyResult<bool> {
                let t = wrap_shared(py, tensor.clone(), ctx.clone_ref(py))?;
                let answer = cb.bind(py).call1((report_dict(py, report)?, t))?;
                Ok(!(answer.is_instance_of::<PyBool>() && !answer.is_truthy()?))
            })();
            match outcome {
                Ok(true) => Ok(Flow::Continue),
                Ok(false) => Ok(Flow::Cancel),
                Err(e) => {
                    if let Ok(mut slot) = raised.lock() {
                        *slot = Some(e);
                    }
                    Err(HeError::Cancelled)
                }
            }
        })
    }
}

/// Runs `f` on the engine's pool; an error raised by the Python callback
/// propagates as it was raised, any other as its engine exception.
fn run_with_callback<T: Send>(
    py: Python<'_>,
    raised: &Mutex<Option<PyErr>>,
    f: impl FnOnce() -> crate::he::Result<T> + Send,
) -> PyResult<T> {
    run(py, || Ok(f()))?.map_err(|e| match raised.lock().ok().and_then(|mut s| s.take()) {
        Some(py_err) => py_err,
        None => to_py(e),
    })
}

#[pymethods]
impl PyModel {
    /// A model of `(index, layer)` pairs in order.
    #[new]
    fn new(layers: Vec<(i64, Bound<'_, PyLayer>)>) -> PyModel {
        let steps = layers
            .iter()
            .map(|(i, l)| Step::new(*i, l.get().layer().clone()))
            .collect();
        PyModel {
            model: Model::new(steps),
        }
    }

    fn __len__(&self) -> usize {
        self.model.len()
    }

    /// `[start, stop)` position ranges between rencryption layers.
    fn segments(&self) -> Vec<(usize, usize)> {
        self.model
            .segments()
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// The model on plaintext inputs `x` (`[N, ...]`, float64) in the batch
    /// encoding's exact integer arithmetic at `scale_bits` / `weight_scale_bits`
    /// (rencryptions included). Returns `(integers, scale)`: what an
    /// encrypted run decrypts to with `decrypt_integers` when nothing wraps.
    fn reference<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        scale_bits: u32,
        weight_scale_bits: u32,
    ) -> PyResult<(Bound<'py, PyAny>, f64)> {
        let arr = super::context::as_f64_array(x)?;
        let x = arr.as_array().to_owned();
        let model = &self.model;
        let encoding = crate::he::Encoding::Batch {
            scale_bits,
            weight_scale_bits,
        };
        let out = run(py, || model.reference(x.view(), encoding))?;
        Ok((super::integers::integers_to_py(py, out.values)?, out.scale))
    }

    /// Output shape of one image for the shape of one input image.
    fn output_shape(&self, in_shape: Vec<usize>) -> PyResult<Vec<usize>> {
        self.model.output_shape(&in_shape).map_err(to_py)
    }

    /// Runs layers `start..stop` (positions; default all) on `x`, with the
    /// keys of `x`'s context. `rencrypt=False` skips rencryption layers;
    /// `measure_noise` adds each layer's noise budget (secret key only);
    /// `switch_result` is "never", "always" or "auto". `callback(report,
    /// tensor)` is called after every layer; returning `False` cancels the run
    /// (`RunCancelled`), an exception stops it and propagates. Returns
    /// `(output, reports)`.
    #[pyo3(signature = (x, start=None, stop=None, rencrypt=true, measure_noise=false, switch_result="never", callback=None))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        start: Option<usize>,
        stop: Option<usize>,
        rencrypt: bool,
        measure_noise: bool,
        switch_result: &str,
        callback: Option<Py<PyAny>>,
    ) -> PyResult<(Py<PyAny>, Vec<Py<PyDict>>)> {
        let tensor = x.cast::<PyCipherTensor>().map_err(|_| {
            HEError::new_err("a model runs on a CipherTensor: encrypt the input first")
        })?;
        let ctx_obj = tensor.get().context_ref().clone_ref(py);
        let ctx = ctx_obj.bind(py).get().get();
        let t = tensor.get().get();
        let switch_result = match switch_result {
            "never" => SwitchResult::Never,
            "always" => SwitchResult::Always,
            "auto" => SwitchResult::Auto,
            other => {
                return Err(HEError::new_err(format!(
                    "switch_result must be \"never\", \"always\" or \"auto\", got {other:?}"
                )))
            }
        };
        let range = match (start, stop) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0)..b.unwrap_or(self.model.len())),
        };
        let options = RunOptions {
            range,
            rencrypt,
            measure_noise,
            switch_result,
        };
        let raised = Arc::new(Mutex::new(None));
        let mut on_layer = python_callback(callback, ctx_obj.clone_ref(py), raised.clone());
        let model = &self.model;
        let (out, reports) =
            run_with_callback(py, &raised, || model.run(&ctx, t, &options, &mut on_layer))?;
        let reports = reports
            .iter()
            .map(|r| report_dict(py, r).map(Bound::unbind))
            .collect::<PyResult<_>>()?;
        Ok((wrap_tensor(py, out, ctx_obj)?, reports))
    }

    /// Predicts per layer, on probe ciphertexts of `input_bound` encrypted
    /// under `ctx` (secret key needed), the noise budget and the plaintext
    /// growth a real input would reach. Returns `(reports, failure)` where
    /// `failure` is `None` or `(position, exception)` for the first layer
    /// that would fail.
    #[pyo3(signature = (ctx, input_bound=1.0, callback=None))]
    fn predict(
        &self,
        py: Python<'_>,
        ctx: &Bound<'_, PyContext>,
        input_bound: f64,
        callback: Option<Py<PyAny>>,
    ) -> PyResult<(Vec<Py<PyDict>>, Option<(usize, Py<PyAny>)>)> {
        let engine = ctx.get().get();
        let raised = Arc::new(Mutex::new(None));
        let mut on_layer = python_callback(callback, ctx.clone().unbind(), raised.clone());
        let model = &self.model;
        let (reports, failure) = run_with_callback(py, &raised, || {
            model.predict(&engine, input_bound, &mut on_layer)
        })?;
        let reports = reports
            .iter()
            .map(|r| report_dict(py, r).map(Bound::unbind))
            .collect::<PyResult<_>>()?;
        let failure = failure.map(|(p, e)| (p, to_py(e).into_value(py).into_any()));
        Ok((reports, failure))
    }
}
