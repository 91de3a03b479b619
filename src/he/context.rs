//! The context: parameters plus keys. The key holder's context has the secret
//! key; a server's context, loaded from a public context, has only the public
//! and relinearization keys and can compute but never decrypt.

use std::sync::Arc;

use fhe::bfv::{
    Ciphertext, Encoding as FheEncoding, Multiplicator, Plaintext, PublicKey, RelinearizationKey,
    SecretKey,
};
use fhe_traits::{FheDecoder, FheDecrypter, FheEncoder, FheEncrypter, Serialize as FheSerialize};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::encoding::{centre, crt_centred, fractional_decode, fractional_encode, reduce_i128};
use super::error::{value_err, HeError, Result};
use super::galois::{RotationKeys, RotationNeed};
use super::growth::Growth;
use super::params::{Encoding, HeParameters};
use super::square::{Squarer, Tensor};
use super::tensor::{at_common_level, check_fits, shaped, CipherTensor, Element};

/// The keys of a context. `secret` is `None` on a server.
pub struct Keys {
    /// One secret key per plaintext modulus (key holder only).
    pub(crate) secret: Option<Vec<SecretKey>>,
    /// One public key per plaintext modulus (for third-party encryption).
    pub(crate) public: Vec<PublicKey>,
    /// Relinearization keys per plaintext modulus, one per ciphertext level
    /// that products run at (empty where the parameters cannot hold them, m=1024).
    pub(crate) relin: Vec<Vec<RelinearizationKey>>,
    /// Multiplication + relinearization strategies built from `relin`, per level.
    pub(crate) mult: Vec<Vec<Multiplicator>>,
    /// Hash of the public key material: what a ciphertext's key id is checked against.
    pub(crate) key_id: [u8; 16],
    /// Rotation keys per plaintext modulus (empty until asked for).
    pub(crate) rotations: Vec<RotationKeys>,
}

/// Ciphertext levels at which products run: all but the last, so that a
/// product can switch down while at least two moduli remain.
fn product_levels(n_moduli: usize) -> usize {
    n_moduli.saturating_sub(1)
}

impl Keys {
    /// Assembles keys, deriving the multiplicators and the key id. A product
    /// at level l switches down to l+1 when that leaves two moduli or more:
    /// the next layers then run on smaller ciphertexts (faster, less memory)
    /// at no cost in noise budget.
    pub fn new(
        secret: Option<Vec<SecretKey>>,
        public: Vec<PublicKey>,
        relin: Vec<Vec<RelinearizationKey>>,
        n_moduli: usize,
    ) -> Result<Keys> {
        let mut mult = Vec::with_capacity(relin.len());
        for rks in &relin {
            let mut per_level = Vec::with_capacity(rks.len());
            for (level, rk) in rks.iter().enumerate() {
                let mut m = Multiplicator::default(rk)?;
                if level + 2 < n_moduli {
                    m.enable_mod_switching()?;
                }
                per_level.push(m);
            }
            mult.push(per_level);
        }
        let mut h = Sha256::new();
        h.update(b"pycrcnn-key-v1");
        for pk in &public {
            h.update(pk.to_bytes());
        }
        let d = h.finalize();
        let mut key_id = [0u8; 16];
        key_id.copy_from_slice(&d[..16]);
        let rotations = public.iter().map(|_| RotationKeys::default()).collect();
        Ok(Keys {
            secret,
            public,
            relin,
            mult,
            key_id,
            rotations,
        })
    }
}

/// Parameters and keys.
pub struct HeContext {
    params: Arc<HeParameters>,
    keys: Option<Keys>,
    /// Squarers per plaintext modulus and product level, made on first use
    /// (they depend on the parameters only).
    squarers: std::sync::OnceLock<Result<Vec<Vec<Squarer>>>>,
}

impl HeContext {
    /// A context without keys.
    pub fn new(params: HeParameters) -> HeContext {
        HeContext {
            params: Arc::new(params),
            keys: None,
            squarers: Default::default(),
        }
    }

    /// A context with the same parameters (the same `Arc`: tensors of either
    /// are compatible) and no keys.
    pub fn without_keys(&self) -> HeContext {
        HeContext {
            params: self.params.clone(),
            keys: None,
            squarers: Default::default(),
        }
    }

    /// A context with loaded keys (public context or secret key blobs).
    pub(crate) fn with_keys(params: Arc<HeParameters>, keys: Keys) -> HeContext {
        HeContext {
            params,
            keys: Some(keys),
            squarers: Default::default(),
        }
    }

    /// The validated parameters.
    pub fn params(&self) -> &Arc<HeParameters> {
        &self.params
    }

    /// Generates a secret key, its public key and relinearization keys.
    pub fn keygen(&mut self) -> Result<()> {
        self.keygen_for_levels(usize::MAX)
    }

    /// [`HeContext::keygen`] with relinearization keys only for products at
    /// the first `levels` ciphertext levels (a planned model that multiplies
    /// only at the top level needs one: smaller public contexts and servers).
    pub fn keygen_for_levels(&mut self, levels: usize) -> Result<()> {
        let mut rng = rand::rng();
        let mut secret = Vec::new();
        let mut public = Vec::new();
        let mut relin = Vec::new();
        for par in self.params.bfv() {
            let sk = SecretKey::random(par, &mut rng);
            public.push(PublicKey::new(&sk, &mut rng));
            // Relinearization needs at least two moduli; without it only
            // additions and plaintext products are available. Keys live at the
            // top level (least noise) for every level products run at.
            let mut rks = Vec::new();
            if par.moduli().len() >= 2 {
                for level in 0..product_levels(par.moduli().len()).min(levels) {
                    rks.push(RelinearizationKey::new_leveled(&sk, level, 0, &mut rng)?);
                }
            }
            relin.push(rks);
            secret.push(sk);
        }
        self.keys = Some(Keys::new(
            Some(secret),
            public,
            relin,
            self.params.levels(),
        )?);
        Ok(())
    }

    /// Generates rotation keys for `needs` (key holder), replacing any held.
    pub fn rotation_keygen(&mut self, needs: &[RotationNeed]) -> Result<()> {
        let sks = self.secret()?;
        let rotations = sks
            .iter()
            .zip(self.params.bfv())
            .map(|(sk, par)| RotationKeys::generate(sk, par, needs))
            .collect::<Result<Vec<_>>>()?;
        if let Some(k) = self.keys.as_mut() {
            k.rotations = rotations;
        }
        Ok(())
    }

    /// The rotation steps held, per level (the same for every plaintext modulus).
    pub fn rotation_steps(&self) -> Vec<RotationNeed> {
        self.keys
            .as_ref()
            .and_then(|k| k.rotations.first())
            .map(|r| r.held())
            .unwrap_or_default()
    }

    /// The keys, or an error that says to generate them.
    pub fn keys(&self) -> Result<&Keys> {
        self.keys.as_ref().ok_or_else(|| {
            HeError::SecretKeyRequired(
                "this context has no keys yet: call keygen() or load a key".into(),
            )
        })
    }

    /// The secret keys, or [`HeError::SecretKeyRequired`].
    pub fn secret(&self) -> Result<&[SecretKey]> {
        self.keys()?.secret.as_deref().ok_or_else(|| {
            HeError::SecretKeyRequired(
                "this context holds only public material (a public context): decryption, noise measurement and rencryption need the secret key, which stays with the client".into(),
            )
        })
    }

    /// True when the secret key is present.
    pub fn has_secret_key(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| k.secret.is_some())
    }

    /// The key id of the keys (errors without keys).
    pub fn key_id(&self) -> Result<[u8; 16]> {
        Ok(self.keys()?.key_id)
    }

    /// Checks that a tensor belongs to this context's parameters and key.
    pub fn check(&self, t: &CipherTensor) -> Result<()> {
        if !Arc::ptr_eq(&t.params(), &self.params()) {
            return Err(HeError::Value(
                "this ciphertext belongs to another context; load it with CipherTensor.from_bytes(data, ctx)".into(),
            ));
        }
        if t.key_id() != self.key_id()? {
            return Err(HeError::Value(
                "this ciphertext was encrypted under another key".into(),
            ));
        }
        Ok(())
    }

    fn encrypt_pt(&self, k: usize, pt: &Plaintext) -> Result<Ciphertext> {
        let keys = self.keys()?;
        let mut rng = rand::rng();
        Ok(match &keys.secret {
            // Seeded secret-key ciphertexts: half the size and less noise.
            Some(sk) => sk[k].try_encrypt(pt, &mut rng)?,
            None => keys.public[k].try_encrypt(pt, &mut rng)?,
        })
    }

    /// Encrypts an array. Batch: axis 0 is the batch (≤ m images) and goes
    /// into the slots; fractional: one ciphertext per value.
    pub fn encrypt(&self, x: ArrayViewD<f64>) -> Result<CipherTensor> {
        let key_id = self.key_id()?;
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            return value_err(format!("cannot encrypt {bad}: only finite numbers"));
        }
        let par = &self.params;
        match par.encoding() {
            Encoding::Batch { scale_bits, .. } => {
                if x.ndim() == 0 {
                    return value_err("the batch encoding needs at least one axis (the batch)");
                }
                let n = x.shape()[0];
                if n == 0 || n > par.m() {
                    return value_err(format!(
                        "the batch axis holds 1 to m={} images, got {n}",
                        par.m()
                    ));
                }
                let scale = (scale_bits as f64).exp2();
                let phys_shape = x.shape()[1..].to_vec();
                let phys: usize = phys_shape.iter().product();
                let flat = x
                    .to_shape((n, phys))
                    .map_err(|e| HeError::Value(e.to_string()))?
                    .to_owned();
                let bound = flat
                    .iter()
                    .map(|v| (v * scale).round().abs())
                    .fold(0.0, f64::max);
                if bound >= par.plaintext_product() as f64 / 2.0 {
                    let limit = par.plaintext_product() as f64 / 2.0;
                    return Err(HeError::PlaintextOverflow {
                        message: format!("inputs up to {bound:.3e} at scale 2^{scale_bits} exceed the plaintext range ±{limit:.3e}"),
                        bound: bound / scale,
                        limit: limit / scale,
                    });
                }
                let elems: Result<Vec<Element>> = (0..phys)
                    .into_par_iter()
                    .map(|j| {
                        let ints: Vec<i128> = flat
                            .column(j)
                            .iter()
                            .map(|v| (v * scale).round() as i128)
                            .collect();
                        par.p()
                            .iter()
                            .enumerate()
                            .map(|(k, &t)| {
                                let slots: Vec<u64> =
                                    ints.iter().map(|&v| reduce_i128(v, t)).collect();
                                let pt = Plaintext::try_encode(
                                    &slots[..],
                                    FheEncoding::simd(),
                                    &par.bfv()[k],
                                )?;
                                self.encrypt_pt(k, &pt)
                            })
                            .collect()
                    })
                    .collect();
                let data = shaped(&phys_shape, elems?)?;
                Ok(CipherTensor::from_parts(
                    data,
                    Some(n),
                    scale,
                    Growth::Integer(bound),
                    par.clone(),
                    key_id,
                ))
            }
            Encoding::Fractional {
                base,
                int_digits,
                frac_digits,
            } => {
                let vals: Vec<f64> = x.iter().cloned().collect();
                let encoded: Vec<Vec<i64>> = vals
                    .par_iter()
                    .map(|&v| fractional_encode(v, par.m(), base, int_digits, frac_digits))
                    .collect::<Result<_>>()?;
                let mut g = vec![0.0; par.m()];
                for c in &encoded {
                    for (gi, &ci) in g.iter_mut().zip(c) {
                        *gi = f64::max(*gi, ci.abs() as f64);
                    }
                }
                if let Some(&worst) = g.iter().max_by(|a, b| a.total_cmp(b)) {
                    if worst >= par.p()[0] as f64 / 2.0 {
                        return Err(HeError::PlaintextOverflow {
                            message: format!("base-{base} digits up to {worst} do not fit p={}: use p > 2·(base-1)", par.p()[0]),
                            bound: worst,
                            limit: par.p()[0] as f64 / 2.0,
                        });
                    }
                }
                let elems: Result<Vec<Element>> = encoded
                    .par_iter()
                    .map(|c| {
                        let pt = Plaintext::try_encode(&c[..], FheEncoding::poly(), &par.bfv()[0])?;
                        Ok(vec![self.encrypt_pt(0, &pt)?])
                    })
                    .collect();
                let data = shaped(x.shape(), elems?)?;
                Ok(CipherTensor::from_parts(
                    data,
                    None,
                    1.0,
                    Growth::Poly(g),
                    par.clone(),
                    key_id,
                ))
            }
        }
    }

    /// Remaining invariant noise budget of one ciphertext, in bits (≤ 0: exhausted).
    fn budget_of(&self, k: usize, ct: &Ciphertext) -> Result<i64> {
        let sk = &self.secret()?[k];
        // SAFETY: measure_noise only runs in variable time depending on the noise.
        let noise = unsafe { sk.measure_noise(ct)? } as f64;
        let level = self.params.bfv()[k].level_of_context(ct[0].ctx())?;
        let logq = self.params.log_q_at_level(level);
        let logt = (self.params.p()[k] as f64).log2();
        Ok((logq - logt - 1.0 - noise).floor() as i64)
    }

    /// Minimum noise budget (bits) over all ciphertexts of `t`.
    pub fn noise_budget(&self, t: &CipherTensor) -> Result<i64> {
        self.secret()?;
        self.check(t)?;
        let all: Vec<(usize, &Ciphertext)> =
            t.data().iter().flat_map(|e| e.iter().enumerate()).collect();
        let budgets: Result<Vec<i64>> = all
            .par_iter()
            .map(|&(k, ct)| self.budget_of(k, ct))
            .collect();
        Ok(budgets?.into_iter().min().unwrap_or(0))
    }

    fn decrypt_element(&self, e: &Element, batch: Option<usize>, scale: f64) -> Result<Vec<f64>> {
        let sk = self.secret()?;
        let par = &self.params;
        let mut residues: Vec<Vec<u64>> = Vec::with_capacity(e.len());
        for (k, ct) in e.iter().enumerate() {
            let budget = self.budget_of(k, ct)?;
            if budget <= 0 {
                return Err(HeError::NoiseBudgetExhausted {
                    message: "a ciphertext's noise budget is exhausted: decrypting it would give garbage. Use larger parameters (m, moduli), fewer multiplications, a smaller p, or a rencryption".into(),
                    budget,
                });
            }
            let pt = sk[k].try_decrypt(ct)?;
            let enc = if batch.is_some() {
                FheEncoding::simd()
            } else {
                FheEncoding::poly()
            };
            residues.push(Vec::<u64>::try_decode(&pt, enc)?);
        }
        match (par.encoding(), batch) {
            (Encoding::Batch { .. }, Some(n)) => Ok((0..n)
                .map(|i| {
                    let r: Vec<u64> = residues.iter().map(|v| v[i]).collect();
                    crt_centred(&r, &par.p()) as f64 / scale
                })
                .collect()),
            (Encoding::Fractional { base, .. }, None) => {
                let c: Vec<i64> = residues[0].iter().map(|&x| centre(x, par.p()[0])).collect();
                Ok(vec![fractional_decode(&c, base)])
            }
            _ => value_err("the tensor does not match the context's encoding"),
        }
    }

    /// Batch encoding: the exact decrypted integers (CRT-recombined, centred
    /// in (−T/2, T/2]) of the logical shape, at the tensor's scale. float64
    /// cannot hold them once they pass 2^53.
    pub fn decrypt_integers(&self, t: &CipherTensor) -> Result<ArrayD<i128>> {
        self.secret()?;
        self.check(t)?;
        let Some(n) = t.batch() else {
            return value_err("decrypt_integers reads the batch encoding's integers; use decrypt for the fractional encoding");
        };
        let elems: Vec<&Element> = t.data().iter().collect();
        let vals: Vec<Vec<i128>> = elems
            .par_iter()
            .map(|e| self.decrypt_slots(e, n))
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(n * vals.len());
        for i in 0..n {
            out.extend(vals.iter().map(|v| v[i]));
        }
        shaped(&t.shape(), out)
    }

    /// The first `n` slots of a batch element as centred integers.
    fn decrypt_slots(&self, e: &Element, n: usize) -> Result<Vec<i128>> {
        let sk = self.secret()?;
        let mut residues: Vec<Vec<u64>> = Vec::with_capacity(e.len());
        for (k, ct) in e.iter().enumerate() {
            let budget = self.budget_of(k, ct)?;
            if budget <= 0 {
                return Err(HeError::NoiseBudgetExhausted {
                    message:
                        "a ciphertext's noise budget is exhausted: decrypting it would give garbage"
                            .into(),
                    budget,
                });
            }
            residues.push(Vec::<u64>::try_decode(
                &sk[k].try_decrypt(ct)?,
                FheEncoding::simd(),
            )?);
        }
        let p = self.params.p();
        Ok((0..n)
            .map(|i| crt_centred(&residues.iter().map(|v| v[i]).collect::<Vec<u64>>(), p))
            .collect())
    }

    /// Decrypts to float64 of the logical shape. Raises
    /// [`HeError::NoiseBudgetExhausted`] instead of returning garbage.
    pub fn decrypt(&self, t: &CipherTensor) -> Result<ArrayD<f64>> {
        self.secret()?;
        self.check(t)?;
        let elems: Vec<&Element> = t.data().iter().collect();
        let vals: Vec<Vec<f64>> = elems
            .par_iter()
            .map(|e| self.decrypt_element(e, t.batch(), t.scale()))
            .collect::<Result<_>>()?;
        let shape = t.shape();
        match t.batch() {
            None => shaped(&shape, vals.into_iter().flatten().collect()),
            Some(n) => {
                // vals[j][i]: element j, image i → logical [i, j].
                let phys = vals.len();
                let mut out = Vec::with_capacity(n * phys);
                for i in 0..n {
                    for v in &vals {
                        out.push(v[i]);
                    }
                }
                shaped(&shape, out)
            }
        }
    }

    fn multiplicator(&self, k: usize, level: usize) -> Result<&Multiplicator> {
        let keys = self.keys()?;
        if keys.mult[k].is_empty() {
            return Err(HeError::Parameter(format!(
                "ciphertext products need relinearization keys, which m={} with these moduli cannot hold; use m ≥ 2048",
                self.params.m()
            )));
        }
        keys.mult[k].get(level).ok_or_else(|| {
            HeError::Value(format!(
                "no ciphertext products at modulus level {level} (the last level); multiply before switching down"
            ))
        })
    }

    /// The relinearized product of two elements at `level`, component by component.
    fn product(&self, x: &Element, y: &Element, level: usize) -> Result<Element> {
        x.iter()
            .zip(y)
            .enumerate()
            .map(|(k, (cx, cy))| {
                Ok(self
                    .multiplicator(k, level)?
                    .multiply(&*self.two_part(k, cx)?, &*self.two_part(k, cy)?)?)
            })
            .collect()
    }

    /// Element-wise product of two tensors (relinearized). Batch scales multiply.
    pub fn multiply(&self, a: &CipherTensor, b: &CipherTensor) -> Result<CipherTensor> {
        self.check(a)?;
        self.check(b)?;
        if a.shape() != b.shape() {
            return value_err(format!(
                "shapes differ: {:?} and {:?}",
                a.shape(),
                b.shape()
            ));
        }
        // Products switch down a level: the operand that sits higher up comes
        // down to the other's level (x · x² in a polynomial, Pyfhel's power).
        let (a, b) = at_common_level(a, b)?;
        let level = a.level()?;
        let growth = a.growth().mul(&b.growth());
        let scale = a.scale() * b.scale();
        check_fits(&self.params, &growth, scale, "square/product")?;
        let xs: Vec<(&Element, &Element)> = a.data().iter().zip(b.data().iter()).collect();
        let out: Result<Vec<Element>> = xs
            .par_iter()
            .map(|(x, y)| self.product(x, y, level))
            .collect();
        let data = shaped(a.data().shape(), out?)?;
        Ok(a.with_data(data, scale, growth))
    }

    /// Whether squares can run at `level` (keys, a modulus left below).
    pub(crate) fn can_square(&self, level: usize) -> Result<()> {
        for k in 0..self.params.p().len() {
            // The keys' check first: it says why m=1024 has no products.
            self.multiplicator(k, level)?;
            self.squarer(k, level)?;
        }
        Ok(())
    }

    /// The squarer of plaintext modulus `k` at `level`.
    fn squarer(&self, k: usize, level: usize) -> Result<&Squarer> {
        let all = self.squarers.get_or_init(|| {
            self.params
                .bfv()
                .iter()
                .map(|par| {
                    (0..product_levels(par.moduli().len()))
                        .map(|l| Squarer::new(par, l))
                        .collect()
                })
                .collect()
        });
        let all = all.as_ref().map_err(|e| HeError::Backend(e.to_string()))?;
        all.get(k).and_then(|v| v.get(level)).ok_or_else(|| {
            HeError::Value(format!(
                "no ciphertext products at modulus level {level} (the last level, or m={} without room for one); multiply before switching down",
                self.params.m()
            ))
        })
    }

    /// The relinearized square of the two-part `ct` (plaintext modulus `k`)
    /// at `level`: the tensor's products and scalings run in parallel (one
    /// ciphertext per prime, as in the packed layout, keeps both threads busy).
    pub(crate) fn square_relinearized(
        &self,
        k: usize,
        ct: &Ciphertext,
        level: usize,
    ) -> Result<Ciphertext> {
        let rk = self.keys()?.relin[k].get(level).ok_or_else(|| {
            HeError::Parameter(format!(
                "ciphertext products at level {level} need relinearization keys for that level: make the keys from the model's plan (keygen())"
            ))
        })?;
        let mut sq = self.squarer(k, level)?.square(ct)?;
        rk.relinearizes(&mut sq)?;
        Ok(sq)
    }

    /// `ct` (plaintext modulus `k`) with two parts: relinearized at its
    /// level when it is the three-part output of a square. Products call it
    /// on their inputs, so relinearization happens only where a product
    /// feeds another product, after the linear layers between them (whose
    /// noise then does not multiply the key-switching noise).
    pub(crate) fn two_part<'a>(
        &self,
        k: usize,
        ct: &'a Ciphertext,
    ) -> Result<std::borrow::Cow<'a, Ciphertext>> {
        if ct.len() == 2 {
            return Ok(std::borrow::Cow::Borrowed(ct));
        }
        let level = self.params.bfv()[k].level_of_context(ct[0].ctx())?;
        let rk = self.keys()?.relin[k].get(level).ok_or_else(|| {
            HeError::Parameter(format!(
                "no relinearization key at modulus level {level}: a product's input needs one here"
            ))
        })?;
        let mut c = ct.clone();
        rk.relinearizes(&mut c)?;
        Ok(std::borrow::Cow::Owned(c))
    }

    /// Every element of `x` with two parts (see [`HeContext::two_part`]).
    pub fn relinearized(&self, x: &CipherTensor) -> Result<CipherTensor> {
        self.check(x)?;
        if x.data().iter().all(|e| e.iter().all(|c| c.len() == 2)) {
            return Ok(x.clone());
        }
        let elems: Vec<&Element> = x.data().iter().collect();
        let out: Vec<Element> = elems
            .par_iter()
            .map(|e| {
                e.iter()
                    .enumerate()
                    .map(|(k, c)| Ok(self.two_part(k, c)?.into_owned()))
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(x.with_data(
            shaped(x.data().shape(), out)?,
            x.scale(),
            x.growth().clone(),
        ))
    }

    /// [`HeContext::relinearized`] for a tensor nobody needs afterwards:
    /// each element is relinearized in place (no second copy in memory).
    pub fn relinearize(&self, x: CipherTensor) -> Result<CipherTensor> {
        self.check(&x)?;
        if x.data().iter().all(|e| e.iter().all(|c| c.len() == 2)) {
            return Ok(x);
        }
        let template = x.with_data(
            ndarray::ArrayD::default(IxDyn(&[0])),
            x.scale(),
            x.growth().clone(),
        );
        let data = x.into_data();
        let shape = data.shape().to_vec();
        let data = if data.is_standard_layout() {
            data
        } else {
            data.as_standard_layout().into_owned()
        };
        let (elems, _) = data.into_raw_vec_and_offset();
        let out: Vec<Element> = elems
            .into_par_iter()
            .map(|mut e| {
                for (k, c) in e.iter_mut().enumerate() {
                    if c.len() == 3 {
                        *c = self.two_part(k, c)?.into_owned();
                    }
                }
                Ok(e)
            })
            .collect::<Result<_>>()?;
        Ok(template.with_data(
            shaped(&shape, out)?,
            template.scale(),
            template.growth().clone(),
        ))
    }

    /// The square of one ciphertext (plaintext modulus `k`) at `level`:
    /// three parts, switched down a level while two moduli or more remain
    /// below (the next layers run on smaller ciphertexts).
    pub(crate) fn square_ct(&self, k: usize, ct: &Ciphertext, level: usize) -> Result<Ciphertext> {
        let ct = self.two_part(k, ct)?;
        let squarer = self.squarer(k, level)?;
        let t = squarer.tensor(&ct)?;
        if level + 2 < self.params.levels() {
            squarer.finish_switched(t)
        } else {
            squarer.finish(t)
        }
    }

    /// Adds the tensor square of `ct` (plaintext modulus `k`, at `level`) to
    /// `acc`: tensor squares added in the extended basis and scaled back by
    /// t/Q once ([`HeContext::square_finish`]) cost one scaling instead of one
    /// per square (a square followed by a sum pooling).
    pub(crate) fn square_add(
        &self,
        k: usize,
        ct: &Ciphertext,
        level: usize,
        acc: &mut Option<Tensor>,
    ) -> Result<()> {
        let t = self.squarer(k, level)?.tensor(&*self.two_part(k, ct)?)?;
        match acc.as_mut() {
            None => *acc = Some(t),
            Some(a) => a.add_assign(&t),
        }
        Ok(())
    }

    /// The ciphertext of a sum of tensor squares: three parts, switched down
    /// like [`HeContext::square_ct`].
    pub(crate) fn square_finish(
        &self,
        k: usize,
        acc: Option<Tensor>,
        level: usize,
    ) -> Result<Ciphertext> {
        let acc = acc.ok_or_else(|| {
            HeError::Value("a sum of squares needs at least one ciphertext".into())
        })?;
        let squarer = self.squarer(k, level)?;
        if level + 2 < self.params.levels() {
            squarer.finish_switched(acc)
        } else {
            squarer.finish(acc)
        }
    }

    /// Element-wise square that consumes `x`: each input ciphertext is freed
    /// as soon as its square exists, so the input and the output are never
    /// both whole in memory. The output is not relinearized (three parts):
    /// the next product relinearizes its inputs.
    pub fn square(&self, x: CipherTensor) -> Result<CipherTensor> {
        self.check(&x)?;
        let level = x.level()?;
        let growth = x.growth().mul(&x.growth());
        check_fits(&self.params, &growth, x.scale() * x.scale(), "square")?;
        self.can_square(level)?;
        let template = x.with_data(
            ndarray::ArrayD::default(IxDyn(&[0])),
            x.scale() * x.scale(),
            growth,
        );
        let data = x.into_data();
        let shape = data.shape().to_vec();
        let data = if data.is_standard_layout() {
            data
        } else {
            data.as_standard_layout().into_owned()
        };
        let (elems, _) = data.into_raw_vec_and_offset();
        // Each input element is dropped as soon as its square exists.
        let out: Vec<Element> = elems
            .into_par_iter()
            .map(|e| {
                e.iter()
                    .enumerate()
                    .map(|(k, c)| self.square_ct(k, c, level))
                    .collect::<Result<Element>>()
            })
            .collect::<Result<_>>()?;
        let data = shaped(&shape, out)?;
        Ok(template.with_data(data, template.scale(), template.growth().clone()))
    }

    /// Measured plaintext coefficients (key holder only): the largest
    /// |coefficient| over all ciphertexts against the limit p/2 (batch: the
    /// largest |slot value · scale| against T/2), and for the fractional
    /// encoding the decode error that wrapped coefficients could be causing:
    /// positions whose measured maximum exceeds p/4 are counted as possibly
    /// wrapped. Unlike the worst-case bound this reflects the actual data.
    pub fn measure_coefficients(&self, t: &CipherTensor) -> Result<(f64, f64, f64)> {
        let sk = self.secret()?;
        self.check(t)?;
        let par = &self.params;
        let limit = par.plaintext_product() as f64 / 2.0;
        let elems: Vec<&Element> = t.data().iter().collect();
        match par.encoding() {
            Encoding::Fractional { base, .. } => {
                let p = par.p()[0];
                let per_elem: Vec<Vec<f64>> = elems
                    .par_iter()
                    .map(|e| {
                        let pt = sk[0].try_decrypt(&e[0])?;
                        let c = Vec::<u64>::try_decode(&pt, FheEncoding::poly())?;
                        Ok(c.iter()
                            .map(|&x| centre(x, p).unsigned_abs() as f64)
                            .collect())
                    })
                    .collect::<Result<_>>()?;
                let mut maxes = vec![0.0f64; par.m()];
                for v in &per_elem {
                    for (a, &b) in maxes.iter_mut().zip(v) {
                        *a = a.max(b);
                    }
                }
                let m = par.m();
                let b = base as f64;
                let mut risk = 0.0;
                for (i, &x) in maxes.iter().enumerate() {
                    if x > p as f64 / 4.0 {
                        let w = if i < m / 2 {
                            b.powi(i as i32)
                        } else {
                            b.powi(-((m - i) as i32))
                        };
                        risk += (p as f64 / 2.0) * w;
                    }
                }
                Ok((maxes.iter().cloned().fold(0.0, f64::max), limit, risk))
            }
            Encoding::Batch { .. } => {
                let d = self.decrypt(t)?;
                let mx = d.iter().map(|v| (v * t.scale()).abs()).fold(0.0, f64::max);
                Ok((
                    mx,
                    limit,
                    if mx > limit / 2.0 { f64::INFINITY } else { 0.0 },
                ))
            }
        }
    }

    /// Decrypts and encrypts afresh (key holder only): a full noise budget and,
    /// in the batch encoding, the input scale again.
    pub fn rencrypt(&self, x: &CipherTensor) -> Result<CipherTensor> {
        let plain = self.decrypt(x)?;
        self.encrypt(plain.view())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::he::params::ParametersRequest;
    use ndarray::ArrayD;
    use rand::Rng;

    pub(crate) const FRAC: Encoding = Encoding::Fractional {
        base: 2,
        int_digits: 64,
        frac_digits: 32,
    };
    pub(crate) const BATCH: Encoding = Encoding::Batch {
        scale_bits: 16,
        weight_scale_bits: 8,
    };

    /// A keyed context.
    pub(crate) fn make(
        m: usize,
        p: Vec<u64>,
        encoding: Encoding,
        sizes: Option<Vec<usize>>,
    ) -> HeContext {
        let n = p.len().max(1);
        make_n(m, p, n, encoding, sizes)
    }

    pub(crate) fn make_n(
        m: usize,
        p: Vec<u64>,
        n: usize,
        encoding: Encoding,
        sizes: Option<Vec<usize>>,
    ) -> HeContext {
        let req = ParametersRequest {
            m,
            p,
            n_plaintext_moduli: n,
            sec: 128,
            encoding,
            moduli_sizes: sizes,
        };
        let mut ctx = HeContext::new(req.build().expect("parameters"));
        ctx.keygen().expect("keygen");
        ctx
    }

    pub(crate) fn random(shape: &[usize], lo: f64, hi: f64) -> ArrayD<f64> {
        let mut rng = rand::rng();
        ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(lo..hi))
    }

    fn max_err(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn fractional_round_trip() {
        let ctx = make(2048, vec![65537], FRAC, None);
        let x = random(&[2, 3], -1000.0, 1000.0);
        let t = ctx.encrypt(x.view()).unwrap();
        assert_eq!(t.shape(), vec![2, 3]);
        assert!(max_err(&ctx.decrypt(&t).unwrap(), &x) <= 2f64.powi(-32));
        // Integers are exact, including 0 and negative values.
        let ints =
            ArrayD::from_shape_vec(IxDyn(&[5]), vec![0.0, 1.0, -1.0, 123456789.0, -987654321.0])
                .unwrap();
        let t = ctx.encrypt(ints.view()).unwrap();
        assert_eq!(ctx.decrypt(&t).unwrap(), ints);
    }

    #[test]
    fn batch_round_trip() {
        let ctx = make(2048, vec![], BATCH, None);
        let x = random(&[7, 2, 2], -100.0, 100.0);
        let t = ctx.encrypt(x.view()).unwrap();
        assert_eq!(t.shape(), vec![7, 2, 2]);
        assert_eq!(t.data().len(), 4);
        assert!(max_err(&ctx.decrypt(&t).unwrap(), &x) <= 0.5 / 65536.0 + 1e-12);
        // A full batch of m images.
        let x = random(&[2048, 1], -1.0, 1.0);
        let t = ctx.encrypt(x.view()).unwrap();
        assert!(max_err(&ctx.decrypt(&t).unwrap(), &x) <= 0.5 / 65536.0 + 1e-12);
        let too_many = random(&[2049, 1], -1.0, 1.0);
        assert!(matches!(
            ctx.encrypt(too_many.view()),
            Err(HeError::Value(_))
        ));
    }

    #[test]
    fn crt_three_plaintext_moduli() {
        let ctx = make_n(4096, vec![], 3, BATCH, None);
        let p = &ctx.params.p();
        assert_eq!(p.len(), 3);
        let t_bits: f64 = p.iter().map(|&x| (x as f64).log2()).sum();
        assert!(t_bits > 90.0, "{p:?}");
        // Values far beyond one modulus: k · 2^10 at scale 2^16 = k · 2^26, exact in f64.
        let mut rng = rand::rng();
        let x = ArrayD::from_shape_fn(IxDyn(&[5, 3]), |_| {
            (rng.random_range(-(1i64 << 40)..(1i64 << 40)) as f64) * 1024.0
        });
        let t = ctx.encrypt(x.view()).unwrap();
        assert_eq!(t.n_ciphertexts(), 9);
        assert_eq!(ctx.decrypt(&t).unwrap(), x);
        // A scalar product pushes values past every single modulus.
        let y = random(&[5, 3], -1000.0, 1000.0);
        let t = ctx.encrypt(y.view()).unwrap();
        let w = ArrayD::from_elem(IxDyn(&[]), -1000.0);
        let prod = t.mul_plain(&w).unwrap();
        let d = ctx.decrypt(&prod).unwrap();
        let expect = y.mapv(|v| ((v * 65536.0).round() / 65536.0) * -1000.0);
        assert!(max_err(&d, &expect) < 1e-6, "{}", max_err(&d, &expect));
        // And a square (relinearized per component).
        let sq = ctx.square(t.clone()).unwrap();
        let expect = y.mapv(|v| ((v * 65536.0).round() / 65536.0).powi(2));
        assert!(max_err(&ctx.decrypt(&sq).unwrap(), &expect) < 1e-6);
    }

    #[test]
    fn square_at_2048_fractional() {
        let ctx = make(2048, vec![65537], FRAC, None);
        assert!(
            ctx.params.moduli().len() >= 3,
            "m=2048 needs small primes for one square: {:?}",
            ctx.params.moduli()
        );
        let x = random(&[1, 6], -10.0, 10.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let fresh = ctx.noise_budget(&t).unwrap();
        let s = ctx.square(t.clone()).unwrap();
        let after = ctx.noise_budget(&s).unwrap();
        assert!(after > 0 && after < fresh, "{fresh} → {after}");
        assert!(max_err(&ctx.decrypt(&s).unwrap(), &x.mapv(|v| v * v)) < 1e-7);
    }

    #[test]
    fn two_squares_at_8192() {
        let ctx = make(8192, vec![953983721], FRAC, None);
        let x = random(&[1, 2], -3.0, 3.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let s = ctx.square(ctx.square(t.clone()).unwrap()).unwrap();
        assert!(ctx.noise_budget(&s).unwrap() > 0);
        assert!(max_err(&ctx.decrypt(&s).unwrap(), &x.mapv(|v| v.powi(4))) < 1e-6);
    }

    #[test]
    fn square_switched_in_its_scaling_equals_square_then_switch() {
        // finish_switched (one rounding by t/(Q·q_last)) against finish and
        // fhe.rs's switch_down: the same plaintext, no less noise budget.
        use fhe_traits::FheDecrypter;
        let batch = Encoding::Batch {
            scale_bits: 6,
            weight_scale_bits: 6,
        };
        let ctx = make(4096, vec![], batch, Some(vec![36, 36, 37]));
        let x = random(&[7, 3], -3.0, 3.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let sk = &ctx.secret().unwrap()[0];
        let par = &ctx.params().bfv()[0];
        let squarer = ctx.squarer(0, 0).unwrap();
        for e in t.data().iter() {
            let tensor = squarer.tensor(&e[0]).unwrap();
            let again = squarer.tensor(&e[0]).unwrap();
            let mut two_step = squarer.finish(tensor).unwrap();
            two_step.switch_down().unwrap();
            let one_step = squarer.finish_switched(again).unwrap();
            assert_eq!(one_step.len(), 3);
            assert_eq!(par.level_of_context(one_step[0].ctx()).unwrap(), 1);
            assert_eq!(
                sk.try_decrypt(&one_step).unwrap(),
                sk.try_decrypt(&two_step).unwrap()
            );
            let (a, b) = unsafe {
                (
                    sk.measure_noise(&one_step).unwrap(),
                    sk.measure_noise(&two_step).unwrap(),
                )
            };
            assert!(a <= b + 1, "{a} vs {b} noise bits");
        }
        // The engine's square uses it: exact against the plaintext square.
        let q = x.mapv(|v| (v * 64.0).round() / 64.0);
        let y = ctx.square(t).unwrap();
        assert_eq!(y.level().unwrap(), 1);
        assert_eq!(ctx.decrypt(&y).unwrap(), q.mapv(|v| v * v));
    }

    #[test]
    fn noise_budget_falls_then_exhausts() {
        let ctx = make(4096, vec![953983721], FRAC, None);
        let x = random(&[1, 2], -2.0, 2.0);
        let mut t = ctx.encrypt(x.view()).unwrap();
        let mut expect = x.clone();
        let mut last = ctx.noise_budget(&t).unwrap();
        assert!(last > 40);
        let mut exhausted = false;
        for _ in 0..4 {
            t = ctx.square(t.clone()).unwrap();
            expect.mapv_inplace(|v| v * v);
            let b = ctx.noise_budget(&t).unwrap();
            assert!(
                b < last,
                "budget must fall with every product: {last} → {b}"
            );
            last = b;
            match ctx.decrypt(&t) {
                Ok(d) => {
                    assert!(b > 0);
                    assert!(
                        max_err(&d, &expect)
                            < 1e-3 * expect.iter().fold(1.0, |a, v| f64::max(a, v.abs()))
                    );
                }
                Err(HeError::NoiseBudgetExhausted { message: msg, .. }) => {
                    assert!(b <= 0, "{b}");
                    assert!(msg.contains("noise budget"));
                    exhausted = true;
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(exhausted, "4 squares at m=4096 must exhaust the budget");
        assert!(matches!(
            ctx.rencrypt(&t),
            Err(HeError::NoiseBudgetExhausted { .. })
        ));
    }

    #[test]
    fn plaintext_products_cost_budget_too() {
        let ctx = make(2048, vec![], BATCH, None);
        let x = random(&[3, 2], -1.0, 1.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let b0 = ctx.noise_budget(&t).unwrap();
        let w = ArrayD::from_elem(IxDyn(&[]), 0.75);
        let t1 = t.mul_plain(&w).unwrap();
        let b1 = ctx.noise_budget(&t1).unwrap();
        assert!(b1 < b0, "{b0} → {b1}");
    }

    #[test]
    fn public_context_computes_but_cannot_decrypt() {
        let client = make(2048, vec![65537], FRAC, None);
        let blob = crate::he::serialize::public_context_to_bytes(&client).unwrap();
        let server = crate::he::serialize::context_from_bytes(&blob, false).unwrap();
        assert!(!server.has_secret_key());
        assert_eq!(server.key_id().unwrap(), client.key_id().unwrap());
        let x = random(&[1, 3], -4.0, 4.0);
        let t = client.encrypt(x.view()).unwrap();
        let on_server = crate::he::serialize::tensor_from_bytes(
            &crate::he::serialize::tensor_to_bytes(&t),
            &server,
        )
        .unwrap();
        let sq = server.square(on_server.clone()).unwrap();
        let w = ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5, -2.0, 1.25]).unwrap();
        let y = sq
            .mul_plain(&w)
            .unwrap()
            .add_plain(&ArrayD::from_elem(IxDyn(&[]), 1.5))
            .unwrap();
        assert!(matches!(
            server.decrypt(&y),
            Err(HeError::SecretKeyRequired(_))
        ));
        assert!(matches!(
            server.noise_budget(&y),
            Err(HeError::SecretKeyRequired(_))
        ));
        assert!(matches!(
            server.rencrypt(&y),
            Err(HeError::SecretKeyRequired(_))
        ));
        // The server's encryptions use the public key; the client decrypts everything.
        let back = crate::he::serialize::tensor_from_bytes(
            &crate::he::serialize::tensor_to_bytes(&y),
            &client,
        )
        .unwrap();
        let expect = ndarray::Array::from_shape_fn(IxDyn(&[1, 3]), |i| {
            x[[0, i[1]]].powi(2) * w[[i[1]]] + 1.5
        });
        assert!(max_err(&client.decrypt(&back).unwrap(), &expect) < 1e-7);
        let pk = server.encrypt(x.view()).unwrap();
        let back = crate::he::serialize::tensor_from_bytes(
            &crate::he::serialize::tensor_to_bytes(&pk),
            &client,
        )
        .unwrap();
        assert!(max_err(&client.decrypt(&back).unwrap(), &x) <= 2f64.powi(-32));
    }

    #[test]
    fn foreign_tensors_are_refused() {
        let a = make(2048, vec![65537], FRAC, None);
        let b = make(2048, vec![65537], FRAC, None);
        let x = random(&[1, 2], -1.0, 1.0);
        let ta = a.encrypt(x.view()).unwrap();
        assert!(b.decrypt(&ta).is_err());
        assert!(b.square(ta.clone()).is_err());
        let tb = b.encrypt(x.view()).unwrap();
        assert!(ta.add(&tb).is_err());
    }
}
