//! The Python exception hierarchy and the conversion of engine errors into it.

use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::PyErr;

use crate::he::HeError;

create_exception!(pycrcnn, HEError, PyValueError, "Base of every pycrcnn engine error (a ValueError).");
create_exception!(pycrcnn, SecretKeyRequired, HEError, "The operation needs the secret key, which this context does not hold.");
create_exception!(pycrcnn, NoiseBudgetExhausted, HEError, "A ciphertext's noise budget is used up; decrypting it would give garbage.");
create_exception!(pycrcnn, PlaintextOverflow, HEError, "A value would not fit in the plaintext modulus.");
create_exception!(pycrcnn, ParameterError, HEError, "Encryption parameters that cannot be met.");
create_exception!(pycrcnn, FormatError, HEError, "Bytes that are not a valid, intact, matching pycrcnn blob.");

/// Engine error → Python exception.
pub fn to_py(e: HeError) -> PyErr {
    let msg = e.to_string();
    match e {
        HeError::Parameter(_) => ParameterError::new_err(msg),
        HeError::SecretKeyRequired(_) => SecretKeyRequired::new_err(msg),
        HeError::NoiseBudgetExhausted(_) => NoiseBudgetExhausted::new_err(msg),
        HeError::PlaintextOverflow(_) => PlaintextOverflow::new_err(msg),
        HeError::Format(_) => FormatError::new_err(msg),
        HeError::Value(_) | HeError::Backend(_) => HEError::new_err(msg),
    }
}

/// An IndexError (indexing is the one place Python expects it).
pub fn index_error(msg: impl Into<String>) -> PyErr {
    PyIndexError::new_err(msg.into())
}
