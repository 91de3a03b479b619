//! Exact integers to numpy: int64 where every value fits, else an object
//! array of Python ints (float64 cannot hold them, int64 not always).

use ndarray::ArrayD;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyList;

/// `values` as an int64 array when every value fits in 63 bits, else as an
/// object array of Python ints of the same shape.
pub fn integers_to_py<'py>(py: Python<'py>, values: ArrayD<i128>) -> PyResult<Bound<'py, PyAny>> {
    if values.iter().all(|&v| i64::try_from(v).is_ok()) {
        return Ok(values.mapv(|v| v as i64).into_pyarray(py).into_any());
    }
    let shape: Vec<usize> = values.shape().to_vec();
    let list = PyList::new(py, values.iter().copied())?;
    let np = py.import("numpy")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("dtype", py.import("builtins")?.getattr("object")?)?;
    let arr = np.call_method("array", (list,), Some(&kwargs))?;
    arr.call_method1("reshape", (shape,))
}
