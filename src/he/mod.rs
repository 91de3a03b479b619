//! The HE core over fhe.rs: parameters and security levels, keys, encodings,
//! CipherTensor, noise and serialization. Never names Python.

pub mod context;
pub mod encoding;
pub mod error;
pub mod galois;
pub mod growth;
pub mod multiplier;
pub mod params;
pub mod serialize;
pub mod square;
pub mod tensor;

pub use context::HeContext;
pub use error::{HeError, Result};
pub use multiplier::Multiplier;
pub use params::{Encoding, HeParameters, ParametersRequest};
pub use tensor::CipherTensor;
