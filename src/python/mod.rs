//! PyO3 bindings: conversions and errors only; the math lives in `he` and `layers`.

pub mod context;
pub mod errors;
pub mod layers;
pub mod pool;
pub mod shapes;
pub mod tensor;
