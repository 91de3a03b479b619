//! Rotation (Galois) keys: which column-rotation steps a context can apply,
//! per ciphertext level. fhe.rs's key switching has no special prime, so a
//! rotation adds a fixed amount of noise (≈ 2^65 at n=8192); keys are made
//! for the level the ciphertexts are at when they are rotated, and a model
//! asks for the (level, steps) it needs. A missing step is an error that
//! names it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use fhe::bfv::{BfvParameters, Ciphertext, EvaluationKey, EvaluationKeyBuilder, SecretKey};
use fhe::proto::bfv::EvaluationKey as EvaluationKeyProto;
use fhe_math::rq::traits::TryConvertFrom;
use fhe_math::rq::{Context as RqContext, Poly, Representation, SubstitutionExponent};
use ndarray::Array2;
use fhe_traits::{DeserializeWithContext, Serialize as FheSerialize};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::error::{HeError, Result};

/// The rotation steps wanted at one ciphertext level.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RotationNeed {
    /// The ciphertext level the rotated ciphertexts are at.
    pub level: usize,
    /// Column-rotation steps (slot s+k moves to slot s), each in 1..m/2.
    pub steps: Vec<usize>,
    /// The level the key is made at, when below `level`: the moduli between
    /// act as special primes, so a rotation adds ≈ 2^11 of noise instead of
    /// ≈ 2^65 (and costs about twice as much). `None`: the ciphertext's level.
    /// Known when generating; a loaded key reports `None` (fhe.rs keeps it inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_level: Option<usize>,
}

impl RotationNeed {
    /// Steps at `level` with keys at that level.
    pub fn at(level: usize, steps: Vec<usize>) -> RotationNeed {
        RotationNeed {
            level,
            steps,
            key_level: None,
        }
    }
}

/// Power-of-two steps at the top level: the default when no plan says more.
pub fn power_of_two_needs(m: usize) -> Vec<RotationNeed> {
    let steps = std::iter::successors(Some(1usize), |s| Some(s * 2))
        .take_while(|&s| s < m / 2)
        .collect();
    vec![RotationNeed::at(0, steps)]
}

/// One evaluation key: the steps it holds at one level.
pub(crate) struct LevelKey {
    pub(crate) level: usize,
    pub(crate) steps: Vec<usize>,
    pub(crate) key: EvaluationKey,
    /// The key's polynomials for hoisted rotations, read out on first use.
    hoisted: OnceLock<std::result::Result<Arc<HoistedKeys>, String>>,
}

impl LevelKey {
    fn new(level: usize, steps: Vec<usize>, key: EvaluationKey) -> LevelKey {
        LevelKey {
            level,
            steps,
            key,
            hoisted: OnceLock::new(),
        }
    }

    fn hoisted(&self, par: &Arc<BfvParameters>) -> Result<Arc<HoistedKeys>> {
        self.hoisted
            .get_or_init(|| HoistedKeys::read(&self.key, par, &self.steps).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(HeError::Backend)
    }
}

/// One Galois key's key-switching polynomials at the key level (NTT form,
/// per digit: values and Shoup companions) and the slot permutation its
/// substitution applies in NTT form.
struct HoistKey {
    at_ct: SubstitutionExponent,
    perm: Vec<usize>,
    c0: Vec<(Array2<u64>, Array2<u64>)>,
    c1: Vec<(Array2<u64>, Array2<u64>)>,
}

/// The keys of one `LevelKey` in the form our key switching uses. fhe.rs
/// keeps a key's polynomials private; its serialized form (the public
/// `fhe::proto` messages) holds them, with c1 as the seed fhe.rs expands
/// exactly as here (`KeySwitchingKey::generate_c1`, rand_chacha 0.9).
struct HoistedKeys {
    ctx_ct: Arc<RqContext>,
    ctx_key: Arc<RqContext>,
    by_step: HashMap<usize, HoistKey>,
}

fn with_shoup(p: &Poly, ctx: &RqContext) -> (Array2<u64>, Array2<u64>) {
    let w = p.coefficients().to_owned();
    let mut ws = w.clone();
    for (j, mut row) in ws.outer_iter_mut().enumerate() {
        let q = &ctx.moduli_operators()[j];
        row.iter_mut().for_each(|v| *v = q.shoup(*v));
    }
    (w, ws)
}

impl HoistedKeys {
    fn read(key: &EvaluationKey, par: &Arc<BfvParameters>, steps: &[usize]) -> Result<HoistedKeys> {
        let proto = EvaluationKeyProto::from(key);
        let ctx_ct = par.context_at_level(proto.ciphertext_level as usize)?.clone();
        let ctx_key = par.context_at_level(proto.evaluation_key_level as usize)?.clone();
        let degree = par.degree();
        let two_n = 2 * degree as u64;
        let exponent_of = |s: usize| -> u64 { (0..s).fold(1u64, |e, _| e * 3 % two_n) };
        // The NTT slots' order: substitute a polynomial holding its slot indices.
        let index = Poly::try_convert_from(
            Array2::from_shape_fn((ctx_key.moduli().len(), degree), |(_, x)| x as u64),
            &ctx_key,
            true,
            Representation::Ntt,
        )?;
        let mut by_step = HashMap::new();
        for &step in steps {
            let e = exponent_of(step);
            let gk = proto
                .gk
                .iter()
                .find(|g| g.exponent as u64 == e)
                .ok_or_else(|| HeError::Backend(format!("no Galois key for step {step}")))?;
            let ksk = gk
                .ksk
                .as_ref()
                .ok_or_else(|| HeError::Backend("a Galois key without its key-switching key".into()))?;
            if ksk.log_base != 0 {
                return Err(HeError::Backend(
                    "our key switching needs RNS-decomposed keys (more than one modulus)".into(),
                ));
            }
            let read = |b: &Vec<u8>| -> Result<Poly> {
                let mut p = Poly::from_bytes(b, &ctx_key)?;
                p.change_representation(Representation::Ntt);
                Ok(p)
            };
            let c0 = ksk.c0.iter().map(read).collect::<Result<Vec<_>>>()?;
            let c1 = if ksk.seed.is_empty() {
                ksk.c1.iter().map(read).collect::<Result<Vec<_>>>()?
            } else {
                let seed: [u8; 32] = ksk
                    .seed
                    .as_slice()
                    .try_into()
                    .map_err(|_| HeError::Backend("a key-switching key seed of the wrong size".into()))?;
                let mut rng = ChaCha8Rng::from_seed(seed);
                (0..c0.len())
                    .map(|_| {
                        let mut seed_i = [0u8; 32];
                        rng.fill(&mut seed_i);
                        let mut a = Poly::random_from_seed(&ctx_key, Representation::NttShoup, seed_i);
                        a.change_representation(Representation::Ntt);
                        a
                    })
                    .collect()
            };
            if c0.len() != ctx_ct.moduli().len() || c1.len() != c0.len() {
                return Err(HeError::Backend("a key-switching key of the wrong size".into()));
            }
            let at_key = SubstitutionExponent::new(&ctx_key, e as usize)?;
            let perm = index.substitute(&at_key)?.coefficients().row(0).iter().map(|&v| v as usize).collect();
            by_step.insert(
                step,
                HoistKey {
                    at_ct: SubstitutionExponent::new(&ctx_ct, e as usize)?,
                    perm,
                    c0: c0.iter().map(|p| with_shoup(p, &ctx_key)).collect(),
                    c1: c1.iter().map(|p| with_shoup(p, &ctx_key)).collect(),
                },
            );
        }
        Ok(HoistedKeys {
            ctx_ct,
            ctx_key,
            by_step,
        })
    }

    /// The RNS digits of `ct[1]` lifted to the key level, in NTT form (lazy: below 4q).
    fn digits(&self, ct: &Ciphertext) -> Result<Vec<Poly>> {
        let mut c1 = ct[1].clone();
        c1.change_representation(Representation::PowerBasis);
        c1.coefficients()
            .outer_iter()
            .map(|row| {
                let row = row
                    .as_slice()
                    .ok_or_else(|| HeError::Backend("non-contiguous polynomial".into()))?;
                // SAFETY: a ciphertext's digits are public; they are only multiplied lazily below.
                Ok(unsafe {
                    Poly::create_constant_ntt_polynomial_with_lazy_coefficients_and_variable_time(
                        row,
                        &self.ctx_key,
                    )
                })
            })
            .collect()
    }

    /// Key switching of the rotated digits (rotation = a permutation of NTT
    /// slots, fused into the lazy Shoup products), switched down to the
    /// ciphertext level, plus the rotated `ct[0]`.
    fn rotate(&self, ct: &Ciphertext, digits: &[Poly], k: &HoistKey, par: &Arc<BfvParameters>) -> Result<Ciphertext> {
        let ops = self.ctx_key.moduli_operators();
        let moduli = self.ctx_key.moduli();
        let n = k.perm.len();
        let mut a0 = Array2::<u64>::zeros((moduli.len(), n));
        let mut a1 = Array2::<u64>::zeros((moduli.len(), n));
        let perm = &k.perm;
        for (d, (k0, k0s), (k1, k1s)) in digits.iter().zip(&k.c0).zip(&k.c1).map(|((d, a), b)| (d, a, b)) {
            let dc = d.coefficients();
            for (j, op) in ops.iter().enumerate() {
                let contiguous = || HeError::Backend("non-contiguous polynomial".into());
                let dr = dc.row(j);
                let dr = dr.as_slice().ok_or_else(contiguous)?;
                let (k0r, k0sr, k1r, k1sr) = (k0.row(j), k0s.row(j), k1.row(j), k1s.row(j));
                let (k0r, k0sr) = (k0r.as_slice().ok_or_else(contiguous)?, k0sr.as_slice().ok_or_else(contiguous)?);
                let (k1r, k1sr) = (k1r.as_slice().ok_or_else(contiguous)?, k1sr.as_slice().ok_or_else(contiguous)?);
                let mut r0 = a0.row_mut(j);
                let mut r1 = a1.row_mut(j);
                let r0 = r0.as_slice_mut().ok_or_else(contiguous)?;
                let r1 = r1.as_slice_mut().ok_or_else(contiguous)?;
                for x in 0..n {
                    let v = dr[perm[x]];
                    r0[x] += op.lazy_mul_shoup(v, k0r[x], k0sr[x]);
                    r1[x] += op.lazy_mul_shoup(v, k1r[x], k1sr[x]);
                }
            }
        }
        let mut parts = Vec::with_capacity(2);
        for mut a in [a0, a1] {
            for (j, mut row) in a.outer_iter_mut().enumerate() {
                let q = moduli[j];
                row.iter_mut().for_each(|v| *v %= q);
            }
            let mut p = Poly::try_convert_from(a, &self.ctx_key, true, Representation::Ntt)?;
            if !Arc::ptr_eq(&self.ctx_key, &self.ctx_ct) {
                p.change_representation(Representation::PowerBasis);
                p.switch_down_to(&self.ctx_ct)?;
                p.change_representation(Representation::Ntt);
            }
            parts.push(p);
        }
        parts[0] += &ct[0].substitute(&k.at_ct)?;
        Ok(Ciphertext::new(parts, par)?)
    }
}

/// The rotation keys of one plaintext modulus.
#[derive(Default)]
pub struct RotationKeys {
    pub(crate) levels: Vec<LevelKey>,
}

fn check_need(par: &BfvParameters, need: &RotationNeed) -> Result<()> {
    let half = par.degree() / 2;
    if need.level + 1 >= par.moduli().len() && par.moduli().len() > 1 {
        return Err(HeError::Parameter(format!(
            "rotation keys at level {} are not possible with {} ciphertext moduli: rotate before the last level",
            need.level,
            par.moduli().len()
        )));
    }
    if need.key_level.is_some_and(|k| k > need.level) {
        return Err(HeError::Parameter(format!(
            "a rotation key for level {} cannot be made at the lower level {:?}",
            need.level, need.key_level
        )));
    }
    if let Some(bad) = need.steps.iter().find(|&&s| s == 0 || s >= half) {
        return Err(HeError::Parameter(format!(
            "rotation step {bad} is outside 1..{half} (m/2)"
        )));
    }
    Ok(())
}

impl RotationKeys {
    /// Generates keys for `needs` (key switching at the ciphertext's own level).
    pub fn generate(
        sk: &SecretKey,
        par: &Arc<BfvParameters>,
        needs: &[RotationNeed],
    ) -> Result<RotationKeys> {
        let mut rng = rand::rng();
        let mut levels = Vec::new();
        for need in needs {
            check_need(par, need)?;
            let mut steps = need.steps.clone();
            steps.sort_unstable();
            steps.dedup();
            if steps.is_empty() {
                continue;
            }
            let mut b = EvaluationKeyBuilder::new_leveled(
                sk,
                need.level,
                need.key_level.unwrap_or(need.level),
            )?;
            for &s in &steps {
                b.enable_column_rotation(s)?;
            }
            levels.push(LevelKey::new(need.level, steps, b.build(&mut rng)?));
        }
        Ok(RotationKeys { levels })
    }

    /// Assembles loaded keys, checking that each holds the steps it claims.
    pub(crate) fn from_parts(
        parts: Vec<(usize, Vec<usize>, EvaluationKey)>,
        par: &BfvParameters,
    ) -> Result<RotationKeys> {
        let mut levels = Vec::with_capacity(parts.len());
        for (level, steps, key) in parts {
            check_need(par, &RotationNeed::at(level, steps.clone()))
                .map_err(|e| HeError::Format(e.to_string()))?;
            if let Some(s) = steps.iter().find(|&&s| !key.supports_column_rotation_by(s)) {
                return Err(HeError::Format(format!(
                    "the rotation key of level {level} does not hold step {s} it claims"
                )));
            }
            // Two keys may serve one level (special-prime baby steps and plain giant steps), for different steps.
            if levels
                .iter()
                .any(|l: &LevelKey| l.level == level && l.steps.iter().any(|s| steps.contains(s)))
            {
                return Err(HeError::Format(format!(
                    "two rotation keys for the same step at level {level}"
                )));
            }
            levels.push(LevelKey::new(level, steps, key));
        }
        Ok(RotationKeys { levels })
    }

    /// The (level, steps) held.
    pub fn held(&self) -> Vec<RotationNeed> {
        self.levels
            .iter()
            .map(|l| RotationNeed::at(l.level, l.steps.clone()))
            .collect()
    }

    /// Serialized size of the keys, in bytes.
    pub fn byte_size(&self) -> usize {
        self.levels.iter().map(|l| l.key.to_bytes().len()).sum()
    }

    /// Whether `step` can be applied to ciphertexts at `level`.
    pub fn supports(&self, level: usize, step: usize) -> bool {
        self.levels
            .iter()
            .any(|l| l.level == level && l.steps.contains(&step))
    }

    /// Rotates `ct` (at `level`) by `step` columns, or says which key is
    /// missing. Our key switching (`HoistedKeys::rotate`): the same
    /// arithmetic as fhe.rs's, without its copies and allocations.
    pub fn rotate(&self, ct: &Ciphertext, level: usize, step: usize, par: &Arc<BfvParameters>) -> Result<Ciphertext> {
        let l = self
            .levels
            .iter()
            .find(|l| l.level == level && l.steps.contains(&step))
            .ok_or_else(|| missing(level, step))?;
        if ct.len() != 2 {
            return Ok(l.key.rotates_columns_by(ct, step)?);
        }
        let h = l.hoisted(par)?;
        if &h.ctx_ct != ct[1].ctx() {
            return Err(HeError::Value(format!(
                "the ciphertext is not at level {level}, the level of its rotation keys"
            )));
        }
        let k = h.by_step.get(&step).ok_or_else(|| missing(level, step))?;
        h.rotate(ct, &h.digits(ct)?, k, par)
    }
}

impl RotationKeys {
    /// Rotates `ct` (at `level`) by each of `steps` with one decomposition
    /// of its second polynomial ("hoisting"): the RNS digits of a rotated
    /// polynomial are the rotated digits, and a rotation permutes NTT
    /// slots, so the inverse NTT and the digits' NTTs (most of a
    /// rotation's cost) are done once for all steps, which then run in
    /// parallel. A digit is lifted as its residue in [0, q_i); rotating
    /// it negates some coefficients, a different representative of the
    /// same residue: the gadget vector is 0 modulo q_i times it, so the
    /// result decrypts the same, with the same noise bound.
    pub fn rotate_hoisted(
        &self,
        ct: &Ciphertext,
        level: usize,
        steps: &[usize],
        par: &Arc<BfvParameters>,
    ) -> Result<Vec<Ciphertext>> {
        if ct.len() != 2 {
            return Err(HeError::Value("only 2-part ciphertexts can be rotated".into()));
        }
        // The key set of each step, then one decomposition per key level.
        let mut sets: Vec<(Arc<HoistedKeys>, usize)> = Vec::new();
        let mut which = Vec::with_capacity(steps.len());
        for &step in steps {
            let (i, l) = self
                .levels
                .iter()
                .enumerate()
                .find(|(_, l)| l.level == level && l.steps.contains(&step))
                .ok_or_else(|| missing(level, step))?;
            let h = l.hoisted(par)?;
            let j = match sets.iter().position(|&(_, id)| id == i) {
                Some(j) => j,
                None => {
                    if &h.ctx_ct != ct[1].ctx() {
                        return Err(HeError::Value(format!(
                            "the ciphertext is not at level {level}, the level of its rotation keys"
                        )));
                    }
                    sets.push((h, i));
                    sets.len() - 1
                }
            };
            which.push(j);
        }
        let digits: Vec<Vec<Poly>> = sets.iter().map(|(h, _)| h.digits(ct)).collect::<Result<_>>()?;
        steps
            .par_iter()
            .zip(which.par_iter())
            .map(|(&step, &j)| {
                let h = &sets[j].0;
                let k = h.by_step.get(&step).ok_or_else(|| missing(level, step))?;
                h.rotate(ct, &digits[j], k, par)
            })
            .collect()
    }
}

/// The error for a rotation step the context holds no key for.
pub fn missing(level: usize, step: usize) -> HeError {
    HeError::Value(format!(
        "no rotation key for step {step} at ciphertext level {level}: make the context from the model's plan (its keys cover the steps the model needs) and run keygen()"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make_n, BATCH};
    use crate::he::serialize::{context_from_bytes, public_context_to_bytes};

    #[test]
    fn rotation_keys_travel_with_the_public_context() {
        let mut ctx = make_n(4096, vec![], 2, BATCH, None);
        let needs = vec![
            RotationNeed::at(0, vec![3, 1]),
            RotationNeed::at(1, vec![8]),
        ];
        ctx.rotation_keygen(&needs).unwrap();
        let held = ctx.rotation_steps();
        assert_eq!(
            held,
            vec![
                RotationNeed::at(0, vec![1, 3]),
                RotationNeed::at(1, vec![8])
            ]
        );
        let blob = public_context_to_bytes(&ctx).unwrap();
        let server = context_from_bytes(&blob, false).unwrap();
        assert_eq!(server.rotation_steps(), held);
        let rot = &server.keys().unwrap().rotations[1];
        assert!(rot.supports(0, 3) && !rot.supports(1, 3));
        let x = ctx
            .encrypt(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 1])).view())
            .unwrap();
        let ct = &x.data().iter().next().unwrap()[1];
        let par = &ctx.params().bfv()[1];
        assert!(rot.rotate(ct, 0, 1, par).is_ok());
        match rot.rotate(ct, 0, 2, par) {
            Err(HeError::Value(m)) => assert!(m.contains("step 2") && m.contains("level 0"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Steps outside 1..m/2 and levels without room are refused when generating.
        assert!(ctx
            .rotation_keygen(&[RotationNeed::at(0, vec![2048])])
            .is_err());
        assert!(ctx
            .rotation_keygen(&[RotationNeed::at(5, vec![1])])
            .is_err());
        assert_eq!(
            power_of_two_needs(2048)[0].steps,
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
        );
    }

    /// Parameters, a secret key and a SIMD ciphertext of 0..n switched to `level`.
    fn setup(n: usize, sizes: &[usize], level: usize) -> (Arc<BfvParameters>, SecretKey, Ciphertext, Vec<u64>) {
        use fhe::bfv::{BfvParametersBuilder, Encoding, Plaintext};
        use fhe_traits::{FheEncoder, FheEncrypter};
        let t = crate::he::params::batch_primes_below(n, 1 << 20, 1)[0];
        let par = BfvParametersBuilder::new()
            .set_degree(n)
            .set_plaintext_modulus(t)
            .set_moduli_sizes(sizes)
            .build_arc()
            .unwrap();
        let mut rng = rand::rng();
        let sk = SecretKey::random(&par, &mut rng);
        let v: Vec<u64> = (0..n as u64).map(|i| (i * 7919) % t).collect();
        let pt = Plaintext::try_encode(&v, Encoding::simd(), &par).unwrap();
        let mut ct: Ciphertext = sk.try_encrypt(&pt, &mut rng).unwrap();
        ct.switch_to_level(level).unwrap();
        (par, sk, ct, v)
    }

    fn decrypt(sk: &SecretKey, par: &Arc<BfvParameters>, ct: &Ciphertext) -> Vec<u64> {
        use fhe::bfv::Encoding;
        use fhe_traits::{FheDecoder, FheDecrypter};
        let pt = sk.try_decrypt(ct).unwrap();
        let _ = par;
        Vec::<u64>::try_decode(&pt, Encoding::simd()).unwrap()
    }

    #[test]
    fn hoisted_rotations_match_rotations() {
        // Keys at the ciphertext's level and one level up (special prime); fresh and loaded keys.
        let n = 4096;
        let (par, sk, ct, v) = setup(n, &[50, 50, 50], 1);
        let steps = vec![1, 3, 100, n / 2 - 1];
        for key_level in [1, 0] {
            let mut b = EvaluationKeyBuilder::new_leveled(&sk, 1, key_level).unwrap();
            for &s in &steps {
                b.enable_column_rotation(s).unwrap();
            }
            let key = b.build(&mut rand::rng()).unwrap();
            let loaded = {
                use fhe_traits::DeserializeParametrized;
                EvaluationKey::from_bytes(&key.to_bytes(), &par).unwrap()
            };
            for key in [key, loaded] {
                let keys = RotationKeys {
                    levels: vec![LevelKey::new(1, steps.clone(), key)],
                };
                let hoisted = keys.rotate_hoisted(&ct, 1, &steps, &par).unwrap();
                for (&s, h) in steps.iter().zip(&hoisted) {
                    let plain = decrypt(&sk, &par, &keys.levels[0].key.rotates_columns_by(&ct, s).unwrap());
                    let got = decrypt(&sk, &par, h);
                    assert_eq!(got, plain, "step {s}, key level {key_level}");
                    assert_eq!(decrypt(&sk, &par, &keys.rotate(&ct, 1, s, &par).unwrap()), plain);
                    let row = n / 2;
                    assert_eq!(got[0], v[s % row], "step {s}");
                }
                assert!(matches!(keys.rotate_hoisted(&ct, 1, &[2], &par), Err(HeError::Value(_))));
                assert!(matches!(keys.rotate_hoisted(&ct, 0, &[1], &par), Err(HeError::Value(_))));
            }
        }
    }

    /// Timing (run by hand): `cargo test --release --lib hoisted_rotation_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hoisted_rotation_cost() {
        let n = 8192;
        let (par, sk, ct, _) = setup(n, &[55, 55, 54, 54], 1);
        let steps: Vec<usize> = (1..=9).chain([n / 2 - 1]).collect();
        let mut b = EvaluationKeyBuilder::new_leveled(&sk, 1, 0).unwrap();
        let mut g = EvaluationKeyBuilder::new_leveled(&sk, 1, 1).unwrap();
        for &s in &steps {
            b.enable_column_rotation(s).unwrap();
            g.enable_column_rotation(s).unwrap();
        }
        let keys = RotationKeys {
            levels: vec![LevelKey::new(1, steps.clone(), b.build(&mut rand::rng()).unwrap())],
        };
        let giant = RotationKeys {
            levels: vec![LevelKey::new(1, steps.clone(), g.build(&mut rand::rng()).unwrap())],
        };
        keys.rotate_hoisted(&ct, 1, &steps, &par).unwrap();
        giant.rotate(&ct, 1, 1, &par).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            let time = |f: &dyn Fn()| -> f64 {
                (0..7)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let up_fhe = time(&|| steps.iter().for_each(|&s| drop(keys.levels[0].key.rotates_columns_by(&ct, s).unwrap())));
            let up_ours = time(&|| steps.iter().for_each(|&s| drop(keys.rotate(&ct, 1, s, &par).unwrap())));
            let hoisted = time(&|| drop(keys.rotate_hoisted(&ct, 1, &steps, &par).unwrap()));
            let same_fhe = time(&|| steps.iter().for_each(|&s| drop(giant.levels[0].key.rotates_columns_by(&ct, s).unwrap())));
            let same_ours = time(&|| steps.iter().for_each(|&s| drop(giant.rotate(&ct, 1, s, &par).unwrap())));
            let hk = giant.levels[0].hoisted(&par).unwrap();
            let dg = hk.digits(&ct).unwrap();
            let t_digits = time(&|| drop(hk.digits(&ct).unwrap()));
            let k1 = &hk.by_step[&1];
            let t_rot = time(&|| drop(hk.rotate(&ct, &dg, k1, &par).unwrap()));
            let t_sub = time(&|| drop(ct[0].substitute(&k1.at_ct).unwrap()));
            eprintln!("one same-level rotation: digits {t_digits:.2} ms, products and the rest {t_rot:.2} ms, substitute c0 {t_sub:.2} ms");
            eprintln!(
                "{} rotations at level 1, 1 thread, best of 7 (fhe.rs / ours): key one level up {up_fhe:.1} / {up_ours:.1} ms, hoisted {hoisted:.1} ms; key at level 1 {same_fhe:.1} / {same_ours:.1} ms",
                steps.len()
            );
        });
    }
}
