//! Typed errors of the engine. Each variant maps to one Python exception of
//! the `pycrcnn.HEError` hierarchy (see `src/python/errors.rs`); structured
//! fields become attributes of the exception (`exc.layer`, `exc.bound`, ...).

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
    #[error("{message}")]
    NoiseBudgetExhausted {
        /// What happened and what would help.
        message: String,
        /// The budget measured (bits, ≤ 0).
        budget: i64,
    },
    /// A value (or a bound on it) would not fit in the plaintext modulus.
    #[error("{message}")]
    PlaintextOverflow {
        /// What would overflow and what would help.
        message: String,
        /// The bound the values may reach (in real units, before the scale).
        bound: f64,
        /// What the plaintext modulus allows (in the same units).
        limit: f64,
    },
    /// Bytes that are not a valid, intact, matching pycrcnn blob.
    #[error("{0}")]
    Format(String),
    /// Shapes, indices or arguments that do not fit the operation.
    #[error("{0}")]
    Value(String),
    /// An error reported by fhe.rs that the checks above did not anticipate.
    #[error("fhe.rs: {0}")]
    Backend(String),
    /// A model run stopped because its per-layer callback asked it to.
    #[error("the run was cancelled after this layer by its callback")]
    Cancelled,
    /// An error raised by one layer of a model: which one, and what went wrong.
    #[error("layer {index} ({name}): {source}")]
    AtLayer {
        /// The layer's index (the torch module index where the model has one).
        index: i64,
        /// The layer's torch-like name.
        name: String,
        /// What went wrong.
        source: Box<HeError>,
    },
}

impl HeError {
    /// The error with the layer that raised it named first (kept once: an
    /// error that already names its layer is returned as it is).
    pub fn at_layer(self, index: i64, name: &str) -> HeError {
        match self {
            e @ HeError::AtLayer { .. } => e,
            e => HeError::AtLayer {
                index,
                name: name.to_string(),
                source: Box::new(e),
            },
        }
    }

    /// The error without its layer annotation.
    pub fn root(&self) -> &HeError {
        match self {
            HeError::AtLayer { source, .. } => source.root(),
            e => e,
        }
    }
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
