//! The one model runner: an ordered list of encrypted layers run over a
//! [`CipherTensor`], intermediates consumed, with a report per layer and a
//! per-layer callback that may stop the run. Every way of running a model —
//! `EncodedModel`, the server's `/compute`, the parameter tester, the noise
//! prediction — goes through [`Model::run`] or [`Model::predict`].

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};

use crate::he::growth::GrowthReport;
use crate::he::{CipherTensor, Encoding, HeContext, HeError, HeParameters, Result};
use crate::layers::Layer;

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
        RunOptions { range: None, rencrypt: true, measure_noise: false, switch_result: SwitchResult::Never }
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
    let margin = (moduli[0] as f64).log2() - (2.0 * p_max).log2() - (0.5 * (params.m() as f64).log2() + 4.0);
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
            shape = s.layer.output_shape(&shape).map_err(|e| e.at_layer(s.index, &s.layer.name()))?;
        }
        Ok(shape)
    }

    fn range(&self, range: &Option<Range<usize>>) -> Result<Range<usize>> {
        let r = range.clone().unwrap_or(0..self.steps.len());
        if r.start > r.end || r.end > self.steps.len() {
            return Err(HeError::Value(format!("layer positions {r:?} are outside the model's 0..{}", self.steps.len())));
        }
        Ok(r)
    }

    /// Runs the layers in `options.range` on `x` with the keys of `ctx` (the
    /// context `x` was encrypted under: layers serve every key). `x` itself
    /// is never changed; intermediates are consumed as the next layer runs
    /// (unless the callback kept them). Returns the output and the reports.
    pub fn run(&self, ctx: &HeContext, x: Arc<CipherTensor>, options: &RunOptions, on_layer: &mut OnLayer) -> Result<(CipherTensor, Vec<LayerReport>)> {
        let range = self.range(&options.range)?;
        let steps: Vec<(usize, &Step)> =
            range.map(|p| (p, &self.steps[p])).filter(|(_, s)| options.rencrypt || !matches!(*s.layer, Layer::Rencryption)).collect();
        if steps.is_empty() {
            return Err(HeError::Value("no layer to run in the chosen range".into()));
        }
        let measure = options.measure_noise && ctx.has_secret_key();
        let (out, reports) = execute(ctx, &steps, x, measure, on_layer, |layer, t| match Arc::try_unwrap(t) {
            Ok(owned) => layer.forward_owned(ctx, owned),
            Err(shared) => layer.forward(ctx, &shared),
        })?;
        let out = Arc::try_unwrap(out).unwrap_or_else(|shared| (*shared).clone());
        let switch = match options.switch_result {
            SwitchResult::Never => false,
            SwitchResult::Always => true,
            SwitchResult::Auto => switch_is_safe(out.params()),
        };
        let out = if switch { out.switch_to_last_level()? } else { out };
        Ok((out, reports))
    }

    /// Predicts, before running, whether the model fits the parameters of
    /// `ctx` for inputs bounded by `input_bound`: each layer's worst output
    /// element is computed on a probe ciphertext standing for every input
    /// (see [`Layer::probe`]), in a fraction of a pass's time. Needs the
    /// secret key (noise is measured). Returns a report for every layer that
    /// ran, and the first failure with the position of the layer that failed
    /// (an exhausted budget is [`HeError::NoiseBudgetExhausted`]), if any.
    pub fn predict(&self, ctx: &HeContext, input_bound: f64, on_layer: &mut OnLayer) -> Result<(Vec<LayerReport>, Option<(usize, HeError)>)> {
        ctx.secret()?;
        if !input_bound.is_finite() || input_bound < 0.0 {
            return Err(HeError::Value(format!("input_bound must be a finite number ≥ 0, got {input_bound}")));
        }
        let probe = match ctx.params().encoding() {
            Encoding::Fractional { .. } => ctx.encrypt(ArrayD::from_elem(IxDyn(&[]), input_bound).view())?,
            Encoding::Batch { .. } => ctx.encrypt(ArrayD::from_elem(IxDyn(&[1]), input_bound).view())?,
        };
        let steps: Vec<(usize, &Step)> = self.steps.iter().enumerate().collect();
        let mut reports = Vec::new();
        let mut exhausted = |r: &LayerReport, t: &Arc<CipherTensor>| -> Result<Flow> {
            reports.push(r.clone());
            if let Some(budget) = r.noise_budget.filter(|&b| b <= 0) {
                return Err(HeError::NoiseBudgetExhausted { message: "noise budget exhausted".into(), budget }.at_layer(r.index, &r.name));
            }
            on_layer(r, t)
        };
        let result = execute(ctx, &steps, Arc::new(probe), true, &mut exhausted, |layer, t| layer.probe(ctx, &t));
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
        let noise_budget = if measure_noise { Some(ctx.noise_budget(&out).map_err(annotate)?) } else { None };
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
