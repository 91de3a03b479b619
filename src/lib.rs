//! pycrcnn: encrypted CNN inference over BFV (fhe.rs). `he` is the
//! encrypted-math core, `layers` the CNN layers over it and `model` the one
//! runner of whole models, all plain Rust;
//! with the `python` feature this file registers the `pycrcnn._engine` module.

#![warn(missing_docs)]

pub mod he;
pub mod layers;
pub mod model;
#[cfg(feature = "python")]
mod python;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// The native module `pycrcnn._engine`.
#[cfg(feature = "python")]
#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use python::{context, errors, layers, model, pool, tensor};
    let py = m.py();
    pool::tune_allocator();
    m.add_class::<context::PyContext>()?;
    m.add_class::<tensor::PyCipherTensor>()?;
    m.add_class::<tensor::PyCtxt>()?;
    m.add_class::<layers::PyLayer>()?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<python::packed::PyPackedModel>()?;
    m.add_function(wrap_pyfunction!(pool::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(pool::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(tensor::_tensor_from_pickle, m)?)?;
    m.add_function(wrap_pyfunction!(python::shapes::layer_output_shape, m)?)?;
    m.add("HEError", py.get_type::<errors::HEError>())?;
    m.add(
        "SecretKeyRequired",
        py.get_type::<errors::SecretKeyRequired>(),
    )?;
    m.add(
        "NoiseBudgetExhausted",
        py.get_type::<errors::NoiseBudgetExhausted>(),
    )?;
    m.add(
        "PlaintextOverflow",
        py.get_type::<errors::PlaintextOverflow>(),
    )?;
    m.add("ParameterError", py.get_type::<errors::ParameterError>())?;
    m.add("FormatError", py.get_type::<errors::FormatError>())?;
    m.add("RunCancelled", py.get_type::<errors::RunCancelled>())?;
    m.add("NTT_FEATURES", he::params::NTT_FEATURES)?;
    Ok(())
}
