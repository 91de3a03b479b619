//! Encrypted CNN layers as pure Rust over [`CipherTensor`]. Convolutions,
//! linear layers and pooling are affine maps (a weighted sum per output
//! element); activations are ciphertext products. Weights are encoded once
//! per (layer, parameters, level) and reused for every call.

mod affine;

pub use affine::{Affine, Geometry};

use crate::he::{CipherTensor, HeContext, HeError, Result};

/// One encrypted layer.
pub enum Layer {
    /// Conv2d, Conv1d, Linear or AvgPool2d.
    Affine(Affine),
    /// x².
    Square,
    /// Σ c_k x^k (coefficients lowest degree first).
    Polynomial(Vec<f64>),
    /// Flattens each image to one axis.
    Flatten,
    /// Decrypts and re-encrypts (needs the secret key).
    Rencryption,
}

impl Layer {
    /// The torch-like name of the layer.
    pub fn name(&self) -> String {
        match self {
            Layer::Affine(a) => a.geometry.name().to_string(),
            Layer::Square => "Square".into(),
            Layer::Polynomial(_) => "Polynomial".into(),
            Layer::Flatten => "Flatten".into(),
            Layer::Rencryption => "Rencryption".into(),
        }
    }

    /// Whether it needs ciphertext products (relinearization keys, noise).
    pub fn multiplies_ciphertexts(&self) -> bool {
        matches!(self, Layer::Square | Layer::Polynomial(_))
    }

    /// Runs the layer on `x` with the keys of `ctx`.
    pub fn forward(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        ctx.check(x)?;
        match self {
            Layer::Affine(a) => a.forward(x),
            Layer::Square => ctx.square(x),
            Layer::Polynomial(c) => ctx.polynomial(x, c),
            Layer::Flatten => {
                let start = x.image_axes_start();
                let n: usize = x.data.shape()[start..].iter().product();
                x.reshape_images(&[n])
            }
            Layer::Rencryption => ctx.rencrypt(x),
        }
    }
}

/// Output shape of one image for an input shape, without running anything.
pub fn output_shape(layer: &Layer, in_shape: &[usize]) -> Result<Vec<usize>> {
    match layer {
        Layer::Affine(a) => a.geometry.output_shape(in_shape),
        Layer::Flatten => Ok(vec![in_shape.iter().product()]),
        _ => Ok(in_shape.to_vec()),
    }
}

/// Error for a layer that cannot run encrypted.
pub fn unsupported(what: &str, alternative: &str) -> HeError {
    HeError::Value(format!("{what} cannot run on encrypted data; use {alternative}"))
}
