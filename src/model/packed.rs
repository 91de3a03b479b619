//! The packed layout: one image in the SIMD slots of a few ciphertexts, for
//! models conv → activation → (linear map → activation)* → linear layers
//! (LoLa, GAZELLE).
//!
//! Slots (row 0 of the m/2 × 2 SIMD matrix, n = m/2 slots) hold the first
//! convolution's output channels in blocks of `block` slots (n divided by
//! the channels rounded up to a power of two when that holds `rows·Wo`, so
//! that block offsets wrap around the row and later maps share diagonals
//! across channels): channel o, output row i, column j at
//! `o·block + i·Wo + j`. The client uploads one ciphertext per (input
//! channel c, row phase r < stride, kernel column b): in every block, slot
//! `i·Wo + j` holds `x_pad[c, s·i + r, s·j + b]`. The convolution is then
//! Horner's rule over kernel rows a = s·a' + r:
//! `acc = rot(acc, Wo) + Σ_{c,r,b} ct_{c,r,b} ⊙ mask_{a',c,r,b}` — products
//! first, rotations after, because fhe.rs's key switching has no special
//! prime and a rotation's noise would be multiplied by every later weight.
//!
//! An activation is `c2·z² + c1·z + c0` (the square is [0, 0, 1]): one
//! relinearized product per prime, then a switch down to the next stage's
//! level. Between two activations, the linear layers (convolutions with any
//! stride, padding and channels, pooling, linear layers) are fused by the
//! planner into one integer map, evaluated here by diagonals over the slot
//! layout the previous stage left, with baby-step/giant-step rotations
//! ([`super::packed_map`] places the outputs and schedules the rotations).
//! The first map may use both SIMD rows: the client packs row 1 as row 0
//! rotated by a shift (the conv's masks and bias likewise, so the conv and
//! the activation keep it), each mask's row 1 then reads a second diagonal,
//! and one row swap adds row 1's partial sums to row 0 (two-square LeNet-1:
//! the 480 diagonals of its map in 240 products and 33 rotations, not 53).
//! The linear layers after the last activation are one integer matrix A
//! (classes × features), evaluated with d diagonals (d = classes rounded up
//! to a power of two: slot p ≡ k mod d accumulates class k), d1 baby steps
//! (rotations by 1 of the input) and d2 giant steps (Horner with rotations
//! by d1). Class k is then the sum of the n/d slots p ≡ k (mod d): rather
//! than log2(n/d) rotations on the server, the server adds the bias and a
//! fresh random mask whose slots sum to zero within each class, and the
//! client sums after decrypting (it learns only the class sums, as before).
//! The result is switched to the last modulus. Plaintext CRT: each prime
//! runs the same steps with its own keys, in parallel.
//!
//! Every mask is built centred (see `Multiplier`), and [`PackedSpec::reference`]
//! evaluates the same integers in i128: decryption must equal it exactly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use fhe::bfv::{BfvParameters, Ciphertext, Encoding as FheEncoding, Plaintext};
use fhe_math::rq::{traits::TryConvertFrom, Poly, Representation};
use fhe_traits::{FheDecoder, FheDecrypter, FheEncoder, FheEncrypter};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::packed_map::{plan_map, MapPlan};
use crate::he::encoding::{centre, crt_centred, reduce_i128};
use crate::he::galois::{missing, RotationNeed};
use crate::he::growth::Growth;
use crate::he::tensor::Element;
use crate::he::{CipherTensor, Encoding, HeContext, HeError, HeParameters, Multiplier, Result};

/// The square as an activation: 0 + 0·z + 1·z².
pub const SQUARE: [i128; 3] = [0, 0, 1];

/// A linear map between two activations, fused by the planner.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenMap {
    /// Output shape [C, H, W]; features in row-major order.
    pub out_shape: [usize; 3],
    /// Per output feature, its (input feature, integer weight) terms (weights ≠ 0).
    pub rows: Vec<Vec<(usize, i64)>>,
    /// Integer bias per output feature.
    pub bias: Vec<i128>,
}

/// The integers of a planned model: what the planner fixed.
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
    /// The activations, one after the convolution and one after every hidden
    /// map: integer coefficients [c0, c1, c2] of c0 + c1·z + c2·z² (c2 ≠ 0).
    pub activations: Vec<[i128; 3]>,
    /// The linear maps between activations (one fewer than activations).
    pub maps: Vec<HiddenMap>,
    /// The fused linear map after the last activation, [classes, features]
    /// row-major over (class, channel, row, column).
    pub linear_weight: Vec<i64>,
    /// Its integer bias, one per class (at the output scale: may pass 64 bits).
    pub linear_bias: Vec<i128>,
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
    /// Conv output width.
    pub wo: usize,
    /// Slots between two rows (Wo, or the power of two above it with hidden maps).
    pub pitch: usize,
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
    /// Ciphertext level each activation's input is at (the conv's is 0).
    pub act_levels: Vec<usize>,
    /// The hidden maps: placement and rotations; map j runs at `act_levels[j + 1]`.
    pub maps: Vec<MapPlan>,
    /// Slots of the features the final linear map reads.
    pub pos_last: Vec<usize>,
    /// Ciphertext level of the final linear part (after the last activation).
    pub lin_level: usize,
}

fn spec_err<T>(msg: String) -> Result<T> {
    Err(HeError::Value(msg))
}

fn overflow() -> HeError {
    HeError::Value("packed model: the reference overflows 127 bits; use smaller scales".into())
}

impl PackedSpec {
    /// Checks shapes and sizes; the message says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let [c, h, w] = self.in_shape;
        let [co, ci, kh, kw] = self.conv_shape;
        if c == 0 || h == 0 || w == 0 || co == 0 || kh == 0 || kw == 0 || self.stride == 0 {
            return spec_err(format!(
                "packed model: zero-sized input {:?}, kernel {:?} or stride {}",
                self.in_shape, self.conv_shape, self.stride
            ));
        }
        if ci != c {
            return spec_err(format!(
                "packed model: the convolution takes {ci} channels but the input has {c}"
            ));
        }
        if h + 2 * self.padding < kh || w + 2 * self.padding < kw {
            return spec_err(format!(
                "packed model: a {kh}×{kw} kernel does not fit the padded {h}×{w} input"
            ));
        }
        if self.input_bits > 40 || self.output_bits > 250 {
            return spec_err(format!(
                "packed model: input_bits {} (≤ 40) or output_bits {} (≤ 250) out of range",
                self.input_bits, self.output_bits
            ));
        }
        if self.conv_weight.len() != co * ci * kh * kw || self.conv_bias.len() != co {
            return spec_err(
                "packed model: convolution weights or bias do not match its shape".into(),
            );
        }
        if self.activations.len() != self.maps.len() + 1 {
            return spec_err(format!(
                "packed model: {} activations need {} maps between them, got {}",
                self.activations.len(),
                self.activations.len().saturating_sub(1),
                self.maps.len()
            ));
        }
        if let Some(j) = self.activations.iter().position(|a| a[2] == 0) {
            return spec_err(format!("packed model: activation {j} has no square term (c2 = 0): fuse it into the linear map"));
        }
        let (ho, wo) = self.conv_out();
        let mut features = co * ho * wo;
        for (j, m) in self.maps.iter().enumerate() {
            let out: usize = m.out_shape.iter().product();
            if out == 0 || m.rows.len() != out || m.bias.len() != out {
                return spec_err(format!(
                    "packed model: map {j} must have one row and one bias per output of {:?}",
                    m.out_shape
                ));
            }
            if m.rows.iter().flatten().any(|&(f, _)| f >= features) {
                return spec_err(format!(
                    "packed model: map {j} reads an input feature beyond its {features} inputs"
                ));
            }
            features = out;
        }
        if self.linear_bias.is_empty()
            || self.linear_weight.len() != self.linear_bias.len() * features
        {
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
        (
            (h + 2 * self.padding - kh) / self.stride + 1,
            (w + 2 * self.padding - kw) / self.stride + 1,
        )
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.linear_bias.len()
    }

    /// The logical shape after the convolution (j = 0) or after map j − 1.
    pub fn shape_after(&self, j: usize) -> [usize; 3] {
        if j == 0 {
            let (ho, wo) = self.conv_out();
            [self.conv_shape[0], ho, wo]
        } else {
            self.maps[j - 1].out_shape
        }
    }

    /// The layout at ring degree `m` with `n_moduli` ciphertext primes.
    pub fn layout(&self, m: usize, n_moduli: usize) -> Result<Layout> {
        self.validate()?;
        let [c, _, _] = self.in_shape;
        let [co, _, kh, kw] = self.conv_shape;
        let (ho, wo) = self.conv_out();
        let amax = (kh - 1) / self.stride;
        let rows = ho + amax;
        let n = m / 2;
        let wrap = n / co.next_power_of_two();
        let block = if wrap >= rows * wo { wrap } else { rows * wo };
        // With hidden maps, rows are `pitch` slots apart, a power of two
        // dividing the block when it fits: the maps' diagonals then repeat with
        // the same period across rows and channel blocks, and baby steps line
        // up with giant steps (two-square LeNet-1: 66 → 55 rotations).
        let pitch = if self.maps.is_empty() || block != wrap {
            wo
        } else {
            Some(wo.next_power_of_two())
                .filter(|&p| rows * p <= block)
                .unwrap_or(wo)
        };
        if co * block > n {
            return Err(HeError::Parameter(format!(
                "packed layout: {co} channels of {rows}×{wo} slots need {} slots, more than the {n} of one SIMD row at m={m}; use a larger m",
                co * rows * wo
            )));
        }
        let acts = self.activations.len();
        if n_moduli < acts + 2 {
            return Err(HeError::Parameter(format!(
                "packed layout: {acts} activation(s) need at least {} ciphertext moduli (one level per activation, the linear part above the last), got {n_moduli}",
                acts + 2
            )));
        }
        // Each activation switches down one level (rotations' key-switching
        // noise is absolute: lower levels would leave less room for it).
        let act_levels: Vec<usize> = (0..acts).collect();
        let lin_level = acts;
        let classes = self.classes();
        let d = classes.next_power_of_two();
        if d > n {
            return Err(HeError::Parameter(format!(
                "packed layout: {classes} classes do not fit {n} slots"
            )));
        }
        let mut pos: Vec<usize> = (0..co)
            .flat_map(|o| {
                (0..ho).flat_map(move |i| (0..wo).map(move |j| o * block + i * pitch + j))
            })
            .collect();
        let mut maps = Vec::with_capacity(self.maps.len());
        for (j, m) in self.maps.iter().enumerate() {
            // The first map's input rows are the client's to arrange (see `Layout::row_shift`).
            let plan = plan_map(&m.rows, m.out_shape, &pos, n, j == 0)
                .map_err(|e| HeError::Parameter(format!("packed layout, map {j}: {e}")))?;
            pos = plan.pos_out.clone();
            maps.push(plan);
        }
        let log_d = d.trailing_zeros();
        let d1 = 1usize << log_d.div_ceil(2);
        let d2 = d / d1;
        Ok(Layout {
            n,
            ho,
            wo,
            pitch,
            rows,
            block,
            amax,
            inputs: c * self.stride * kw,
            classes,
            d,
            d1,
            d2,
            act_levels,
            maps,
            pos_last: pos,
            lin_level,
        })
    }

    /// Exact integer evaluation in i128: conv + bias, activations, maps, A·z + b.
    pub fn reference(&self, x: &[i64]) -> Result<Vec<i128>> {
        self.validate()?;
        let [c, h, w] = self.in_shape;
        if x.len() != c * h * w {
            return spec_err(format!(
                "packed model: the input has {} values, the model takes {c}×{h}×{w}",
                x.len()
            ));
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
                                let (y, xx) = (
                                    s * i as isize + a as isize - p,
                                    s * j as isize + b as isize - p,
                                );
                                if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = x[(ch * h + y as usize) * w + xx as usize] as i128;
                                acc +=
                                    v * self.conv_weight[((o * c + ch) * kh + a) * kw + b] as i128;
                            }
                        }
                    }
                    z.push(acc);
                }
            }
        }
        let act = |z: Vec<i128>, a: &[i128; 3]| -> Result<Vec<i128>> {
            z.into_iter()
                .map(|v| {
                    let sq = v
                        .checked_mul(v)
                        .and_then(|q| q.checked_mul(a[2]))
                        .ok_or_else(overflow)?;
                    let lin = v.checked_mul(a[1]).ok_or_else(overflow)?;
                    sq.checked_add(lin)
                        .and_then(|u| u.checked_add(a[0]))
                        .ok_or_else(overflow)
                })
                .collect()
        };
        fn dot(terms: impl Iterator<Item = (i64, i128)>, bias: i128) -> Result<i128> {
            let mut acc = bias;
            for (w, v) in terms {
                acc = v
                    .checked_mul(w as i128)
                    .and_then(|u| u.checked_add(acc))
                    .ok_or_else(overflow)?;
            }
            Ok(acc)
        }
        let mut z = act(z, &self.activations[0])?;
        for (j, m) in self.maps.iter().enumerate() {
            let y = m
                .rows
                .iter()
                .zip(&m.bias)
                .map(|(r, &b)| dot(r.iter().map(|&(f, w)| (w, z[f])), b))
                .collect::<Result<Vec<_>>>()?;
            z = act(y, &self.activations[j + 1])?;
        }
        let f = z.len();
        (0..self.classes())
            .map(|k| {
                dot(
                    self.linear_weight[k * f..(k + 1) * f]
                        .iter()
                        .zip(&z)
                        .map(|(&a, &v)| (a, v)),
                    self.linear_bias[k],
                )
            })
            .collect()
    }
}

impl Layout {
    /// The rotation keys the layout needs, per level. With more than one
    /// activation, baby steps (rotated before a mask multiplies them) use
    /// keys one level up, whose moduli act as special primes: their
    /// key-switching noise would otherwise be multiplied by every mask.
    pub fn rotation_needs(&self) -> Vec<RotationNeed> {
        let mut plain: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut baby: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        if self.amax > 0 {
            plain.entry(0).or_default().push(self.pitch);
        }
        for (j, m) in self.maps.iter().enumerate() {
            let level = self.act_levels[j + 1];
            plain.entry(level).or_default().extend(m.giant_steps());
            baby.entry(level).or_default().extend(m.baby_steps(self.n));
        }
        if self.d1 > 1 {
            baby.entry(self.lin_level).or_default().push(1);
        }
        if self.d2 > 1 {
            plain.entry(self.lin_level).or_default().push(self.d1);
        }
        let special = self.act_levels.len() > 1;
        if !special {
            for (level, steps) in std::mem::take(&mut baby) {
                plain.entry(level).or_default().extend(steps);
            }
        }
        let mut out = Vec::new();
        for (level, mut steps) in baby {
            steps.sort_unstable();
            steps.dedup();
            if let Some(p) = plain.get_mut(&level) {
                p.retain(|s| !steps.contains(s));
            }
            if !steps.is_empty() {
                out.push(RotationNeed {
                    level,
                    steps,
                    key_level: Some(level.saturating_sub(1)),
                });
            }
        }
        for (level, mut steps) in plain {
            steps.sort_unstable();
            steps.dedup();
            if !steps.is_empty() {
                out.push(RotationNeed::at(level, steps));
            }
        }
        out.sort_by_key(|r| (r.level, r.key_level));
        out
    }

    /// Rotations per plaintext prime in one run.
    pub fn rotations(&self) -> usize {
        self.amax
            + self.maps.iter().map(MapPlan::rotations).sum::<usize>()
            + (self.d1 - 1)
            + (self.d2 - 1)
    }

    /// When the first hidden map uses both SIMD rows: the rotation `shift`
    /// with which row 1 repeats row 0 from the input on (`R1[s] = R0[s + shift]`;
    /// the packing, the convolution's masks and the activations keep it).
    pub fn row_shift(&self) -> Option<usize> {
        self.maps.first()?.rows.as_ref().map(|r| r.shift)
    }

    /// Copies row 0 of `v` (2n slot values) into row 1 rotated by the row
    /// shift, when there is one.
    fn fill_row1(&self, v: &mut [i128]) {
        if let Some(shift) = self.row_shift() {
            let n = self.n;
            for p in 0..n {
                v[n + (p + n - shift) % n] = v[p];
            }
        }
    }

    /// Ciphertext × plaintext products of the hidden maps (their diagonals).
    pub fn map_diagonals(&self) -> Vec<usize> {
        self.maps.iter().map(|m| m.diagonals).collect()
    }

    /// Levels at which ciphertext products run (relinearization keys needed).
    pub fn product_levels(&self) -> usize {
        self.act_levels.last().map_or(1, |l| l + 1)
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
    Ok(c0
        .coefficients()
        .row(0)
        .iter()
        .map(|&v| centre(v, t))
        .collect())
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
    Ok(Plaintext::try_encode(
        &slots_mod(values, par.plaintext())[..],
        FheEncoding::simd_at_level(level),
        par,
    )?)
}

fn add_into(acc: &mut Option<Ciphertext>, term: Ciphertext) {
    match acc {
        Some(a) => *a += &term,
        None => *acc = Some(term),
    }
}

/// A diagonal mask in NTT form with its Shoup representation (w·2^64/q),
/// so that products need no division.
struct ShoupMask {
    w: ndarray::Array2<u64>,
    w_shoup: ndarray::Array2<u64>,
}

impl ShoupMask {
    fn new(m: Multiplier, ctx: &Arc<fhe_math::rq::Context>) -> Result<ShoupMask> {
        let Multiplier::Poly(w) = m else {
            return Err(HeError::Backend(
                "a diagonal mask must be a polynomial".into(),
            ));
        };
        let mut w_shoup = w.clone();
        for (j, mut row) in w_shoup.outer_iter_mut().enumerate() {
            let q = &ctx.moduli_operators()[j];
            row.iter_mut().for_each(|v| *v = q.shoup(*v));
        }
        Ok(ShoupMask { w, w_shoup })
    }
}

/// Σ ct ⊙ mask over `terms`: lazy Shoup products (each in [0, 2q)) summed
/// in u64 and reduced every `batch` terms, which keeps the sum below 2^64
/// (255 terms for 55-bit moduli).
fn masked_sum<'a>(
    terms: impl Iterator<Item = (&'a Ciphertext, &'a ShoupMask)>,
    par: &Arc<BfvParameters>,
) -> Result<Ciphertext> {
    let mut acc: Option<(Vec<ndarray::Array2<u64>>, Arc<fhe_math::rq::Context>)> = None;
    let mut count = 0u64;
    let mut batch = 1u64;
    for (ct, m) in terms {
        let ctx = ct[0].ctx();
        let ops = ctx.moduli_operators();
        let shape = ct[0].coefficients().shape().to_vec();
        if m.w.shape() != shape.as_slice() {
            return Err(HeError::Value(
                "a multiplier was prepared for another ciphertext level".into(),
            ));
        }
        let (sums, _) = acc.get_or_insert_with(|| {
            let qmax = ctx.moduli().iter().copied().max().unwrap_or(1);
            batch = (u64::MAX / (2 * qmax)).max(1);
            (
                vec![ndarray::Array2::<u64>::zeros((shape[0], shape[1])); ct.len()],
                ctx.clone(),
            )
        });
        if sums.len() != ct.len() {
            return Err(HeError::Backend(
                "ciphertexts of different sizes in one sum".into(),
            ));
        }
        count += 1;
        let reduce = count % batch == 0;
        for (part, sum) in ct.iter().zip(sums.iter_mut()) {
            let c = part.coefficients();
            for (j, op) in ops.iter().enumerate() {
                let (cr, wr, sr) = (c.row(j), m.w.row(j), m.w_shoup.row(j));
                let mut s = sum.row_mut(j);
                let s = s
                    .as_slice_mut()
                    .ok_or_else(|| HeError::Backend("non-contiguous".into()))?;
                let (cr, wr, sr) = (
                    cr.as_slice()
                        .ok_or_else(|| HeError::Backend("non-contiguous".into()))?,
                    wr.as_slice()
                        .ok_or_else(|| HeError::Backend("non-contiguous".into()))?,
                    sr.as_slice()
                        .ok_or_else(|| HeError::Backend("non-contiguous".into()))?,
                );
                for i in 0..s.len() {
                    s[i] += op.lazy_mul_shoup(cr[i], wr[i], sr[i]);
                }
                if reduce {
                    let q = ctx.moduli()[j];
                    s.iter_mut().for_each(|v| *v %= q);
                }
            }
        }
    }
    let (mut sums, ctx) = acc.ok_or_else(|| HeError::Backend("an empty masked sum".into()))?;
    let moduli = ctx.moduli().to_vec();
    let parts = sums
        .iter_mut()
        .map(|sum| {
            for (j, mut row) in sum.outer_iter_mut().enumerate() {
                let q = moduli[j];
                row.iter_mut().for_each(|v| *v %= q);
            }
            Ok(Poly::try_convert_from(
                std::mem::take(sum),
                &ctx,
                true,
                Representation::Ntt,
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Ciphertext::new(parts, par)?)
}

/// The constants of one activation for one prime.
struct ActConsts {
    c2: Option<Multiplier>,
    c1: Option<Multiplier>,
    c0: Option<Plaintext>,
}

/// The masks of one hidden map for one prime: per giant (as in the plan),
/// per term, the baby step and its mask; the bias at the output slots.
struct MapMasks {
    giants: Vec<Vec<(i64, ShoupMask)>>,
    bias: Plaintext,
}

/// The masks and plaintexts of one prime.
struct PrimeMasks {
    /// Per Horner step a' (index a'), the (input ciphertext, mask) terms.
    conv: Vec<Vec<(usize, Multiplier)>>,
    conv_bias: Plaintext,
    acts: Vec<ActConsts>,
    maps: Vec<MapMasks>,
    /// Per giant step g2, per baby step g1: the pre-rotated diagonal (None when zero).
    diag: Vec<Vec<Option<Multiplier>>>,
}

type Cache<T> = Mutex<Vec<([u8; 16], Arc<T>)>>;

fn cached<T>(cache: &Cache<T>, fp: [u8; 16], make: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    let poisoned = || HeError::Backend("packed model cache poisoned".into());
    if let Some((_, v)) = cache
        .lock()
        .map_err(|_| poisoned())?
        .iter()
        .find(|(f, _)| *f == fp)
    {
        return Ok(v.clone());
    }
    let built = Arc::new(make()?);
    let mut c = cache.lock().map_err(|_| poisoned())?;
    c.retain(|(f, _)| *f != fp);
    c.push((fp, built.clone()));
    Ok(built)
}

/// A planned model ready to run in the packed layout.
pub struct PackedModel {
    spec: PackedSpec,
    /// Layouts per parameter set (fingerprint).
    layouts: Cache<Layout>,
    /// Masks per parameter object, built on first use. Keyed by the object,
    /// not its fingerprint: the masks are plaintexts of that object's fhe.rs
    /// parameters, which fhe.rs refuses to mix with equal parameters of
    /// another context (two clients with the same parameters).
    cache: Mutex<Vec<(Weak<HeParameters>, Arc<Vec<PrimeMasks>>)>>,
}

/// Mask sets kept per model: one per context in use (the server binds a
/// model to each client's context); the oldest go first.
const MASK_SETS_KEPT: usize = 4;

impl PackedModel {
    /// A validated model.
    pub fn new(spec: PackedSpec) -> Result<PackedModel> {
        spec.validate()?;
        Ok(PackedModel {
            spec,
            layouts: Mutex::new(Vec::new()),
            cache: Mutex::new(Vec::new()),
        })
    }

    /// Its integers.
    pub fn spec(&self) -> &PackedSpec {
        &self.spec
    }

    /// The layout under `params`.
    pub fn layout(&self, params: &HeParameters) -> Result<Arc<Layout>> {
        if !matches!(params.encoding(), Encoding::Batch { .. }) {
            return Err(HeError::Parameter(
                "the packed layout needs SIMD parameters (the batch encoding's primes)".into(),
            ));
        }
        cached(&self.layouts, params.fingerprint(), || {
            self.spec.layout(params.m(), params.moduli().len())
        })
    }

    fn masks(&self, params: &Arc<HeParameters>) -> Result<Arc<Vec<PrimeMasks>>> {
        let lay = self.layout(params)?;
        let poisoned = || HeError::Backend("packed model cache poisoned".into());
        // A Weak keeps the allocation (not the parameters) alive, so its
        // address cannot be reused by another context while it is held.
        let same = |w: &Weak<HeParameters>| std::ptr::eq(w.as_ptr(), Arc::as_ptr(params));
        if let Some((_, m)) = self
            .cache
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .find(|(w, _)| same(w))
        {
            return Ok(m.clone());
        }
        let built = Arc::new(
            params
                .bfv()
                .par_iter()
                .map(|par| self.build_masks(&lay, par))
                .collect::<Result<Vec<_>>>()?,
        );
        let mut c = self.cache.lock().map_err(|_| poisoned())?;
        c.retain(|(w, _)| w.strong_count() > 0 && !same(w));
        if c.len() >= MASK_SETS_KEPT {
            c.remove(0);
        }
        c.push((Arc::downgrade(params), built.clone()));
        Ok(built)
    }

    fn build_masks(&self, lay: &Layout, par: &Arc<BfvParameters>) -> Result<PrimeMasks> {
        let sp = &self.spec;
        let [c, _, _] = sp.in_shape;
        let [co, ci, kh, kw] = sp.conv_shape;
        let s = sp.stride;
        let slots = 2 * lay.n;
        let n = lay.n;
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
                        let wv: Vec<i128> = (0..co)
                            .map(|o| sp.conv_weight[((o * ci + ch) * kh + a) * kw + b] as i128)
                            .collect();
                        if wv.iter().all(|&v| v == 0) {
                            continue;
                        }
                        let mut v = vec![0i128; slots];
                        for o in 0..co {
                            for p in o * lay.block..(o + 1) * lay.block {
                                v[p] = wv[o];
                            }
                        }
                        lay.fill_row1(&mut v);
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
        lay.fill_row1(&mut bias);
        let conv_bias = plaintext_at(&bias, par, 0)?;
        // Activations: scalars at the level after the product, c0 on every slot.
        let mut acts = Vec::with_capacity(sp.activations.len());
        for (j, a) in sp.activations.iter().enumerate() {
            let out = self.level_after_act(lay, j);
            let ctx = par.context_at_level(out)?;
            let small = |c: i128| {
                i64::try_from(c).map_err(|_| {
                    HeError::Value(format!(
                        "packed model: activation {j}'s coefficient {c} exceeds 64 bits"
                    ))
                })
            };
            acts.push(ActConsts {
                c2: if a[2] != 1 {
                    Some(Multiplier::scalar(small(a[2])?, ctx))
                } else {
                    None
                },
                c1: if a[1] != 0 {
                    Some(Multiplier::scalar(small(a[1])?, ctx))
                } else {
                    None
                },
                c0: if a[0] != 0 {
                    Some(plaintext_at(&vec![a[0]; slots], par, out)?)
                } else {
                    None
                },
            });
        }
        // Hidden maps: D_k[pos_out[f']] = w for k = pos_in[f] − pos_out[f'];
        // the mask of (giant g, diagonal k) is D_k rotated by −g.
        let mut maps = Vec::with_capacity(sp.maps.len());
        let mut pos_in: Vec<usize> = (0..co)
            .flat_map(|o| {
                (0..lay.ho)
                    .flat_map(move |i| (0..lay.wo).map(move |j| o * lay.block + i * lay.pitch + j))
            })
            .collect();
        for (j, m) in sp.maps.iter().enumerate() {
            let plan = &lay.maps[j];
            let level = lay.act_levels[j + 1];
            // Per planned diagonal, (first slot of the row computing the term, output slot, weight).
            let term_row = plan.term_row(n);
            let mut by_k: BTreeMap<usize, Vec<(usize, usize, i64)>> = BTreeMap::new();
            for (fo, row) in m.rows.iter().enumerate() {
                let q = plan.pos_out[fo];
                for &(f, w) in row {
                    let (r, key) = term_row((pos_in[f] + n - q) % n);
                    by_k.entry(key).or_default().push((r * n, q, w));
                }
            }
            let mut giants = Vec::with_capacity(plan.giants.len());
            for (g, terms) in &plan.giants {
                let mut row = Vec::with_capacity(terms.len());
                for &(b, k) in terms {
                    let mut v = vec![0i128; slots];
                    for &(base, q, w) in by_k.get(&k).map(Vec::as_slice).unwrap_or(&[]) {
                        v[base + (q + g) % n] = w as i128;
                    }
                    row.push((
                        b,
                        ShoupMask::new(mask(&v, par, level)?, par.context_at_level(level)?)?,
                    ));
                }
                giants.push(row);
            }
            let mut bias = vec![0i128; slots];
            for (fo, &b) in m.bias.iter().enumerate() {
                bias[plan.pos_out[fo]] = b;
            }
            maps.push(MapMasks {
                giants,
                bias: plaintext_at(&bias, par, level)?,
            });
            pos_in = plan.pos_out.clone();
        }
        // Final linear map: column q of A sits at slot pos_last[q]; D_g[p] = A[p mod d, col at slot p+g].
        let f = lay.pos_last.len();
        let mut col_of_slot = vec![usize::MAX; n];
        for (q, &p) in lay.pos_last.iter().enumerate() {
            col_of_slot[p] = q;
        }
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
                row.push(if any {
                    Some(mask(&v, par, lay.lin_level)?)
                } else {
                    None
                });
            }
            diag.push(row);
        }
        Ok(PrimeMasks {
            conv,
            conv_bias,
            acts,
            maps,
            diag,
        })
    }

    /// The level activation j's output is at (the next map's, or the linear part's).
    fn level_after_act(&self, lay: &Layout, j: usize) -> usize {
        lay.act_levels.get(j + 1).copied().unwrap_or(lay.lin_level)
    }

    /// Packs one image (integers, [C, H, W] row-major) into the layout's
    /// input ciphertexts (key holder, or public-key encryption).
    pub fn encrypt(&self, ctx: &HeContext, x: &[i64]) -> Result<CipherTensor> {
        let params = ctx.params();
        let lay = self.layout(params)?;
        let sp = &self.spec;
        let [c, h, w] = sp.in_shape;
        if x.len() != c * h * w {
            return spec_err(format!(
                "the packed model takes one [{c}, {h}, {w}] image; got {} values",
                x.len()
            ));
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
                            v[o * lay.block + i * lay.pitch + j] = val;
                        }
                    }
                }
                lay.fill_row1(&mut v);
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
        let data = ArrayD::from_shape_vec(IxDyn(&[lay.inputs]), elems)
            .map_err(|e| HeError::Value(e.to_string()))?;
        Ok(CipherTensor::from_parts(
            data,
            Some(params.m()),
            1.0,
            Growth::Integer(0.0),
            params.clone(),
            key_id,
        ))
    }

    fn check_input(
        &self,
        ctx: &HeContext,
        x: &CipherTensor,
        count: usize,
        level: usize,
        stage: &str,
    ) -> Result<Arc<Layout>> {
        ctx.check(x)?;
        let lay = self.layout(ctx.params())?;
        if x.batch() != Some(ctx.params().m()) || x.data().shape() != [count] {
            return spec_err(format!("the packed {stage} takes {count} packed ciphertexts (encrypt with the plan's context); got shape {:?}", x.data().shape()));
        }
        if x.level()? != level {
            return spec_err(format!(
                "the packed {stage} takes ciphertexts at level {level}, got level {}",
                x.level()?
            ));
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

    fn wrap(&self, x: &CipherTensor, out: Element) -> Result<CipherTensor> {
        let data = ArrayD::from_shape_vec(IxDyn(&[1]), vec![out])
            .map_err(|e| HeError::Value(e.to_string()))?;
        Ok(x.with_data(data, 1.0, Growth::Integer(0.0)))
    }

    /// The first convolution: Horner over kernel rows (products, then rotations by Wo), plus bias.
    pub fn conv(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let lay = self.check_input(ctx, x, self.layout(ctx.params())?.inputs, 0, "convolution")?;
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
                        acc = Some(keys.rotations[k].rotate(&a, 0, lay.pitch)?);
                    }
                    for (idx, m) in &pm.conv[ap] {
                        add_into(&mut acc, m.apply(&inputs[*idx][k], par)?);
                    }
                }
                let acc = acc.ok_or_else(|| {
                    HeError::Value("the convolution has only zero weights".into())
                })?;
                Ok(&acc + &pm.conv_bias)
            })
            .collect::<Result<_>>()?;
        self.wrap(x, out)
    }

    /// Activation `j`: c2·z² + c1·z + c0, one relinearized product per
    /// prime, switched down to the next stage's level.
    pub fn activation(&self, ctx: &HeContext, x: &CipherTensor, j: usize) -> Result<CipherTensor> {
        let lay0 = self.layout(ctx.params())?;
        let level = *lay0
            .act_levels
            .get(j)
            .ok_or_else(|| HeError::Value(format!("the packed model has no activation {j}")))?;
        let lay = self.check_input(ctx, x, 1, level, "activation")?;
        let out_level = self.level_after_act(&lay, j);
        let masks = self.masks(ctx.params())?;
        let e = &x.data()[[0]];
        let out: Element = (0..e.len())
            .into_par_iter()
            .map(|k| {
                let par = &ctx.params().bfv()[k];
                let consts = &masks[k].acts[j];
                let mut sq = ctx.square_relinearized(k, &e[k], level)?;
                if par.level_of_context(sq[0].ctx())? < out_level {
                    sq.switch_to_level(out_level)?;
                }
                if let Some(c2) = &consts.c2 {
                    sq = c2.apply(&sq, par)?;
                }
                if let Some(c1) = &consts.c1 {
                    let mut lin = e[k].clone();
                    lin.switch_to_level(out_level)?;
                    sq += &c1.apply(&lin, par)?;
                }
                if let Some(c0) = &consts.c0 {
                    sq = &sq + c0;
                }
                Ok(sq)
            })
            .collect::<Result<_>>()?;
        self.wrap(x, out)
    }

    /// Hidden map `j`: diagonals over the current slots with baby steps
    /// (rotations of the input by ±1) and giant steps by Horner's rule.
    pub fn map(&self, ctx: &HeContext, x: &CipherTensor, j: usize) -> Result<CipherTensor> {
        let lay0 = self.layout(ctx.params())?;
        if j >= lay0.maps.len() {
            return spec_err(format!("the packed model has no map {j}"));
        }
        let level = lay0.act_levels[j + 1];
        let lay = self.check_input(ctx, x, 1, level, "linear map")?;
        self.require_steps(ctx, &lay)?;
        let masks = self.masks(ctx.params())?;
        let keys = ctx.keys()?;
        let plan = &lay.maps[j];
        let n = lay.n;
        let e = &x.data()[[0]];
        let out: Element = (0..e.len())
            .into_par_iter()
            .map(|k| {
                let par = &ctx.params().bfv()[k];
                let rot = &keys.rotations[k];
                let mm = &masks[k].maps[j];
                let (lo, hi) = plan.babies;
                // Babies b in [lo, hi]: two chains in parallel, odd b (by 1 from the
                // input, then by 2) and even b (by 2), the latter then b < 0 (by −1).
                let x0 = &e[k];
                let chain = |first: i64| -> Result<Vec<(i64, Ciphertext)>> {
                    let mut out: Vec<(i64, Ciphertext)> = Vec::new();
                    for b in (first..=hi).step_by(2) {
                        let next = match out.last() {
                            None => rot.rotate(x0, level, first as usize)?,
                            Some((_, prev)) => rot.rotate(prev, level, 2)?,
                        };
                        out.push((b, next));
                    }
                    Ok(out)
                };
                let (odd, even) = rayon::join(
                    || chain(1),
                    || -> Result<Vec<(i64, Ciphertext)>> {
                        let mut out = chain(2)?;
                        let mut prev = x0.clone();
                        for b in (lo..0).rev() {
                            prev = rot.rotate(&prev, level, n - 1)?;
                            out.push((b, prev.clone()));
                        }
                        Ok(out)
                    },
                );
                let mut babies: Vec<Option<Ciphertext>> = vec![None; (hi - lo + 1) as usize];
                babies[(-lo) as usize] = Some(x0.clone());
                for (b, c) in odd?.into_iter().chain(even?) {
                    babies[(b - lo) as usize] = Some(c);
                }
                let babies: Vec<Ciphertext> = babies
                    .into_iter()
                    .map(|b| b.ok_or_else(|| HeError::Backend("baby step".into())))
                    .collect::<Result<_>>()?;
                // Each giant's sum of masked babies (in parallel, lazily reduced), then Horner.
                let inners: Vec<Ciphertext> = mm
                    .giants
                    .par_iter()
                    .map(|terms| {
                        masked_sum(
                            terms.iter().map(|(b, m)| (&babies[(b - lo) as usize], m)),
                            par,
                        )
                    })
                    .collect::<Result<_>>()?;
                // Horner's rule over the giants; cut in two halves run in parallel when planned.
                let horner =
                    |inners: Vec<Ciphertext>, gaps: &[Vec<usize>]| -> Result<Option<Ciphertext>> {
                        let mut acc: Option<Ciphertext> = None;
                        for (gi, inner) in inners.into_iter().enumerate() {
                            if let Some(mut a) = acc.take() {
                                for &s in &gaps[gi - 1] {
                                    a = rot.rotate(&a, level, s)?;
                                }
                                acc = Some(a);
                            }
                            add_into(&mut acc, inner);
                        }
                        Ok(acc)
                    };
                let acc = match plan.split {
                    Some((cut, d)) if cut < inners.len() => {
                        let mut inners = inners;
                        let second = inners.split_off(cut);
                        let (a, b) = rayon::join(
                            || horner(inners, &plan.horner[..cut - 1]),
                            || horner(second, &plan.horner[cut..]),
                        );
                        let (a, mut b) = (a?, b?);
                        if let Some(a) = a {
                            add_into(&mut b, rot.rotate(&a, level, d)?);
                        }
                        b
                    }
                    _ => horner(inners, &plan.horner)?,
                };
                let mut acc = match acc {
                    Some(a) => a,
                    None => &e[k] - &e[k],
                };
                if !mm.giants.is_empty() {
                    for &s in plan.horner.last().map(Vec::as_slice).unwrap_or(&[]) {
                        acc = rot.rotate(&acc, level, s)?;
                    }
                }
                // Outputs computed in row 1 join row 0: one row swap.
                if let Some(r) = &plan.rows {
                    acc = &acc + &rot.rotate(&acc, level, r.swap)?;
                }
                Ok(&acc + &mm.bias)
            })
            .collect::<Result<_>>()?;
        self.wrap(x, out)
    }

    /// The fused linear map: diagonals with baby/giant steps, the sum over
    /// each class's slots, the bias; switched to the last modulus.
    pub fn linear(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let lay = self.check_input(
            ctx,
            x,
            1,
            self.layout(ctx.params())?.lin_level,
            "linear map",
        )?;
        self.require_steps(ctx, &lay)?;
        let masks = self.masks(ctx.params())?;
        let keys = ctx.keys()?;
        let e = &x.data()[[0]];
        let lvl = lay.lin_level;
        let last = Self::result_level(ctx.params(), lvl);
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
                            add_into(&mut acc, m.apply(&baby[g1], par)?);
                        }
                    }
                }
                let acc = match acc {
                    Some(a) => a,
                    None => &e[k] - &e[k],
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
        self.wrap(x, out)
    }

    /// The level results are switched to: the last, unless its modulus is
    /// too close to the plaintext primes to hold a result's noise (then the
    /// one before it).
    fn result_level(params: &HeParameters, lin_level: usize) -> usize {
        let bits = |v: u64| 64 - v.leading_zeros();
        let last = params.moduli().len() - 1;
        let t_bits = params.p().iter().copied().map(bits).max().unwrap_or(0);
        let q_bits = params.moduli().last().copied().map(bits).unwrap_or(0);
        if q_bits >= t_bits + 20 {
            last
        } else {
            last.saturating_sub(1).max(lin_level)
        }
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
            let b = self
                .spec
                .linear_bias
                .get(k)
                .map_or(0, |&b| reduce_i128(b, t));
            v[k] = (b + t - sums[k]) % t;
        }
        Ok(Plaintext::try_encode(
            &v[..],
            FheEncoding::simd_at_level(lay.lin_level),
            par,
        )?)
    }

    /// The stages in order.
    pub fn stages(&self) -> Vec<Stage> {
        let mut out = vec![Stage::Conv, Stage::Act(0)];
        for j in 0..self.spec.maps.len() {
            out.push(Stage::Map(j));
            out.push(Stage::Act(j + 1));
        }
        out.push(Stage::Linear);
        out
    }

    /// Runs one stage.
    pub fn forward(&self, ctx: &HeContext, x: &CipherTensor, stage: Stage) -> Result<CipherTensor> {
        match stage {
            Stage::Conv => self.conv(ctx, x),
            Stage::Act(j) => self.activation(ctx, x, j),
            Stage::Map(j) => self.map(ctx, x, j),
            Stage::Linear => self.linear(ctx, x),
        }
    }

    /// All stages.
    pub fn run(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        let mut y = x.clone();
        for s in self.stages() {
            y = self.forward(ctx, &y, s)?;
        }
        Ok(y)
    }

    /// The exact output integers of a packed result (key holder): class k
    /// from slot k, combined over the primes by CRT, centred.
    pub fn decrypt_integers(&self, ctx: &HeContext, t: &CipherTensor) -> Result<Vec<i128>> {
        let sk = ctx.secret()?;
        ctx.check(t)?;
        let classes = self.spec.classes();
        if t.batch() != Some(ctx.params().m()) || t.data().shape() != [1] {
            return spec_err(format!(
                "not a packed result (one packed ciphertext): shape {:?}",
                t.data().shape()
            ));
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
            .map(|(r, &t)| {
                (0..classes)
                    .map(|k| {
                        r[..lay.n]
                            .iter()
                            .skip(k)
                            .step_by(lay.d)
                            .fold(0u64, |a, &x| (a + x) % t)
                    })
                    .collect()
            })
            .collect();
        Ok((0..classes)
            .map(|k| crt_centred(&sums.iter().map(|r| r[k]).collect::<Vec<_>>(), p))
            .collect())
    }
}

/// One stage of a packed model, as the runner runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Input packing → first convolution + bias.
    Conv,
    /// Activation j (relinearized, switched to the next stage's level).
    Act(usize),
    /// Hidden linear map j (between activations j and j + 1).
    Map(usize),
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

    /// Whether the stage multiplies ciphertexts.
    pub fn multiplies_ciphertexts(&self) -> bool {
        matches!(self.stage, Stage::Act(_))
    }

    /// The runner's name of the stage.
    pub fn name(&self) -> &'static str {
        match self.stage {
            Stage::Conv => "PackedConv2d",
            Stage::Act(j) if self.model.spec.activations.get(j) == Some(&SQUARE) => "PackedSquare",
            Stage::Act(_) => "PackedPolynomial",
            Stage::Map(_) => "PackedMap",
            Stage::Linear => "PackedLinear",
        }
    }

    /// Runs the stage.
    pub fn forward(&self, ctx: &HeContext, x: &CipherTensor) -> Result<CipherTensor> {
        self.model.forward(ctx, x, self.stage)
    }

    /// Logical output shape of one image ([classes] after the linear map).
    pub fn output_shape(&self) -> Vec<usize> {
        match self.stage {
            Stage::Conv => self.model.spec.shape_after(0).to_vec(),
            Stage::Act(j) => self.model.spec.shape_after(j).to_vec(),
            Stage::Map(j) => self.model.spec.shape_after(j + 1).to_vec(),
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

    pub(super) fn spec(
        in_shape: [usize; 3],
        co: usize,
        k: usize,
        stride: usize,
        padding: usize,
        classes: usize,
        wb: i64,
    ) -> PackedSpec {
        let [c, _, _] = in_shape;
        let mut sp = PackedSpec {
            in_shape,
            conv_shape: [co, c, k, k],
            conv_weight: rnd(co * c * k * k, -wb, wb),
            conv_bias: rnd(co, -200, 200),
            stride,
            padding,
            activations: vec![SQUARE],
            maps: vec![],
            linear_weight: vec![],
            linear_bias: rnd(classes, -1000, 1000)
                .into_iter()
                .map(i128::from)
                .collect(),
            input_bits: 0,
            output_bits: 0,
        };
        let (ho, wo) = sp.conv_out();
        sp.linear_weight = rnd(classes * co * ho * wo, -wb, wb);
        sp
    }

    /// A hidden map: conv (co, k×k, stride, padding) on `in_shape`, then an
    /// optional 2×2 sum-pool (stride 2), with random weights in [−wb, wb].
    pub(super) fn conv_map(
        in_shape: [usize; 3],
        co: usize,
        k: usize,
        stride: usize,
        pad: usize,
        pool: bool,
        wb: i64,
    ) -> HiddenMap {
        let [c, h, w] = in_shape;
        let wts = rnd(co * c * k * k, -wb, wb);
        let (ho, wo) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let conv_row = |o: usize, i: usize, j: usize| -> Vec<(usize, i64)> {
            let mut r = Vec::new();
            for ch in 0..c {
                for a in 0..k {
                    for b in 0..k {
                        let (y, x) = (
                            (stride * i + a) as isize - pad as isize,
                            (stride * j + b) as isize - pad as isize,
                        );
                        if y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w {
                            r.push((
                                (ch * h + y as usize) * w + x as usize,
                                wts[((o * c + ch) * k + a) * k + b],
                            ));
                        }
                    }
                }
            }
            r
        };
        let (oh, ow) = if pool { (ho / 2, wo / 2) } else { (ho, wo) };
        let mut rows = Vec::new();
        for o in 0..co {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc: BTreeMap<usize, i64> = BTreeMap::new();
                    let cells: Vec<(usize, usize)> = if pool {
                        vec![
                            (2 * i, 2 * j),
                            (2 * i, 2 * j + 1),
                            (2 * i + 1, 2 * j),
                            (2 * i + 1, 2 * j + 1),
                        ]
                    } else {
                        vec![(i, j)]
                    };
                    for (y, x) in cells {
                        for (f, v) in conv_row(o, y, x) {
                            *acc.entry(f).or_default() += v;
                        }
                    }
                    rows.push(acc.into_iter().filter(|&(_, v)| v != 0).collect());
                }
            }
        }
        HiddenMap {
            out_shape: [co, oh, ow],
            bias: rnd(co * oh * ow, -wb, wb)
                .into_iter()
                .map(i128::from)
                .collect(),
            rows,
        }
    }

    /// A model conv → act → (map → act)* → linear with the given maps.
    pub(super) fn deep(
        sp: PackedSpec,
        maps: Vec<HiddenMap>,
        acts: Vec<[i128; 3]>,
        classes: usize,
        wb: i64,
    ) -> PackedSpec {
        let mut sp = PackedSpec {
            maps,
            activations: acts,
            ..sp
        };
        let f: usize = sp.shape_after(sp.maps.len()).iter().product();
        sp.linear_weight = rnd(classes * f, -wb, wb);
        sp.linear_bias = rnd(classes, -1000, 1000)
            .into_iter()
            .map(i128::from)
            .collect();
        sp
    }

    pub(super) fn context(
        m: usize,
        sizes: Vec<usize>,
        primes: usize,
        sp: &PackedSpec,
    ) -> HeContext {
        context_bits(m, sizes, primes, 31, sp)
    }

    pub(super) fn context_bits(
        m: usize,
        sizes: Vec<usize>,
        primes: usize,
        bits: u32,
        sp: &PackedSpec,
    ) -> HeContext {
        let p = crate::he::params::batch_primes_below(m, 1 << bits, primes);
        let req = ParametersRequest {
            m,
            p,
            n_plaintext_moduli: primes,
            sec: 128,
            encoding: BATCH,
            moduli_sizes: Some(sizes),
        };
        let params = req.build().unwrap();
        let lay = sp.layout(params.m(), params.moduli().len()).unwrap();
        let mut ctx = HeContext::new(params);
        ctx.keygen_for_levels(lay.product_levels()).unwrap();
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
            let mut out = model.encrypt(ctx, &x).unwrap();
            let mut budgets = vec![ctx.noise_budget(&out).unwrap()];
            for s in model.stages() {
                out = model.forward(ctx, &out, s).unwrap();
                budgets.push(ctx.noise_budget(&out).unwrap());
            }
            eprintln!("noise budgets per stage: {budgets:?}");
            assert!(ctx.noise_budget(&out).unwrap() > 0);
            assert_eq!(
                model.decrypt_integers(ctx, &out).unwrap(),
                sp.reference(&x).unwrap()
            );
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

    /// Timing (run by hand): `cargo test --release --lib masked_sum_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn masked_sum_cost() {
        use fhe::bfv::{BfvParametersBuilder, Encoding, SecretKey};
        use fhe_traits::FheEncrypter;
        let par = BfvParametersBuilder::new()
            .set_degree(8192)
            .set_plaintext_modulus(crate::he::params::batch_primes_below(8192, 1 << 20, 1)[0])
            .set_moduli_sizes(&[55, 55, 54, 54])
            .build_arc()
            .unwrap();
        let sk = SecretKey::random(&par, &mut rand::rng());
        let v: Vec<u64> = (0..8192).collect();
        let pt = Plaintext::try_encode(&v, Encoding::simd(), &par).unwrap();
        let mut ct: Ciphertext = sk.try_encrypt(&pt, &mut rand::rng()).unwrap();
        ct.switch_to_level(1).unwrap();
        let ctx = ct[0].ctx().clone();
        let m = mask(
            &(0..4096).map(|i| (i % 7) as i128 - 3).collect::<Vec<_>>(),
            &par,
            1,
        )
        .unwrap();
        let m = ShoupMask::new(m, &ctx).unwrap();
        let best = (0..7)
            .map(|_| {
                let t = std::time::Instant::now();
                masked_sum((0..100).map(|_| (&ct, &m)), &par).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min);
        eprintln!("masked sum of 100 terms at level 1 (3 moduli), best of 7: {best:.1} ms");
    }

    #[test]
    fn deeper_models_are_exact() {
        // conv(3→2, k3, s2, p1) → square → conv(2→3, k3, s1, p1) + pool → polynomial → linear; 3 primes.
        let sp = spec([3, 12, 12], 2, 3, 2, 1, 3, 3);
        let map = conv_map([2, 6, 6], 3, 3, 1, 1, true, 3);
        let sp = deep(sp, vec![map], vec![SQUARE, [5, -3, 2]], 4, 3);
        // Its map reads two channel blocks: row 1, shifted by one block, reads the second.
        let lay = sp.layout(8192, 4).unwrap();
        assert!(lay.row_shift().is_some(), "the first map uses both rows");
        assert!(lay.rotation_needs().iter().any(|r| r.steps.contains(&4096)));
        let ctx = context_bits(8192, vec![55, 55, 54, 54], 3, 19, &sp);
        check(sp, &ctx, 3);
        // Two hidden convolutions (stride 2 with padding, then stride 1): three squares: m=16384
        let sp = spec([1, 16, 16], 2, 3, 1, 0, 3, 1);
        let m1 = conv_map([2, 14, 14], 3, 3, 2, 1, false, 1);
        let m2 = conv_map([3, 7, 7], 2, 3, 1, 0, false, 1);
        let mut sp = deep(sp, vec![m1, m2], vec![SQUARE; 3], 2, 1);
        sp.conv_bias = rnd(2, -2, 2);
        let ctx = context_bits(16384, vec![55, 55, 55, 55, 54, 54, 54, 54], 2, 31, &sp);
        check(sp, &ctx, 1);
    }

    #[test]
    fn one_model_serves_contexts_with_equal_parameters() {
        // Two clients with the same parameters: the masks of the first
        // context's fhe.rs parameters must not be used with the second's.
        let sp = spec([1, 8, 8], 2, 3, 1, 0, 4, 3);
        let model = PackedModel::new(sp.clone()).unwrap();
        for _ in 0..MASK_SETS_KEPT + 2 {
            let ctx = context(8192, vec![55, 55, 54, 54], 1, &sp);
            let x = rnd(64, -3, 3);
            let mut out = model.encrypt(&ctx, &x).unwrap();
            for s in model.stages() {
                out = model.forward(&ctx, &out, s).unwrap();
            }
            assert_eq!(
                model.decrypt_integers(&ctx, &out).unwrap(),
                sp.reference(&x).unwrap()
            );
        }
        assert!(model.cache.lock().unwrap().len() <= MASK_SETS_KEPT);
    }

    #[test]
    fn missing_rotation_key_is_named() {
        let sp = spec([1, 8, 8], 2, 3, 1, 0, 4, 3);
        let req = ParametersRequest {
            m: 8192,
            p: vec![],
            n_plaintext_moduli: 1,
            sec: 128,
            encoding: BATCH,
            moduli_sizes: Some(vec![55, 55, 54, 54]),
        };
        let mut ctx = HeContext::new(req.build().unwrap());
        ctx.keygen().unwrap();
        let model = PackedModel::new(sp.clone()).unwrap();
        let e = model.encrypt(&ctx, &rnd(64, -3, 3)).unwrap();
        let err = model.conv(&ctx, &e).err().unwrap().to_string();
        assert!(err.contains("step 6"), "{err}");
    }
}
