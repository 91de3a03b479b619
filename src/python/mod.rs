//! PyO3 bindings: conversions and errors only; the math lives in `he`,
//! `layers` and `model`.

pub mod context;
pub mod errors;
pub mod integers;
pub mod layers;
pub mod model;
pub mod packed;
pub mod pool;
pub mod shapes;
pub mod tensor;
