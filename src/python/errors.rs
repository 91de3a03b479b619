//! The Python exception hierarchy and the conversion of engine errors into it.
//! Structured fields of an error become attributes of the exception:
//! `layer` and `layer_name` (which layer of a model raised it), `bound` and
//! `limit` (a plaintext overflow), `budget` (an exhausted noise budget).

use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::PyErr;

use crate::he::HeError;

create_exception!(
    pycrcnn,
    HEError,
    PyValueError,
    "Base of every pycrcnn engine error (a ValueError)."
);
create_exception!(
    pycrcnn,
    SecretKeyRequired,
    HEError,
    "The operation needs the secret key, which this context does not hold."
);
create_exception!(
    pycrcnn,
    NoiseBudgetExhausted,
    HEError,
    "A ciphertext's noise budget is used up; decrypting it would give garbage."
);
create_exception!(
    pycrcnn,
    PlaintextOverflow,
    HEError,
    "A value would not fit in the plaintext modulus."
);
create_exception!(
    pycrcnn,
    ParameterError,
    HEError,
    "Encryption parameters that cannot be met."
);
create_exception!(
    pycrcnn,
    FormatError,
    HEError,
    "Bytes that are not a valid, intact, matching pycrcnn blob."
);
create_exception!(
    pycrcnn,
    RunCancelled,
    HEError,
    "A model run stopped by its per-layer callback."
);

/// Engine error → Python exception (the class of the root cause, with the
/// layer that raised it as attributes).
pub fn to_py(e: HeError) -> PyErr {
    let msg = e.to_string();
    let (layer, root) = match e {
        HeError::AtLayer {
            index,
            name,
            source,
        } => (Some((index, name)), *source),
        e => (None, e),
    };
    let mut budget = None;
    let mut range = None;
    let err = match root {
        HeError::Parameter(_) => ParameterError::new_err(msg),
        HeError::SecretKeyRequired(_) => SecretKeyRequired::new_err(msg),
        HeError::NoiseBudgetExhausted { budget: b, .. } => {
            budget = Some(b);
            NoiseBudgetExhausted::new_err(msg)
        }
        HeError::PlaintextOverflow { bound, limit, .. } => {
            range = Some((bound, limit));
            PlaintextOverflow::new_err(msg)
        }
        HeError::Format(_) => FormatError::new_err(msg),
        HeError::Cancelled => RunCancelled::new_err(msg),
        HeError::Value(_) | HeError::Backend(_) | HeError::AtLayer { .. } => HEError::new_err(msg),
    };
    Python::attach(|py| {
        let value = err.value(py);
        // An attribute that cannot be set leaves the exception and its message intact.
        let (index, name) = layer.map_or((None, None), |(i, n)| (Some(i), Some(n)));
        let _ = value.setattr("layer", index);
        let _ = value.setattr("layer_name", name);
        if let Some(b) = budget {
            let _ = value.setattr("budget", b);
        }
        if let Some((bound, limit)) = range {
            let _ = value.setattr("bound", bound);
            let _ = value.setattr("limit", limit);
        }
    });
    err
}

/// An IndexError (indexing is the one place Python expects it).
pub fn index_error(msg: impl Into<String>) -> PyErr {
    PyIndexError::new_err(msg.into())
}
