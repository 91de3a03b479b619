//! Typed errors of the engine. Each variant maps to one Python exception of
//! the `pycrcnn.HEError` hierarchy (see `src/python/errors.rs`).

use thiserror::Error;

/// Every failure the engine reports. Messages say what was wrong and what is allowed.
#[derive(Debug, Error)]
pub enum HeError {
    /// Parameters that cannot be met (degree, security level, moduli, plaintext modulus).
    #[error("{0}")]
    Parameter(String),
    /// An operation that needs the secret key was asked of a context without one.
    #[error("{0}")]
    SecretKeyRequired(String),
    /// A ciphertext's invariant noise budget is used up: decrypting it would give garbage.
    #[error("{0}")]
    NoiseBudgetExhausted(String),
    /// A value (or a bound on it) would not fit in the plaintext modulus.
    #[error("{0}")]
    PlaintextOverflow(String),
    /// Bytes that are not a valid, intact, matching pycrcnn blob.
    #[error("{0}")]
    Format(String),
    /// Shapes, indices or arguments that do not fit the operation.
    #[error("{0}")]
    Value(String),
    /// An error reported by fhe.rs that the checks above did not anticipate.
    #[error("fhe.rs: {0}")]
    Backend(String),
}

impl From<fhe::Error> for HeError {
    fn from(e: fhe::Error) -> Self {
        HeError::Backend(e.to_string())
    }
}

impl From<fhe_math::Error> for HeError {
    fn from(e: fhe_math::Error) -> Self {
        HeError::Backend(e.to_string())
    }
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, HeError>;

/// Shorthand for a [`HeError::Value`].
pub(crate) fn value_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(HeError::Value(msg.into()))
}
