//! Shape inference without a context or weights: `layer_output_shape` lets a
//! Python model description (`pycrcnn.spec.ModelSpec`) check and chain shapes
//! by the same rules the encrypted layers apply.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{to_py, HEError};
use crate::layers::{Geometry, Layer};

/// The layer types whose output shape is known here.
const TYPES: &str = "Conv2d, Conv1d, Linear, AvgPool2d, Flatten, Square, Polynomial";

/// A parameter of `layer_type` (an error naming it when it is missing).
fn param<'py>(
    params: &Bound<'py, PyDict>,
    layer_type: &str,
    key: &str,
) -> PyResult<Bound<'py, PyAny>> {
    params
        .get_item(key)?
        .ok_or_else(|| HEError::new_err(format!("{layer_type}: parameter {key:?} is missing")))
}

/// A non-negative integer parameter.
fn size(params: &Bound<'_, PyDict>, layer_type: &str, key: &str) -> PyResult<usize> {
    param(params, layer_type, key)?
        .extract::<usize>()
        .map_err(|_| {
            HEError::new_err(format!(
                "{layer_type}: {key} must be a non-negative integer"
            ))
        })
}

/// A parameter per spatial axis: one integer for every axis, or one per axis.
fn sizes(
    params: &Bound<'_, PyDict>,
    layer_type: &str,
    key: &str,
    axes: usize,
) -> PyResult<Vec<usize>> {
    let value = param(params, layer_type, key)?;
    if let Ok(n) = value.extract::<usize>() {
        return Ok(vec![n; axes]);
    }
    match value.extract::<Vec<usize>>() {
        Ok(v) if v.len() == axes => Ok(v),
        _ => Err(HEError::new_err(format!(
            "{layer_type}: {key} must be a non-negative integer or {axes} of them, got {}",
            value
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".into())
        ))),
    }
}

/// The geometry of an affine layer from its torch-like parameters.
fn geometry(layer_type: &str, params: &Bound<'_, PyDict>) -> PyResult<Geometry> {
    let pair = |key: &str| sizes(params, layer_type, key, 2).map(|v| (v[0], v[1]));
    let single = |key: &str| sizes(params, layer_type, key, 1).map(|v| v[0]);
    Ok(match layer_type {
        "Conv2d" => Geometry::Conv2d {
            out_channels: size(params, layer_type, "out_channels")?,
            in_channels: size(params, layer_type, "in_channels")?,
            kernel: pair("kernel_size")?,
            stride: pair("stride")?,
            padding: pair("padding")?,
            dilation: pair("dilation")?,
            groups: size(params, layer_type, "groups")?,
        },
        "Conv1d" => Geometry::Conv1d {
            out_channels: size(params, layer_type, "out_channels")?,
            in_channels: size(params, layer_type, "in_channels")?,
            kernel: single("kernel_size")?,
            stride: single("stride")?,
            padding: single("padding")?,
            dilation: single("dilation")?,
            groups: size(params, layer_type, "groups")?,
        },
        "Linear" => Geometry::Linear {
            in_features: size(params, layer_type, "in_features")?,
            out_features: size(params, layer_type, "out_features")?,
        },
        "AvgPool2d" => Geometry::AvgPool2d {
            kernel: pair("kernel_size")?,
            stride: pair("stride")?,
            padding: pair("padding")?,
        },
        other => return Err(HEError::new_err(format!("{other}: not an affine layer"))),
    })
}

/// Output shape of one image of a layer described by its type and torch-like
/// parameters (those of `pycrcnn.spec.LayerSpec.params`), for the shape of
/// one input image; an error if the input does not fit the layer.
#[pyfunction]
pub fn layer_output_shape(
    layer_type: &str,
    in_shape: Vec<usize>,
    params: &Bound<'_, PyDict>,
) -> PyResult<Vec<usize>> {
    let layer = match layer_type {
        "Conv2d" | "Conv1d" | "Linear" | "AvgPool2d" => {
            return geometry(layer_type, params)?
                .output_shape(&in_shape)
                .map_err(to_py);
        }
        "Flatten" => Layer::Flatten,
        "Square" => Layer::Square,
        // the coefficients do not change the shape
        "Polynomial" => Layer::Polynomial(Vec::new()),
        other => {
            return Err(HEError::new_err(format!(
                "unknown layer type {other:?}; known: {TYPES}"
            )))
        }
    };
    layer.output_shape(&in_shape).map_err(to_py)
}
