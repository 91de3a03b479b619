//! Encrypted layers as pure Rust over [`CipherTensor`]. Convolutions, linear
//! layers and pooling are affine maps (a weighted sum per output element,
//! computed by one lazy-reduction kernel); activations are ciphertext
//! products. Weights are encoded once per (layer, parameters, level) and
//! reused for every call and every key.

mod activation;
mod affine;
mod affine_map;
mod kernel;
mod reference;

pub use activation::{polynomial, square, square_pool};
pub use affine::{Affine, Geometry};
pub use affine_map::AffineMap;
pub use kernel::weighted_sum;
pub use reference::{encode_inputs, IntTensor};

use std::sync::Arc;

use crate::he::{CipherTensor, HeContext, Result};

/// A square with the layers fused around it (see [`square_pool`]): the
/// affine layer before it, if any, and the average pooling after it, each
/// the model's own layer, shared (and their weight caches with them).
pub struct FusedSquare {
    before: Option<Arc<Layer>>,
    pool: Arc<Layer>,
}

impl FusedSquare {
    /// The affine layer before the square, if fused.
    pub fn before(&self) -> Option<&Affine> {
        match self.before.as_deref() {
            Some(Layer::Affine(a)) => Some(a),
            _ => None,
        }
    }

    /// The pooling after the square, if it still is one.
    pub fn pool(&self) -> Option<&Affine> {
        match &*self.pool {
            Layer::Affine(a) => Some(a),
            _ => None,
        }
    }

    fn pool_or_err(&self) -> Result<&Affine> {
        self.pool().ok_or_else(|| {
            crate::he::HeError::Value("a fused square needs an average pooling after it".into())
        })
    }
}

/// One encrypted layer.
pub enum Layer {
    /// Conv2d, Conv1d, Linear or AvgPool2d.
    Affine(Affine),
    /// x².
    Square,
    /// [affine →] x² → average pooling as one step (see [`square_pool`]):
    /// what a model's square becomes when a pooling follows it, chosen when
    /// the model is built.
    SquarePool(FusedSquare),
    /// A layer whose work the layer before it does (the pooling of a
    /// [`Layer::SquarePool`]): passes its input through, keeps the name.
    Absorbed(Arc<Layer>),
    /// Σ c_k x^k (coefficients lowest degree first).
    Polynomial(Vec<f64>),
    /// Flattens each image to one axis.
    Flatten,
    /// Decrypts and re-encrypts (needs the secret key).
    Rencryption,
    /// A stage of a model in the packed single-image layout (`crate::model::packed`).
    Packed(crate::model::packed::PackedStage),
}

impl Layer {
    /// A square between `before` and `next` fused into one step where
    /// `next` is an average pooling: the layers to use in place of
    /// `(before, the square, next)`; `before` is absorbed when it is an
    /// affine layer (its output is then never held whole: the memory peak of
    /// a CNN), else left as it is (`None`). `None` when `next` is not an
    /// average pooling. Chosen once, when the model is built, so that a
    /// model run and a loop over its layers compute the same way.
    pub fn fuse_square(
        before: Option<&Arc<Layer>>,
        next: &Arc<Layer>,
    ) -> Option<(Option<Layer>, Layer, Layer)> {
        if !matches!(&**next, Layer::Affine(a) if matches!(a.geometry(), Geometry::AvgPool2d { .. }))
        {
            return None;
        }
        let before = before
            .filter(|b| matches!(&***b, Layer::Affine(_)))
            .cloned();
        let fused = Layer::SquarePool(FusedSquare {
            before: before.clone(),
            pool: next.clone(),
        });
        let pool = Layer::Absorbed(next.clone());
        Some(match before {
            Some(_) => (Some(fused), Layer::Absorbed(Arc::new(Layer::Square)), pool),
            None => (None, fused, pool),
        })
    }

    /// The torch-like name of the layer.
    pub fn name(&self) -> String {
        match self {
            Layer::Affine(a) => a.geometry().name().to_string(),
            Layer::Square => "Square".into(),
            Layer::SquarePool(f) => {
                let before = f
                    .before()
                    .map(|a| format!("{}+", a.geometry().name()))
                    .unwrap_or_default();
                format!(
                    "{before}Square+{}",
                    f.pool().map_or("?", |p| p.geometry().name())
                )
            }
            Layer::Absorbed(l) => l.name(),
            Layer::Polynomial(_) => "Polynomial".into(),
            Layer::Flatten => "Flatten".into(),
            Layer::Rencryption => "Rencryption".into(),
            Layer::Packed(s) => s.name().into(),
        }
    }

    /// Whether it needs ciphertext products (relinearization keys, noise).
    pub fn multiplies_ciphertexts(&self) -> bool {
        matches!(
            self,
            Layer::Square | Layer::SquarePool(_) | Layer::Polynomial(_)
        ) || matches!(self, Layer::Packed(s) if s.multiplies_ciphertexts())
    }

    /// Runs the layer on `x` with the keys of `ctx`; `x` is left as it is.
    pub fn forward(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        ctx.check(x)?;
        match self {
            Layer::Affine(a) => a.forward(x),
            Layer::Square => square(ctx, x.clone()),
            Layer::SquarePool(f) => square_pool(ctx, x.clone(), f.before(), f.pool_or_err()?),
            Layer::Absorbed(_) => Ok(x.clone()),
            Layer::Polynomial(c) => polynomial(ctx, x, c),
            Layer::Flatten => {
                let n: usize = x.image_shape().iter().product();
                x.reshape_images(&[n])
            }
            Layer::Rencryption => ctx.rencrypt(x),
            Layer::Packed(s) => s.forward(ctx, x),
        }
    }

    /// Runs the layer on an intermediate result nobody needs afterwards: a
    /// square frees its input as it goes (half the peak memory).
    pub fn forward_owned(&self, ctx: &HeContext, x: CipherTensor) -> Result<CipherTensor> {
        match self {
            Layer::Square => {
                ctx.check(&x)?;
                square(ctx, x)
            }
            Layer::SquarePool(f) => square_pool(ctx, x, f.before(), f.pool_or_err()?),
            Layer::Absorbed(_) => {
                ctx.check(&x)?;
                Ok(x)
            }
            _ => self.forward(ctx, &x),
        }
    }

    /// The layer's worst output element for inputs that are all `probe` (a
    /// tensor of one element): what [`crate::model::Model::predict`] runs to
    /// foresee noise and plaintext growth at a fraction of a pass's cost.
    pub fn probe(&self, ctx: &HeContext, probe: &CipherTensor) -> Result<CipherTensor> {
        match self {
            Layer::Affine(a) => {
                ctx.check(probe)?;
                a.probe(probe)
            }
            // Flattening moves values without changing them.
            Layer::Flatten | Layer::Absorbed(_) => Ok(probe.clone()),
            // Unfused on the probe: the fused step's noise is at most the same.
            Layer::SquarePool(f) => {
                ctx.check(probe)?;
                let x = match f.before() {
                    // Relinearized before the affine layer, as the step does
                    // where that layer has no more outputs than inputs (the
                    // probe has no image shape to tell): the key switch's
                    // noise times the weights is the larger of the two
                    // paths' noise, so the prediction stays on the safe side.
                    Some(a) => a.probe(&ctx.relinearized(probe)?)?,
                    None => probe.clone(),
                };
                f.pool_or_err()?.probe(&square(ctx, x)?)
            }
            Layer::Packed(_) => Err(crate::he::HeError::Value(
                "packed stages are not predicted on probes: the packed plan's report predicts them"
                    .into(),
            )),
            _ => self.forward(ctx, probe),
        }
    }

    /// Output shape of one image for an input shape, without running anything.
    pub fn output_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        match self {
            Layer::Affine(a) => a.geometry().output_shape(in_shape),
            Layer::Flatten => Ok(vec![in_shape.iter().product()]),
            Layer::SquarePool(f) => {
                let sq = match f.before() {
                    Some(a) => a.geometry().output_shape(in_shape)?,
                    None => in_shape.to_vec(),
                };
                f.pool_or_err()?.geometry().output_shape(&sq)
            }
            Layer::Packed(s) => Ok(s.output_shape()),
            _ => Ok(in_shape.to_vec()),
        }
    }
}
