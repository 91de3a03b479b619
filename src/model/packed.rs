//! The packed layout: one image in the SIMD slots of a few ciphertexts, for
//! the single-square family conv → square → linear layers (LoLa, GAZELLE).
//!
//! Slots (row 0 of the m/2 × 2 SIMD matrix, n = m/2 slots) hold the first
//! convolution's output channels in blocks of `block = rows·Wo` slots:
//! channel o, output row i, column j at `o·block + i·Wo + j`. The client
//! uploads one ciphertext per (input channel c, row phase r < stride, kernel
//! column b): in every block, slot `i·Wo + j` holds `x_pad[c, s·i + r, s·j + b]`.
//! The convolution is then Horner's rule over kernel rows a = s·a' + r:
//! `acc = rot(acc, Wo) + Σ_{c,r,b} ct_{c,r,b} ⊙ mask_{a',c,r,b}` — products
//! first, rotations after, because fhe.rs's key switching has no special
//! prime and a rotation's noise would be multiplied by every later weight.
//! The square is one product per prime; the linear layers after it are one
//! integer matrix A (classes × conv outputs), evaluated with d diagonals
//! (d = classes rounded up to a power of two: slot p ≡ k mod d accumulates
//! class k), d1 baby steps (rotations by 1 of the input) and d2 giant steps
//! (Horner with rotations by d1). Class k is then the sum of the n/d slots
//! p ≡ k (mod d): rather than log2(n/d) rotations on the server, the server
//! adds the bias and a fresh random mask whose slots sum to zero within each
//! class, and the client sums after decrypting (it learns only the class
//! sums, as before). The result is switched to the last modulus. Plaintext
//! CRT: each prime runs the same steps with its own keys, in parallel.
//!
//! Every mask is built centred (see `Multiplier`), and [`PackedModel::reference`]
//! evaluates the same integers in i128: decryption must equal it exactly.

use std::sync::{Arc, Mutex};

use fhe::bfv::{BfvParameters, Ciphertext, Encoding as FheEncoding, Plaintext};
use fhe_math::rq::{traits::TryConvertFrom, Poly, Representation};
use fhe_traits::{FheDecoder, FheDecrypter, FheEncoder, FheEncrypter};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use crate::he::encoding::{centre, crt_centred, reduce_i128};
use crate::he::galois::{missing, RotationNeed};
use crate::he::growth::Growth;
use crate::he::tensor::Element;
use crate::he::{CipherTensor, Encoding, HeContext, HeError, HeParameters, Multiplier, Result};

/// The integers of a planned single-square model: what the planner fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedSpec {
    /// Input image shape [C, H, W].
    pub in_shape: [usize; 3],
    /// First convolution's weight shape [out, in, kh, kw].
    pub conv_shape: [usize; 4],
    /// Its integer weights, row-major.
    pub conv_weight: Vec<i64>,
    /// Its integer bias (at the scale of input × weight), one per output channel.
    pub conv_bias: Vec<i64>,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub padding: usize,
    /// The fused linear map after the square, [classes, out·Ho·Wo] row-major
    /// over (class, channel, row, column).
    pub linear_weight: Vec<i64>,
    /// Its integer bias, one per class (at the scale of the squared values × A).
    pub linear_bias: Vec<i64>,
    /// Inputs are encrypted as round(x · 2^input_bits).
    pub input_bits: u32,
    /// Output integers are logits · 2^output_bits.
    pub output_bits: u32,
}

/// Where values sit: derived from the spec and the ring degree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Slots per SIMD row (m/2).
    pub n: usize,
    /// Conv output height and width.
    pub ho: usize,
    /// Conv output width (the row pitch in the slots).
    pub wo: usize,
    /// Rows per block (Ho plus the rows the kernel reaches below).
    pub rows: usize,
    /// Slots per output channel.
    pub block: usize,
    /// Kernel rows per phase minus one (Horner steps of the convolution).
    pub amax: usize,
    /// Input ciphertexts (C · stride · kw).
    pub inputs: usize,
    /// Output classes.
    pub classes: usize,
    /// Diagonal period, baby steps and giant steps (d = d1·d2).
    pub d: usize,
    /// Baby steps.
    pub d1: usize,
    /// Giant steps.
    pub d2: usize,
    /// Ciphertext level of the linear part (after the square's modulus switch).
    pub lin_level: usize,
}

fn spec_err<T>(msg: String) -> Result<T> {
    Err(HeError::Value(msg))
}

impl PackedSpec {
    /// Checks shapes and sizes; the message says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let [c, h, w] = self.in_shape;
        let [co, ci, kh, kw] = self.conv_shape;
        if c == 0 || h == 0 || w == 0 || co == 0 || kh == 0 || kw == 0 || self.stride == 0 {
            return spec_err(format!("packed model: zero-sized input {:?}, kernel {:?} or stride {}", self.in_shape, self.conv_shape, self.stride));
        }
        if ci != c {
            return spec_err(format!("packed model: the convolution takes {ci} channels but the input has {c}"));
        }
        if h + 2 * self.padding < kh || w + 2 * self.padding < kw {
            return spec_err(format!("packed model: a {kh}×{kw} kernel does not fit the padded {h}×{w} input"));
        }
        if self.input_bits > 40 || self.output_bits > 200 {
            return spec_err(format!("packed model: input_bits {} (≤ 40) or output_bits {} (≤ 200) out of range", self.input_bits, self.output_bits));
        }
        if self.conv_weight.len() != co * ci * kh * kw || self.conv_bias.len() != co {
            return spec_err("packed model: convolution weights or bias do not match its shape".into());
        }
        let (ho, wo) = self.conv_out();
        let features = co * ho * wo;
        if self.linear_bias.is_empty() || self.linear_weight.len() != self.linear_bias.len() * features {
            return spec_err(format!(
                "packed model: the linear map must be [classes, {features}] with one bias per class; got {} weights and {} biases",
                self.linear_weight.len(),
                self.linear_bias.len()
            ));
        }
        Ok(())
    }

    /// Convolution output height and width.
    pub fn conv_out(&self) -> (usize, usize) {
        let [_, h, w] = self.in_shape;
        let [_, _, kh, kw] = self.conv_shape;
        ((h + 2 * self.padding - kh) / self.stride + 1, (w + 2 * self.padding - kw) / self.stride + 1)
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.linear_bias.len()
    }

    /// The layout at ring degree `m` with `n_moduli` ciphertext primes.
    pub fn layout(&self, m: usize, n_moduli: usize) -> Result<Layout> {
        self.validate()?;
        let [c, _, _] = self.in_shape;
        let [co, _, kh, kw] = self.conv_shape;
        let (ho, wo) = self.conv_out();
        let amax = (kh - 1) / self.stride;
        let rows = ho + amax;
        let block = rows * wo;
        let n = m / 2;
        if co * block > n {
            return Err(HeError::Parameter(format!(
                "packed layout: {co} channels of {rows}×{wo} slots need {} slots, more than the {n} of one SIMD row at m={m}; use a larger m",
                co * block
            )));
        }
        if n_moduli < 3 {
            return Err(HeError::Parameter(format!(
                "packed layout: needs at least 3 ciphertext moduli (square at level 0, linear part at level 1, result at the last), got {n_moduli}"
            )));
        }
        let classes = self.classes();
        let d = classes.next_power_of_two();
        if d > n {
            return Err(HeError::Parameter(format!("packed layout: {classes} classes do not fit {n} slots")));
        }
        let log_d = d.trailing_zeros();
        let d1 = 1usize << log_d.div_ceil(2);
        let d2 = d / d1;
        Ok(Layout { n, ho, wo, rows, block, amax, inputs: c * self.stride * kw, classes, d, d1, d2, lin_level: 1 })
    }

    /// Exact integer evaluation in i128: conv + bias, square, A·z + b.
    pub fn reference(&self, x: &[i64]) -> Result<Vec<i128>> {
        self.validate()?;
        let [c, h, w] = self.in_shape;
        if x.len() != c * h * w {
            return spec_err(format!("packed model: the input has {} values, the model takes {c}×{h}×{w}", x.len()));
        }
        let [co, _, kh, kw] = self.conv_shape;
        let (ho, wo) = self.conv_out();
        let (s, p) = (self.stride as isize, self.padding as isize);
        let mut z = Vec::with_capacity(co * ho * wo);
        for o in 0..co {
            for i in 0..ho {
                for j in 0..wo {
                    let mut acc = self.conv_bias[o] as i128;
                    for ch in 0..c {
                        for a in 0..kh {
                            for b in 0..kw {
                                let (y, xx) = (s * i as isize + a as isize - p, s * j as isize + b as isize - p);
                                if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = x[(ch * h + y as usize) * w + xx as usize] as i128;
                                acc += v * self.conv_weight[((o * c + ch) * kh + a) * kw + b] as i128;
                            }
                        }
                    }
                    z.push(acc * acc);
                }
            }
        }
        let f = z.len();
        Ok((0..self.classes())
            .map(|k| self.linear_weight[k * f..(k + 1) * f].iter().zip(&z).map(|(&a, &v)| a as i128 * v).sum::<i128>() + self.linear_bias[k] as i128)
            .collect())
    }
}

impl Layout {
    /// The rotation keys the layout needs, per level.
    pub fn rotation_needs(&self) -> Vec<RotationNeed> {
        let mut out = Vec::new();
        if self.amax > 0 {
            out.push(RotationNeed { level: 0, steps: vec![self.wo] });
        }
        let mut steps = Vec::new();
        if self.d1 > 1 {
            steps.push(1);
        }
        if self.d2 > 1 {
            steps.push(self.d1);
        }
        steps.sort_unstable();
        steps.dedup();
        if !steps.is_empty() {
            out.push(RotationNeed { level: self.lin_level, steps });
        }
        out
    }

    /// Rotations per plaintext prime in one run.
    pub fn rotations(&self) -> usize {
        self.amax + (self.d1 - 1) + (self.d2 - 1)
    }
}

/// Coefficients (centred) of the SIMD plaintext holding `slots` (row 0; the
/// rest zero). fhe.rs hides a plaintext's coefficients, so they are read back
/// through a product with the trivial ciphertext (1, 0), which returns the
/// plaintext's own polynomial.
fn simd_coefficients(slots: &[u64], par: &Arc<BfvParameters>) -> Result<Vec<i64>> {
    let pt = Plaintext::try_encode(slots, FheEncoding::simd(), par)?;
    let ctx = par.context_at_level(0)?;
    let mut one = Poly::try_convert_from(&[1i64][..], ctx, false, Representation::PowerBasis)?;
    one.change_representation(Representation::Ntt);
    let zero = Poly::zero(ctx, Representation::Ntt);
    let trivial = Ciphertext::new(vec![one, zero], par)?;
    let prod = &trivial * &pt;
    let mut c0 = prod[0].clone();
    c0.change_representation(Representation::PowerBasis);
    let t = par.plaintext();
    Ok(c0.coefficients().row(0).iter().map(|&v| centre(v, t)).collect())
}

fn slots_mod(values: &[i128], t: u64) -> Vec<u64> {
    values.iter().map(|&v| reduce_i128(v, t)).collect()
}

/// A mask (slot values) as a centred multiplier at `level`.
fn mask(values: &[i128], par: &Arc<BfvParameters>, level: usize) -> Result<Multiplier> {
    let coeffs = simd_coefficients(&slots_mod(values, par.plaintext()), par)?;
    Multiplier::poly(&coeffs, par.context_at_level(level)?)
}

fn plaintext_at(values: &[i128], par: &Arc<BfvParameters>, level: usize) -> Result<Plaintext> {
    Ok(Plaintext::try_encode(&slots_mod(values, par.plaintext())[..], FheEncoding::simd_at_level(level), par)?)
}

/// The masks and plaintexts of one prime.
struct PrimeMasks {
    /// Per Horner step a' (index a'), the (input ciphertext, mask) terms.
    conv: Vec<Vec<(usize, Multiplier)>>,
    conv_bias: Plaintext,
    /// Per giant step g2, per baby step g1: the pre-rotated diagonal (None when zero).
    diag: Vec<Vec<Option<Multiplier>>>,
}

/// A planned single-square model ready to run in the packed layout.
pub struct PackedModel {
    spec: PackedSpec,
    /// Masks per parameter set (fingerprint), built on first use.
    cache: Mutex<Vec<([u8; 16], Arc<Vec<PrimeMasks>>)>>,
}

impl PackedModel {
    /// A validated model.
    pub fn new(spec: PackedSpec) -> Result<PackedModel> {
        spec.validate()?;
        Ok(PackedModel { spec, cache: Mutex::new(Vec::new()) })
    }

    /// Its integers.
    pub fn spec(&self) -> &PackedSpec {
        &self.spec
    }

    /// The layout under `params`.
    pub fn layout(&self, params: &HeParameters) -> Result<Layout> {
        if !matches!(params.encoding(), Encoding::Batch { .. }) {
            return Err(HeError::Parameter("the packed layout needs SIMD parameters (the batch encoding's primes)".into()));
        }
        self.spec.layout(params.m(), params.moduli().len())
    }

    fn masks(&self, params: &HeParameters) -> Result<Arc<Vec<PrimeMasks>>> {
        let fp = params.fingerprint();
        if let Some((_, m)) = self.cache.lock().map_err(|_| HeError::Backend("mask cache poisoned".into()))?.iter().find(|(f, _)| *f == fp) {
            return Ok(m.clone());
        }
        let lay = self.layout(params)?;
        let built = params.bfv().par_iter().map(|par| self.build_masks(&lay, par)).collect::<Result<Vec<_>>>()?;
        let built = Arc::new(built);
        let mut cache = self.cache.lock().map_err(|_| HeError::Backend("mask cache poisoned".into()))?;
        cache.retain(|(f, _)| *f != fp);
        cache.push((fp, built.clone()));
        Ok(built)
    }

    fn build_masks(&self, lay: &Layout, par: &Arc<BfvParameters>) -> Result<PrimeMasks> {
        let sp = &self.spec;
        let [c, _, _] = sp.in_shape;
        let [co, ci, kh, kw] = sp.conv_shape;
        let s = sp.stride;
        let slots = 2 * lay.n;
        // Convolution masks: block o holds w[o, c, s·a'+r, b] on all its slots.
        let mut conv = Vec::with_capacity(lay.amax + 1);
        for ap in 0..=lay.amax {
            let mut terms = Vec::new();
            for ch in 0..c {
                for r in 0..s {
                    let a = s * ap + r;
                    if a >= kh {
                        continue;
                    }
                    for b in 0..kw {
                        let wv: Vec<i128> = (0..co).map(|o| sp.conv_weight[((o * ci + ch) * kh + a) * kw + b] as i128).collect();
                        if wv.iter().all(|&v| v == 0) {
                            continue;
                        }
                        let mut v = vec![0i128; slots];
                        for o in 0..co {
                            for p in o * lay.block..(o + 1) * lay.block {
                                v[p] = wv[o];
                            }
                        }
                        terms.push(((ch * s + r) * kw + b, mask(&v, par, 0)?));
                    }
                }
            }
            conv.push(terms);
        }
        let mut bias = vec![0i128; slots];
        for o in 0..co {
            for p in o * lay.block..(o + 1) * lay.block {
                bias[p] = sp.conv_bias[o] as i128;
            }
        }
        let conv_bias = plaintext_at(&bias, par, 0)?;
        // Linear map: column q of A sits at slot pos(q); D_g[p] = A[p mod d, col at slot p+g].
        let f = co * lay.ho * lay.wo;
        let mut col_of_slot = vec![usize::MAX; lay.n];
        for o in 0..co {
            for i in 0..lay.ho {
                for j in 0..lay.wo {
                    col_of_slot[o * lay.block + i * lay.wo + j] = (o * lay.ho + i) * lay.wo + j;
                }
            }
        }
        let n = lay.n;
        let mut diag = Vec::with_capacity(lay.d2);
        for g2 in 0..lay.d2 {
            let mut row = Vec::with_capacity(lay.d1);
            for g1 in 0..lay.d1 {
                let g = g1 + lay.d1 * g2;
                let mut v = vec![0i128; slots];
                let mut any = false;
                for (p, vp) in v.iter_mut().take(n).enumerate() {
                    // D'_{g1,g2}[p] = D_g[p − d1·g2].
                    let src = (p + n - (lay.d1 * g2) % n) % n;
                    let k = src % lay.d;
                    let q = col_of_slot[(src + g) % n];
                    if k < lay.classes && q != usize::MAX {
                        let a = sp.linear_weight[k * f + q];
                        if a != 0 {
                            *vp = a as i128;
                            any = true;
                        }
                    }
                }
                row.push(if any { Some(mask(&v, par, lay.lin_level)?) } else { None });
            }
            diag.push(row);
        }
        Ok(PrimeMasks { conv, conv_bias, diag })
    }

    /// Packs one image (integers, [C, H, W] row-major) into the layout's
    /// input ciphertexts (key holder, or public-key encryption).
    pub fn encrypt(&self, ctx: &HeContext, x: &[i64]) -> Result<CipherTensor> {
        let params = ctx.params();
        let lay = self.layout(params)?;
        let sp = &self.spec;
        let [c, h, w] = sp.in_shape;
        if x.len() != c * h * w {
            return spec_err(format!("the packed model takes one [{c}, {h}, {w}] image; got {} values", x.len()));
        }
        let [co, _, _, kw] = sp.conv_shape;
        let (s, pad) = (sp.stride, sp.padding as isize);
        let keys = ctx.keys()?;
        let key_id = ctx.key_id()?;
        let elems: Vec<Element> = (0..lay.inputs)
            .into_par_iter()
            .map(|idx| {
                let (ch, r, b) = (idx / (s * kw), (idx / kw) % s, idx % kw);
                let mut v = vec![0i128; 2 * lay.n];
                for i in 0..lay.rows {
                    let y = (s * i + r) as isize - pad;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    for j in 0..lay.wo {
                        let xx = (s * j + b) as isize - pad;
                        if xx < 0 || xx >= w as isize {
                            continue;
                        }
                        let val = x[(ch * h + y as usize) * w + xx as usize] as i128;
                        for o in 0..co {
                            v[o * lay.block + i * lay.wo + j] = val;
                        }
                    }
                }
                params
                    .bfv()
                    .iter()
                    .enumerate()
                    .map(|(k, par)| {
                        let pt = plaintext_at(&v, par, 0)?;
                        let mut rng = rand::rng();
                        Ok(match &keys.secret {
                            Some(sk) => sk[k].try_encrypt(&pt, &mut rng)?,
                            None => keys.public[k].try_encrypt(&pt, &mut rng)?,
                        })
                    })
                    .collect::<Result<Element>>()
            })
            .collect::<Result<_>>()?;
        let data = ArrayD::from_shape_vec(IxDyn(&[lay.inputs]), elems).map_err(|e| HeError::Value(e.to_string()))?;
        Ok(CipherTensor::from_parts(data, Some(params.m()), 1.0, Growth::Integer(0.0), params.clone(), key_id))
    }

    fn check_input(&self, ctx: &HeContext, x: &CipherTensor, count: usize, level: usize, stage: &str) -> Result<Layout> {
        ctx.check(x)?;
        let lay = self.layout(ctx.params())?;
        if x.batch() != Some(ctx.params().m()) || x.data().shape() != [count] {
            return spec_err(format!("the packed {stage} takes {count} packed ciphertexts (encrypt with the plan's context); got shape {:?}", x.data().shape()));
        }
        if x.level()? != level {
            return spec_err(format!("the packed {stage} takes ciphertexts at level {level}, got level {}", x.level()?));
        }
        Ok(lay)
    }

    fn require_steps(&self, ctx: &HeContext, lay: &Layout) -> Result<()> {
        let keys = ctx.keys()?;
        for need in lay.rotation_needs() {
            for &s in &need.steps {
                for rot in &keys.rotations {
                    if !rot.supports(need.level, s) {
                        return Err(missing(need.level, s));
                    }
                }
            }
        }
        Ok(())
    }

    /// The first convolution: Horner over kernel rows (products, then rotations by Wo), plus bias.
    pub fn conv(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let lay = self.check_input(ctx, x, self.spec.layout(ctx.params().m(), ctx.params().moduli().len())?.inputs, 0, "convolution")?;
        self.require_steps(ctx, &lay)?;
        let masks = self.masks(ctx.params())?;
        let keys = ctx.keys()?;
        let inputs: Vec<&Element> = x.data().iter().collect();
        let out: Element = (0..ctx.params().p().len())
            .into_par_iter()
            .map(|k| {
                let par = &ctx.params().bfv()[k];
                let pm = &masks[k];
                let mut acc: Option<Ciphertext> = None;
                for ap in (0..=lay.amax).rev() {
                    if let Some(a) = acc.take() {
                        acc = Some(keys.rotations[k].rotate(&a, 0, lay.wo)?);
                    }
                    for (idx, m) in &pm.conv[ap] {
                        let prod = m.apply(&inputs[*idx][k], par)?;
                        acc = Some(match acc {
                            Some(mut a) => {
                                a += &prod;
                                a
                            }
                            None => prod,
                        });
                    }
                }
                let acc = acc.ok_or_else(|| HeError::Value("the convolution has only zero weights".into()))?;
                Ok(&acc + &pm.conv_bias)
            })
            .collect::<Result<_>>()?;
        let data = ArrayD::from_shape_vec(IxDyn(&[1]), vec![out]).map_err(|e| HeError::Value(e.to_string()))?;
        Ok(x.with_data(data, 1.0, Growth::Integer(0.0)))
    }

    /// The square: one relinearized product per prime, switched to the linear part's level.
    pub fn square(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let lay = self.check_input(ctx, x, 1, 0, "square")?;
        let keys = ctx.keys()?;
        let e = &x.data()[[0]];
        let out: Element = (0..e.len())
            .into_par_iter()
            .map(|k| {
                let m = keys.mult[k].first().ok_or_else(|| HeError::Parameter("ciphertext products need relinearization keys".into()))?;
                let mut sq = m.multiply(&e[k], &e[k])?;
                let par = &ctx.params().bfv()[k];
                if par.level_of_context(sq[0].ctx())? < lay.lin_level {
                    sq.switch_to_level(lay.lin_level)?;
                }
                Ok(sq)
            })
            .collect::<Result<_>>()?;
        let data = ArrayD::from_shape_vec(IxDyn(&[1]), vec![out]).map_err(|e| HeError::Value(e.to_string()))?;
        Ok(x.with_data(data, 1.0, Growth::Integer(0.0)))
    }

    /// The fused linear map: diagonals with baby/giant steps, the sum over
    /// each class's slots, the bias; switched to the last modulus.
    pub fn linear(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let lay = self.check_input(ctx, x, 1, self.spec.layout(ctx.params().m(), ctx.params().moduli().len())?.lin_level, "linear map")?;
        self.require_steps(ctx, &lay)?;
        let masks = self.masks(ctx.params())?;
        let keys = ctx.keys()?;
        let e = &x.data()[[0]];
        let last = ctx.params().moduli().len() - 1;
        let lvl = lay.lin_level;
        let out: Element = (0..e.len())
            .into_par_iter()
            .map(|k| {
                let par = &ctx.params().bfv()[k];
                let rot = &keys.rotations[k];
                let pm = &masks[k];
                // Baby steps: z rotated by 0..d1 (successive rotations by 1).
                let mut baby = Vec::with_capacity(lay.d1);
                baby.push(e[k].clone());
                for g1 in 1..lay.d1 {
                    let next = rot.rotate(&baby[g1 - 1], lvl, 1)?;
                    baby.push(next);
                }
                // Giant steps by Horner: acc = rot(acc, d1) + Σ_g1 baby[g1] ⊙ D'.
                let mut acc: Option<Ciphertext> = None;
                for g2 in (0..lay.d2).rev() {
                    if let Some(a) = acc.take() {
                        acc = Some(rot.rotate(&a, lvl, lay.d1)?);
                    }
                    for (g1, m) in pm.diag[g2].iter().enumerate() {
                        if let Some(m) = m {
                            let prod = m.apply(&baby[g1], par)?;
                            acc = Some(match acc {
                                Some(mut a) => {
                                    a += &prod;
                                    a
                                }
                                None => prod,
                            });
                        }
                    }
                }
                let acc = match acc {
                    Some(a) => a,
                    None => {
                        let mut z = &e[k] - &e[k];
                        z.switch_to_level(lvl)?;
                        z
                    }
                };
                // Class k is the sum of the slots p ≡ k (mod d). Instead of
                // log2(n/d) rotations the client adds them up after
                // decryption; a fresh random mask whose slots sum to zero
                // within each class (mod t) hides everything but the sums.
                let mut acc = &acc + &self.mask_and_bias(&lay, par)?;
                acc.switch_to_level(last)?;
                Ok(acc)
            })
            .collect::<Result<_>>()?;
        let data = ArrayD::from_shape_vec(IxDyn(&[1]), vec![out]).map_err(|e| HeError::Value(e.to_string()))?;
        Ok(x.with_data(data, 1.0, Growth::Integer(0.0)))
    }

    /// The linear bias (class k in slot k) plus a uniformly random mask whose
    /// slots p ≡ k (mod d) sum to zero modulo t, for every k.
    fn mask_and_bias(&self, lay: &Layout, par: &Arc<BfvParameters>) -> Result<Plaintext> {
        use rand::Rng;
        let t = par.plaintext();
        let mut rng = rand::rng();
        let mut v = vec![0u64; 2 * lay.n];
        let mut sums = vec![0u64; lay.d];
        for p in lay.d..lay.n {
            let r = rng.random_range(0..t);
            v[p] = r;
            sums[p % lay.d] = (sums[p % lay.d] + r) % t;
        }
        for k in 0..lay.d {
            let b = self.spec.linear_bias.get(k).map_or(0, |&b| reduce_i128(b as i128, t));
            v[k] = (b + t - sums[k]) % t;
        }
        Ok(Plaintext::try_encode(&v[..], FheEncoding::simd_at_level(lay.lin_level), par)?)
    }

    /// All three stages.
    pub fn run(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let c = self.conv(ctx, x)?;
        let s = self.square(ctx, &c)?;
        self.linear(ctx, &s)
    }

    /// The exact output integers of a packed result (key holder): class k
    /// from slot k, combined over the primes by CRT, centred.
    pub fn decrypt_integers(&self, ctx: &HeContext, t: &CipherTensor) -> Result<Vec<i128>> {
        let sk = ctx.secret()?;
        ctx.check(t)?;
        let classes = self.spec.classes();
        if t.batch() != Some(ctx.params().m()) || t.data().shape() != [1] {
            return spec_err(format!("not a packed result (one packed ciphertext): shape {:?}", t.data().shape()));
        }
        let budget = ctx.noise_budget(t)?;
        if budget <= 0 {
            return Err(HeError::NoiseBudgetExhausted { message: "the packed result's noise budget is exhausted: decrypting it would give garbage".into(), budget });
        }
        let e = &t.data()[[0]];
        let residues: Vec<Vec<u64>> = e
            .iter()
            .zip(sk)
            .map(|(ct, sk)| {
                let pt = sk.try_decrypt(ct)?;
                Ok(Vec::<u64>::try_decode(&pt, FheEncoding::simd())?)
            })
            .collect::<Result<_>>()?;
        let p = ctx.params().p();
        let lay = self.layout(ctx.params())?;
        // Class k: the sum of the slots p ≡ k (mod d) of row 0, per prime.
        let sums: Vec<Vec<u64>> = residues
            .iter()
            .zip(p)
            .map(|(r, &t)| (0..classes).map(|k| r[..lay.n].iter().skip(k).step_by(lay.d).fold(0u64, |a, &x| (a + x) % t)).collect())
            .collect();
        Ok((0..classes).map(|k| crt_centred(&sums.iter().map(|r| r[k]).collect::<Vec<_>>(), p)).collect())
    }
}

/// One stage of a packed model, as the runner runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Input packing → first convolution + bias.
    Conv,
    /// The square (relinearized, switched to the linear part's level).
    Square,
    /// The fused linear map, switched to the last modulus.
    Linear,
}

/// A stage of a packed model: what [`crate::layers::Layer::Packed`] holds.
pub struct PackedStage {
    model: Arc<PackedModel>,
    stage: Stage,
}

impl PackedStage {
    /// `stage` of `model`.
    pub fn new(model: Arc<PackedModel>, stage: Stage) -> PackedStage {
        PackedStage { model, stage }
    }

    /// The model.
    pub fn model(&self) -> &Arc<PackedModel> {
        &self.model
    }

    /// Which stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The runner's name of the stage.
    pub fn name(&self) -> &'static str {
        match self.stage {
            Stage::Conv => "PackedConv2d",
            Stage::Square => "PackedSquare",
            Stage::Linear => "PackedLinear",
        }
    }

    /// Runs the stage.
    pub fn forward(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        match self.stage {
            Stage::Conv => self.model.conv(ctx, x),
            Stage::Square => self.model.square(ctx, x),
            Stage::Linear => self.model.linear(ctx, x),
        }
    }

    /// Logical output shape of one image ([classes] after the linear map).
    pub fn output_shape(&self) -> Vec<usize> {
        let [co, _, _, _] = self.model.spec.conv_shape;
        let (ho, wo) = self.model.spec.conv_out();
        match self.stage {
            Stage::Conv | Stage::Square => vec![co, ho, wo],
            Stage::Linear => vec![self.model.spec.classes()],
        }
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::he::context::tests::BATCH;
    use crate::he::params::ParametersRequest;
    use rand::Rng;

    pub(super) fn rnd(n: usize, lo: i64, hi: i64) -> Vec<i64> {
        let mut rng = rand::rng();
        (0..n).map(|_| rng.random_range(lo..=hi)).collect()
    }

    pub(super) fn spec(in_shape: [usize; 3], co: usize, k: usize, stride: usize, padding: usize, classes: usize, wb: i64) -> PackedSpec {
        let [c, _, _] = in_shape;
        let mut sp = PackedSpec {
            in_shape,
            conv_shape: [co, c, k, k],
            conv_weight: rnd(co * c * k * k, -wb, wb),
            conv_bias: rnd(co, -200, 200),
            stride,
            padding,
            linear_weight: vec![],
            linear_bias: rnd(classes, -1000, 1000),
            input_bits: 0,
            output_bits: 0,
        };
        let (ho, wo) = sp.conv_out();
        sp.linear_weight = rnd(classes * co * ho * wo, -wb, wb);
        sp
    }

    pub(super) fn context(m: usize, sizes: Vec<usize>, primes: usize, sp: &PackedSpec) -> HeContext {
        let p = crate::he::params::batch_primes_below(m, 1 << 31, primes);
        let req = ParametersRequest { m, p, n_plaintext_moduli: primes, sec: 128, encoding: BATCH, moduli_sizes: Some(sizes) };
        let params = req.build().unwrap();
        let lay = sp.layout(params.m(), params.moduli().len()).unwrap();
        let mut ctx = HeContext::new(params);
        ctx.keygen().unwrap();
        ctx.rotation_keygen(&lay.rotation_needs()).unwrap();
        ctx
    }

}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use crate::he::context::tests::BATCH;
    use crate::he::params::ParametersRequest;

    fn check(sp: PackedSpec, ctx: &HeContext, xb: i64) {
        let model = PackedModel::new(sp.clone()).unwrap();
        let [c, h, w] = sp.in_shape;
        for _ in 0..2 {
            let x = rnd(c * h * w, -xb, xb);
            let e = model.encrypt(ctx, &x).unwrap();
            let out = model.run(ctx, &e).unwrap();
            assert!(ctx.noise_budget(&out).unwrap() > 0);
            assert_eq!(model.decrypt_integers(ctx, &out).unwrap(), sp.reference(&x).unwrap());
        }
    }

    #[test]
    fn small_models_are_exact() {
        // Stride 2, padding 1, 3 input channels; one and two CRT primes.
        let sp = spec([3, 9, 9], 2, 3, 2, 1, 3, 7);
        let ctx = context(8192, vec![55, 55, 54, 54], 2, &sp);
        check(sp, &ctx, 7);
        let sp = spec([1, 10, 10], 3, 5, 1, 0, 10, 3);
        let ctx = context(8192, vec![55, 55, 54, 54], 1, &sp);
        check(sp, &ctx, 3);
    }

    #[test]
    fn missing_rotation_key_is_named() {
        let sp = spec([1, 8, 8], 2, 3, 1, 0, 4, 3);
        let req = ParametersRequest { m: 8192, p: vec![], n_plaintext_moduli: 1, sec: 128, encoding: BATCH, moduli_sizes: Some(vec![55, 55, 54, 54]) };
        let mut ctx = HeContext::new(req.build().unwrap());
        ctx.keygen().unwrap();
        let model = PackedModel::new(sp.clone()).unwrap();
        let e = model.encrypt(&ctx, &rnd(64, -3, 3)).unwrap();
        let err = model.conv(&ctx, &e).err().unwrap().to_string();
        assert!(err.contains("step 6"), "{err}");
    }
}
