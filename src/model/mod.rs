//! The one model runner: an ordered list of encrypted layers run over a
//! [`CipherTensor`], intermediates consumed, with a report per layer and a
//! per-layer callback that may stop the run. Every way of running a model —
//! `EncodedModel`, the server's `/compute`, the parameter tester, the noise
//! prediction — goes through [`Model::run`] or [`Model::predict`].

pub mod packed;
pub mod packed_map;

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::he::growth::GrowthReport;
use crate::he::{CipherTensor, Encoding, HeContext, HeError, HeParameters, Result};
use crate::layers::{encode_inputs, IntTensor, Layer};

/// One layer of a model and the index it is known by (the torch module
/// index where the model came from torch; a rencryption has the index of
/// the module it precedes).
#[derive(Clone)]
pub struct Step {
    layer: Arc<Layer>,
    index: i64,
}

impl Step {
    /// A layer with its index.
    pub fn new(index: i64, layer: Arc<Layer>) -> Step {
        Step { layer, index }
    }

    /// The layer.
    pub fn layer(&self) -> &Arc<Layer> {
        &self.layer
    }

    /// The index the layer is known by.
    pub fn index(&self) -> i64 {
        self.index
    }
}

/// What one layer did in a run.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Position of the layer in the model.
    pub position: usize,
    /// The index the layer is known by (torch module index).
    pub index: i64,
    /// torch-like name.
    pub name: String,
    /// Wall-clock seconds of the layer.
    pub seconds: f64,
    /// Logical shape of the output.
    pub shape: Vec<usize>,
    /// Modulus level of the output.
    pub level: usize,
    /// The output's plaintext-growth bound against the plaintext modulus.
    pub growth: GrowthReport,
    /// Noise budget left (bits), measured where the secret key is and asked for.
    pub noise_budget: Option<i64>,
}

/// What a per-layer callback tells the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Run the next layer.
    Continue,
    /// Stop: the run ends with [`HeError::Cancelled`] naming this layer.
    Cancel,
}

/// Whether a run's result is switched down to the last modulus (the smallest
/// to send) before it is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchResult {
    /// Leave it at its level.
    Never,
    /// Always switch (may leave it undecryptable with tight moduli).
    Always,
    /// Switch when [`switch_is_safe`] says the result stays decryptable.
    Auto,
}

/// How to run a model.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Positions of the layers to run (default: all).
    pub range: Option<Range<usize>>,
    /// Run rencryption layers (key holder); otherwise they are skipped, as a
    /// server does between the segments of a round trip.
    pub rencrypt: bool,
    /// Measure the noise budget after every layer (needs the secret key;
    /// costs about one decryption per layer).
    pub measure_noise: bool,
    /// What to do with the result's modulus level.
    pub switch_result: SwitchResult,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            range: None,
            rencrypt: true,
            measure_noise: false,
            switch_result: SwitchResult::Never,
        }
    }
}

/// The per-layer callback: the layer's report and its output. Returning an
/// error stops the run with that error.
pub type OnLayer<'a> = dyn FnMut(&LayerReport, &Arc<CipherTensor>) -> Result<Flow> + 'a;

/// An ordered list of encrypted layers.
#[derive(Clone, Default)]
pub struct Model {
    steps: Vec<Step>,
}

/// Whether switching a result down to the last modulus keeps it
/// decryptable. A server cannot measure noise (it has no secret key), but it
/// knows the floor: after a switch to the single remaining prime q0 the
/// rounding noise is about √m·2⁴, which must stay well below q0/(2p) — 12 bits
/// of margin. With the engine's default moduli (q0 barely above p) that
/// never holds and the result stays at its level.
pub fn switch_is_safe(params: &HeParameters) -> bool {
    let moduli = params.moduli();
    if moduli.len() < 2 {
        return false;
    }
    let p_max = params.p().iter().copied().max().unwrap_or(u64::MAX) as f64;
    let margin =
        (moduli[0] as f64).log2() - (2.0 * p_max).log2() - (0.5 * (params.m() as f64).log2() + 4.0);
    margin >= 12.0
}

impl Model {
    /// A model of `steps`, in order.
    pub fn new(steps: Vec<Step>) -> Model {
        Model { steps }
    }

    /// The layers in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True for a model without layers.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Position ranges of the layers between rencryptions: what a server runs
    /// between two round trips to the key holder (rencryption layers belong
    /// to no segment; empty segments are left out).
    pub fn segments(&self) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, s) in self.steps.iter().enumerate() {
            if matches!(*s.layer, Layer::Rencryption) {
                if start < i {
                    out.push(start..i);
                }
                start = i + 1;
            }
        }
        if start < self.steps.len() {
            out.push(start..self.steps.len());
        }
        out
    }

    /// Output shape of one image for the shape of one input image.
    pub fn output_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        let mut shape = in_shape.to_vec();
        for s in &self.steps {
            shape = s
                .layer
                .output_shape(&shape)
                .map_err(|e| e.at_layer(s.index, &s.layer.name()))?;
        }
        Ok(shape)
    }

    fn range(&self, range: &Option<Range<usize>>) -> Result<Range<usize>> {
        let r = range.clone().unwrap_or(0..self.steps.len());
        if r.start > r.end || r.end > self.steps.len() {
            return Err(HeError::Value(format!(
                "layer positions {r:?} are outside the model's 0..{}",
                self.steps.len()
            )));
        }
        Ok(r)
    }

    /// Runs the layers in `options.range` on `x` with the keys of `ctx` (the
    /// context `x` was encrypted under: layers serve every key). `x` itself
    /// is never changed; intermediates are consumed as the next layer runs
    /// (unless the callback kept them). Returns the output and the reports.
    pub fn run(
        &self,
        ctx: &HeContext,
        x: Arc<CipherTensor>,
        options: &RunOptions,
        on_layer: &mut OnLayer,
    ) -> Result<(CipherTensor, Vec<LayerReport>)> {
        let range = self.range(&options.range)?;
        let steps: Vec<(usize, &Step)> = range
            .map(|p| (p, &self.steps[p]))
            .filter(|(_, s)| options.rencrypt || !matches!(*s.layer, Layer::Rencryption))
            .collect();
        if steps.is_empty() {
            return Err(HeError::Value("no layer to run in the chosen range".into()));
        }
        let measure = options.measure_noise && ctx.has_secret_key();
        let (out, reports) =
            execute(
                ctx,
                &steps,
                x,
                measure,
                on_layer,
                |layer, t| match Arc::try_unwrap(t) {
                    Ok(owned) => layer.forward_owned(ctx, owned),
                    Err(shared) => layer.forward(ctx, &shared),
                },
            )?;
        let out = Arc::try_unwrap(out).unwrap_or_else(|shared| (*shared).clone());
        let switch = match options.switch_result {
            SwitchResult::Never => false,
            SwitchResult::Always => true,
            SwitchResult::Auto => switch_is_safe(out.params()),
        };
        let out = if switch {
            out.switch_to_last_level()?
        } else {
            out
        };
        Ok((out, reports))
    }

    /// The model on plaintext inputs in the batch encoding's exact integer
    /// arithmetic (rencryptions included): what an encrypted run of the
    /// same inputs decrypts to, integer for integer, when nothing wraps.
    pub fn reference(&self, x: ArrayViewD<f64>, encoding: Encoding) -> Result<IntTensor> {
        let mut t = encode_inputs(x, encoding)?;
        for s in &self.steps {
            t = s
                .layer
                .reference(&t, encoding)
                .map_err(|e| e.at_layer(s.index, &s.layer.name()))?;
        }
        Ok(t)
    }

    /// Predicts, before running, whether the model fits the parameters of
    /// `ctx` for inputs bounded by `input_bound`: each layer's worst output
    /// element is computed on a probe ciphertext standing for every input
    /// (see [`Layer::probe`]), in a fraction of a pass's time. Needs the
    /// secret key (noise is measured). Returns a report for every layer that
    /// ran, and the first failure with the position of the layer that failed
    /// (an exhausted budget is [`HeError::NoiseBudgetExhausted`]), if any.
    pub fn predict(
        &self,
        ctx: &HeContext,
        input_bound: f64,
        on_layer: &mut OnLayer,
    ) -> Result<(Vec<LayerReport>, Option<(usize, HeError)>)> {
        ctx.secret()?;
        if !input_bound.is_finite() || input_bound < 0.0 {
            return Err(HeError::Value(format!(
                "input_bound must be a finite number ≥ 0, got {input_bound}"
            )));
        }
        let probe = match ctx.params().encoding() {
            Encoding::Fractional { .. } => {
                ctx.encrypt(ArrayD::from_elem(IxDyn(&[]), input_bound).view())?
            }
            Encoding::Batch { .. } => {
                ctx.encrypt(ArrayD::from_elem(IxDyn(&[1]), input_bound).view())?
            }
        };
        let steps: Vec<(usize, &Step)> = self.steps.iter().enumerate().collect();
        let mut reports = Vec::new();
        let mut exhausted = |r: &LayerReport, t: &Arc<CipherTensor>| -> Result<Flow> {
            reports.push(r.clone());
            if let Some(budget) = r.noise_budget.filter(|&b| b <= 0) {
                return Err(HeError::NoiseBudgetExhausted {
                    message: "noise budget exhausted".into(),
                    budget,
                }
                .at_layer(r.index, &r.name));
            }
            on_layer(r, t)
        };
        let result = execute(
            ctx,
            &steps,
            Arc::new(probe),
            true,
            &mut exhausted,
            |layer, t| layer.probe(ctx, &t),
        );
        match result {
            Ok(_) => Ok((reports, None)),
            Err(e) if matches!(e.root(), HeError::Cancelled) => Err(e),
            Err(e @ HeError::AtLayer { .. }) => {
                // An exhausted budget is found after its layer's report; any other failure before it.
                let position = match (e.root(), reports.last()) {
                    (HeError::NoiseBudgetExhausted { .. }, Some(last)) => last.position,
                    _ => reports.len(),
                };
                Ok((reports, Some((position, e))))
            }
            Err(e) => Err(e),
        }
    }
}

/// The loop every run shares: `step` on each layer in turn, a report and
/// the callback after each; errors name the layer that raised them.
fn execute(
    ctx: &HeContext,
    steps: &[(usize, &Step)],
    x: Arc<CipherTensor>,
    measure_noise: bool,
    on_layer: &mut OnLayer,
    step: impl Fn(&Layer, Arc<CipherTensor>) -> Result<CipherTensor>,
) -> Result<(Arc<CipherTensor>, Vec<LayerReport>)> {
    let mut x = x;
    let mut reports = Vec::with_capacity(steps.len());
    for &(position, s) in steps {
        let name = s.layer.name();
        let annotate = |e: HeError| e.at_layer(s.index, &name);
        let t0 = Instant::now();
        let out = step(&s.layer, x).map_err(annotate)?;
        let seconds = t0.elapsed().as_secs_f64();
        let noise_budget = if measure_noise {
            Some(ctx.noise_budget(&out).map_err(annotate)?)
        } else {
            None
        };
        let report = LayerReport {
            position,
            index: s.index,
            name: name.clone(),
            seconds,
            shape: out.shape(),
            level: out.level().map_err(annotate)?,
            growth: out.growth_report(),
            noise_budget,
        };
        x = Arc::new(out);
        let flow = on_layer(&report, &x).map_err(annotate)?;
        reports.push(report);
        if flow == Flow::Cancel {
            return Err(annotate(HeError::Cancelled));
        }
    }
    Ok((x, reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make, random};
    use crate::layers::{Affine, Geometry};

    const BATCH: Encoding = Encoding::Batch {
        scale_bits: 8,
        weight_scale_bits: 8,
    };

    /// Linear 4→3, Square, Rencryption, Linear 3→2: two segments.
    fn model() -> Model {
        let lin = |i, o, w: f64| {
            Arc::new(Layer::Affine(
                Affine::new(
                    Geometry::Linear {
                        in_features: i,
                        out_features: o,
                    },
                    vec![w; i * o],
                    None,
                )
                .unwrap(),
            ))
        };
        Model::new(vec![
            Step::new(0, lin(4, 3, 0.5)),
            Step::new(1, Arc::new(Layer::Square)),
            Step::new(2, Arc::new(Layer::Rencryption)),
            Step::new(2, lin(3, 2, -0.25)),
        ])
    }

    #[test]
    fn runs_every_layer_with_reports_and_callbacks() {
        let ctx = make(4096, vec![], BATCH, None);
        let m = model();
        assert_eq!(m.segments(), vec![0..2, 3..4]);
        assert_eq!(m.output_shape(&[4]).unwrap(), vec![2]);
        let x = Arc::new(ctx.encrypt(random(&[5, 4], -1.0, 1.0).view()).unwrap());
        let mut seen = Vec::new();
        let opts = RunOptions {
            measure_noise: true,
            ..RunOptions::default()
        };
        let (out, reports) = m
            .run(&ctx, x.clone(), &opts, &mut |r, t| {
                seen.push((r.position, r.name.clone(), t.shape()));
                Ok(Flow::Continue)
            })
            .unwrap();
        assert_eq!(
            seen.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(seen[3].2, vec![5, 2]);
        assert_eq!(reports.len(), 4);
        assert!(reports
            .iter()
            .all(|r| r.noise_budget.is_some_and(|b| b > 0)));
        assert_eq!(out.shape(), vec![5, 2]);
        // The input was not consumed; the values match a plaintext evaluation.
        let xin = ctx.decrypt(&x).unwrap();
        let d = ctx.decrypt(&out).unwrap();
        for i in 0..5 {
            let h: f64 = (xin
                .index_axis(ndarray::Axis(0), i)
                .iter()
                .map(|v| v * 0.5)
                .sum::<f64>())
            .powi(2);
            assert!(
                (d[[i, 0]] - (-0.25 * 3.0 * h)).abs() < 0.05,
                "{} vs {}",
                d[[i, 0]],
                -0.75 * h
            );
        }
        // A server skips rencryptions and runs one segment.
        let opts = RunOptions {
            range: Some(0..2),
            rencrypt: false,
            ..RunOptions::default()
        };
        let (seg, reports) = m
            .run(&ctx, x.clone(), &opts, &mut |_, _| Ok(Flow::Continue))
            .unwrap();
        assert_eq!((seg.shape(), reports.len()), (vec![5, 3], 2));
    }

    #[test]
    fn cancelling_and_errors_name_the_layer() {
        let ctx = make(4096, vec![], BATCH, None);
        let x = Arc::new(ctx.encrypt(random(&[2, 4], -1.0, 1.0).view()).unwrap());
        let err = model()
            .run(&ctx, x.clone(), &RunOptions::default(), &mut |r, _| {
                Ok(if r.position == 1 {
                    Flow::Cancel
                } else {
                    Flow::Continue
                })
            })
            .unwrap_err();
        assert!(matches!(err.root(), HeError::Cancelled));
        assert!(err.to_string().starts_with("layer 1 (Square): "), "{err}");
        // A layer that cannot run names itself; nothing panics.
        let bad = Model::new(vec![Step::new(
            7,
            Arc::new(Layer::Affine(
                Affine::new(
                    Geometry::Linear {
                        in_features: 3,
                        out_features: 1,
                    },
                    vec![1.0; 3],
                    None,
                )
                .unwrap(),
            )),
        )]);
        let err = bad
            .run(&ctx, x.clone(), &RunOptions::default(), &mut |_, _| {
                Ok(Flow::Continue)
            })
            .unwrap_err();
        assert!(matches!(err, HeError::AtLayer { index: 7, .. }), "{err}");
        assert!(model()
            .run(
                &ctx,
                x,
                &RunOptions {
                    range: Some(3..9),
                    ..RunOptions::default()
                },
                &mut |_, _| Ok(Flow::Continue)
            )
            .is_err());
    }

    #[test]
    fn predict_tracks_a_real_run_and_names_the_failing_layer() {
        let ctx = make(4096, vec![], BATCH, None);
        let (reports, failure) = model()
            .predict(&ctx, 0.5, &mut |_, _| Ok(Flow::Continue))
            .unwrap();
        assert!(failure.is_none(), "{:?}", failure.map(|f| f.1.to_string()));
        assert_eq!(reports.len(), 4);
        // Every row of Linear 4→3 is the heaviest: a real input of 0.5 everywhere is the worst case.
        let x = Arc::new(
            ctx.encrypt(ArrayD::from_elem(IxDyn(&[1, 4]), 0.5).view())
                .unwrap(),
        );
        let (_, real) = model()
            .run(
                &ctx,
                x,
                &RunOptions {
                    measure_noise: true,
                    ..RunOptions::default()
                },
                &mut |_, _| Ok(Flow::Continue),
            )
            .unwrap();
        for (p, r) in reports.iter().zip(&real) {
            assert_eq!(p.growth.coeff_bound, r.growth.coeff_bound, "{}", p.name);
            assert!(
                (p.noise_budget.unwrap() - r.noise_budget.unwrap()).abs() <= 2,
                "{}",
                p.name
            );
        }
        // Squares at m=2048 with a large batch prime: the failing layer is named.
        let small = make(2048, vec![], BATCH, None);
        let squares = Model::new(
            (0..4)
                .map(|i| Step::new(i, Arc::new(Layer::Square)))
                .collect(),
        );
        let (_, failure) = squares
            .predict(&small, 1.0, &mut |_, _| Ok(Flow::Continue))
            .unwrap();
        let (position, err) = failure.expect("four squares cannot fit m=2048");
        assert!(
            err.to_string()
                .starts_with(&format!("layer {position} (Square)")),
            "{position}: {err}"
        );
    }

    #[test]
    fn switching_is_safe_only_with_room_above_p() {
        let ctx = make(4096, vec![], BATCH, None);
        assert!(
            !switch_is_safe(ctx.params()),
            "the default moduli leave q0 barely above p"
        );
        let roomy = make(4096, vec![65537], BATCH, Some(vec![60, 49]));
        assert!(switch_is_safe(roomy.params()));
    }
}
