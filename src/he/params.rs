//! Encryption parameters: degree, security level, ciphertext moduli chosen
//! within the Homomorphic Encryption Standard's bounds, plaintext modulus (or
//! several, combined by CRT in the batch encoding) and the encoding.

use std::sync::Arc;

use fhe::bfv::{BfvParameters, BfvParametersBuilder};
use fhe_math::zq::primes::generate_prime;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{HeError, Result};

/// Largest plaintext modulus picked automatically in the batch encoding.
const AUTO_PLAINTEXT_BITS: u32 = 40;
/// Largest ciphertext prime we generate for m >= 8192: smaller primes keep
/// fhe.rs's relinearization noise down.
const MAX_PRIME_BITS: usize = 45;

/// How real numbers become plaintexts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Encoding {
    /// One value per ciphertext, SEAL's FractionalEncoder semantics (the seed's).
    Fractional {
        /// Digit base (2 in the seed).
        base: u32,
        /// Integer digits, stored from coefficient 0 up.
        int_digits: usize,
        /// Fractional digits, stored negated from coefficient m-1 down.
        frac_digits: usize,
    },
    /// SIMD: slot i of every ciphertext belongs to image i; fixed-point integers.
    Batch {
        /// Inputs are encoded as round(x * 2^scale_bits).
        scale_bits: u32,
        /// Weights are encoded as round(w * 2^weight_scale_bits).
        weight_scale_bits: u32,
    },
}

impl Encoding {
    /// "fractional" or "batch".
    pub fn name(&self) -> &'static str {
        match self {
            Encoding::Fractional { .. } => "fractional",
            Encoding::Batch { .. } => "batch",
        }
    }
}

/// The largest log2(q) the Homomorphic Encryption Standard allows for (m, sec).
pub fn max_log_q(m: usize, sec: u32) -> Result<usize> {
    let row: [usize; 6] = match sec {
        128 => [27, 54, 109, 218, 438, 881],
        192 => [19, 37, 75, 152, 305, 611],
        256 => [14, 29, 58, 118, 237, 476],
        _ => {
            return Err(HeError::Parameter(format!(
                "sec={sec} is not a supported security level; allowed: 128, 192, 256"
            )))
        }
    };
    let idx = match m {
        1024 => 0,
        2048 => 1,
        4096 => 2,
        8192 => 3,
        16384 => 4,
        32768 => 5,
        _ => {
            return Err(HeError::Parameter(format!(
                "m={m} is not supported; m must be a power of two from 1024 to 32768"
            )))
        }
    };
    Ok(row[idx])
}

/// What a user asks for; [`ParametersRequest::build`] validates it.
#[derive(Debug, Clone)]
pub struct ParametersRequest {
    /// Polynomial degree (the seed's `m`).
    pub m: usize,
    /// Plaintext moduli: one for the fractional encoding, one or more (CRT) for batch.
    /// Empty = chosen by the engine (batch only).
    pub p: Vec<u64>,
    /// How many plaintext primes the engine picks when `p` is empty (batch only).
    pub n_plaintext_moduli: usize,
    /// Security level in bits: 128, 192 or 256.
    pub sec: u32,
    /// The encoding.
    pub encoding: Encoding,
    /// Explicit ciphertext moduli sizes in bits (experts); checked like the defaults.
    pub moduli_sizes: Option<Vec<usize>>,
}

/// Validated parameters, with one fhe.rs parameter set per plaintext modulus.
#[derive(Debug)]
pub struct HeParameters {
    m: usize,
    sec: u32,
    p: Vec<u64>,
    moduli: Vec<u64>,
    encoding: Encoding,
    layer_weight_scale_bits: Vec<u32>,
    calibrated_bound_bits: Option<f64>,
    bfv: Vec<Arc<BfvParameters>>,
    fingerprint: [u8; 16],
}

/// Serializable description of parameters (public context header, Python dicts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParametersSpec {
    /// Polynomial degree.
    pub m: usize,
    /// Security level.
    pub sec: u32,
    /// Plaintext moduli.
    pub p: Vec<u64>,
    /// Ciphertext moduli.
    pub moduli: Vec<u64>,
    /// The encoding.
    pub encoding: Encoding,
    /// Batch: one weight scale per weighted layer (Conv/Linear, model order);
    /// empty = every layer at the encoding's `weight_scale_bits`. Absent from
    /// the bytes when empty, so uniform contexts serialize (and fingerprint)
    /// as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_weight_scale_bits: Vec<u32>,
    /// Batch, calibrated plans: log2 of the declared bound on every layer's
    /// |integer| (the largest over calibration inputs times 2^margin). The
    /// growth check lets a layer through whose worst case could wrap when
    /// this bound fits (see [`HeParameters::calibrated_bound_bits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated_bound_bits: Option<f64>,
}

fn bits(x: u64) -> usize {
    64 - x.leading_zeros() as usize
}

/// Deterministic Miller-Rabin for u64.
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    for p in [2u64, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] {
        if n % p == 0 {
            return n == p;
        }
    }
    let mulmod = |a: u64, b: u64| ((a as u128 * b as u128) % n as u128) as u64;
    let powmod = |mut a: u64, mut e: u64| {
        let mut r = 1u64;
        while e > 0 {
            if e & 1 == 1 {
                r = mulmod(r, a);
            }
            a = mulmod(a, a);
            e >>= 1;
        }
        r
    };
    let (mut d, mut s) = (n - 1, 0);
    while d % 2 == 0 {
        d /= 2;
        s += 1;
    }
    'witness: for a in [2u64, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] {
        let mut x = powmod(a, d);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mulmod(x, x);
            if x == n - 1 {
                continue 'witness;
            }
        }
        return false;
    }
    true
}

/// Primes p ≡ 1 (mod 2m) below `below`, largest first, at most `count` of them.
pub fn batch_primes_below(m: usize, below: u64, count: usize) -> Vec<u64> {
    let step = 2 * m as u64;
    let mut out = Vec::new();
    if below <= step {
        return out;
    }
    let mut c = ((below - 1) / step) * step + 1;
    while c > step && out.len() < count {
        if c < below && is_prime(c) {
            out.push(c);
        }
        c -= step;
    }
    out
}

/// Primes p ≡ 1 (mod 2m) nearest to `p`, for error messages.
fn nearest_batch_primes(m: usize, p: u64, limit: u64) -> Vec<u64> {
    let step = 2 * m as u64;
    let mut out = batch_primes_below(m, p.min(limit), 2);
    let mut c = (p / step + 1) * step + 1;
    let mut above = 0;
    while above < 2 && c < limit && c < (1u64 << 62) {
        if is_prime(c) {
            out.push(c);
            above += 1;
        }
        c += step;
    }
    out.sort_unstable();
    out
}

/// The ciphertext moduli sizes used when the user gives none: as many bits as
/// the standard allows, at least two primes (three from m=4096), the first one
/// large enough to exceed the largest plaintext modulus.
fn default_moduli_sizes(m: usize, budget: usize, p_bits: usize) -> Vec<usize> {
    // fhe.rs relinearizes with an RNS decomposition (no special prime): its
    // noise grows with the size of each prime. At m=2048 two 27-bit primes
    // leave no budget after one square; three 18-bit primes leave a few bits
    // (for p ≤ 17 bits; larger p falls back to two primes below).
    let min_count = if m >= 4096 || (m == 2048 && p_bits > 0) {
        3
    } else {
        2
    };
    let mut count = min_count.max(budget.div_ceil(MAX_PRIME_BITS));
    // fhe.rs needs p below every ciphertext prime: fewer, larger primes for a large p.
    while count > 1 && budget / count < p_bits + 1 {
        count -= 1;
    }
    let even = budget / count;
    (0..count)
        .map(|i| (even + usize::from(i < budget % count)).min(62))
        .collect()
}

fn generate_moduli(sizes: &[usize], m: usize) -> Result<Vec<u64>> {
    let mut moduli: Vec<u64> = Vec::with_capacity(sizes.len());
    for &size in sizes {
        if !(10..=62).contains(&size) {
            return Err(HeError::Parameter(format!(
                "ciphertext moduli sizes must be between 10 and 62 bits, got {size} (sizes {sizes:?})"
            )));
        }
        let mut upper = if size == 62 { 1u64 << 62 } else { 1u64 << size };
        loop {
            match generate_prime(size, 2 * m as u64, upper) {
                Some(q) if moduli.contains(&q) => upper = q,
                Some(q) => {
                    moduli.push(q);
                    break;
                }
                None => {
                    return Err(HeError::Parameter(format!(
                        "there are not enough {size}-bit primes ≡ 1 mod {} for m={m}; use larger moduli sizes",
                        2 * m
                    )))
                }
            }
        }
    }
    Ok(moduli)
}

impl ParametersRequest {
    /// Validates the request and builds the parameters. Every failure is a
    /// [`HeError::Parameter`] that says what is allowed.
    pub fn build(&self) -> Result<HeParameters> {
        let budget = max_log_q(self.m, self.sec)?;
        match self.encoding {
            Encoding::Fractional {
                base,
                int_digits,
                frac_digits,
            } => {
                if base < 2 {
                    return Err(HeError::Parameter(format!(
                        "base must be at least 2, got {base}"
                    )));
                }
                if int_digits == 0 || frac_digits == 0 || int_digits + frac_digits > self.m {
                    return Err(HeError::Parameter(format!(
                        "int_digits ({int_digits}) and frac_digits ({frac_digits}) must be positive and sum to at most m={}",
                        self.m
                    )));
                }
                if self.p.len() != 1 {
                    return Err(HeError::Parameter(
                        "the fractional encoding needs exactly one plaintext modulus p (any integer ≥ 3)".into(),
                    ));
                }
                if self.p[0] < 3 {
                    return Err(HeError::Parameter(format!(
                        "p must be at least 3, got {}",
                        self.p[0]
                    )));
                }
            }
            Encoding::Batch {
                scale_bits,
                weight_scale_bits,
            } => {
                if scale_bits > 40 || weight_scale_bits > 40 {
                    return Err(HeError::Parameter(format!(
                        "scale_bits ({scale_bits}) and weight_scale_bits ({weight_scale_bits}) must be at most 40"
                    )));
                }
                if self.p.is_empty() && !(1..=8).contains(&self.n_plaintext_moduli) {
                    return Err(HeError::Parameter(format!(
                        "n_plaintext_moduli must be from 1 to 8, got {}",
                        self.n_plaintext_moduli
                    )));
                }
            }
        }

        let p_bits = self.p.iter().map(|&p| bits(p)).max().unwrap_or(0);
        let sizes = match &self.moduli_sizes {
            Some(s) => {
                let total: usize = s.iter().sum();
                if s.is_empty() || total > budget {
                    return Err(HeError::Parameter(format!(
                        "moduli sizes {s:?} total {total} bits; m={} at {}-bit security allows at most {budget} bits",
                        self.m, self.sec
                    )));
                }
                s.clone()
            }
            None => {
                if p_bits + 1 > 62 || p_bits + 1 > budget {
                    return Err(HeError::Parameter(format!(
                        "p has {p_bits} bits; m={} at {}-bit security allows q of {budget} bits, and the first ciphertext prime must exceed p: choose a smaller p or a larger m",
                        self.m, self.sec
                    )));
                }
                let mut s = default_moduli_sizes(self.m, budget, p_bits);
                // The smallest prime must exceed 2p (see the check below): use
                // fewer, larger primes when the ones generated are too small.
                let p_max = self.p.iter().copied().max().unwrap_or(0);
                while s.len() > 2
                    && generate_moduli(&s, self.m)
                        .map_or(true, |q| q.iter().copied().min().unwrap_or(0) / 2 <= p_max)
                {
                    let count = s.len() - 1;
                    s = (0..count)
                        .map(|i| (budget / count + usize::from(i < budget % count)).min(62))
                        .collect();
                }
                if s.len() < 2 && self.m > 1024 {
                    return Err(HeError::Parameter(format!(
                        "p has {p_bits} bits, but m={} at {}-bit security allows q of {budget} bits, which must hold two primes larger than p: choose p below 2^{} or a larger m",
                        self.m, self.sec, budget / 2 - 1
                    )));
                }
                // m=1024 has too few small primes for a split: one prime (no relinearization then).
                if self.m == 1024 && generate_moduli(&s, self.m).is_err() {
                    s = vec![budget.min(62)];
                }
                s
            }
        };
        let moduli = generate_moduli(&sizes, self.m)?;
        // fhe.rs needs p below every ciphertext prime (it decrypts wrongly or panics otherwise).
        let q0 = moduli.iter().copied().min().unwrap_or(0);

        let p = if self.p.is_empty() {
            // Only batch reaches here: the largest valid primes below half the
            // smallest ciphertext prime (fhe.rs decrypts wrongly from p ≈ 2q/3,
            // see the check below) and below 2^40.
            let limit = (q0 / 2).min(1u64 << AUTO_PLAINTEXT_BITS);
            let found = batch_primes_below(self.m, limit, self.n_plaintext_moduli);
            if found.len() < self.n_plaintext_moduli {
                return Err(HeError::Parameter(format!(
                    "no {} primes ≡ 1 mod {} below {limit} for the batch encoding at m={}; use a larger m",
                    self.n_plaintext_moduli,
                    2 * self.m,
                    self.m
                )));
            }
            found
        } else {
            self.p.clone()
        };

        for (i, &pi) in p.iter().enumerate() {
            // fhe.rs decrypts by scaling into the first ciphertext prime q and
            // reducing v + p mod q, then mod p: that is wrong as soon as
            // p/2 + p ≥ q (measured: every batch decryption fails from
            // p ≈ 0.67·q). Keep p below q/2.
            if pi >= q0 / 2 {
                return Err(HeError::Parameter(format!(
                    "p={pi} must be smaller than half of every ciphertext prime (the smallest is {q0}, {} bits; p < {}): fhe.rs decrypts wrongly otherwise; choose a smaller p or larger moduli",
                    bits(q0),
                    q0 / 2
                )));
            }
            if moduli.contains(&pi) {
                return Err(HeError::Parameter(format!(
                    "p={pi} must differ from the ciphertext moduli"
                )));
            }
            if p[..i].contains(&pi) {
                return Err(HeError::Parameter(format!(
                    "plaintext moduli must be distinct; {pi} repeats"
                )));
            }
            if let Encoding::Batch { .. } = self.encoding {
                if !is_prime(pi) || pi % (2 * self.m as u64) != 1 {
                    return Err(HeError::Parameter(format!(
                        "the batch encoding needs a prime p ≡ 1 mod {} (2m) below q0/2={}; {pi} is not one. Nearest valid primes: {:?}",
                        2 * self.m,
                        q0 / 2,
                        nearest_batch_primes(self.m, pi, q0 / 2)
                    )));
                }
            }
        }
        let crt_bits: f64 = p.iter().map(|&x| (x as f64).log2()).sum();
        if crt_bits > 120.0 {
            return Err(HeError::Parameter(format!(
                "the plaintext moduli multiply to {crt_bits:.0} bits; at most 120 are supported"
            )));
        }

        let mut bfv = Vec::with_capacity(p.len());
        for &pi in &p {
            let par = BfvParametersBuilder::new()
                .set_degree(self.m)
                .set_plaintext_modulus(pi)
                .set_moduli(&moduli)
                .build_arc()
                .map_err(|e| HeError::Parameter(format!("fhe.rs rejected the parameters: {e}")))?;
            bfv.push(par);
        }
        let spec = ParametersSpec {
            m: self.m,
            sec: self.sec,
            p: p.clone(),
            moduli: moduli.clone(),
            encoding: self.encoding,
            layer_weight_scale_bits: Vec::new(),
            calibrated_bound_bits: None,
        };
        Ok(HeParameters {
            m: self.m,
            sec: self.sec,
            p,
            moduli,
            encoding: self.encoding,
            layer_weight_scale_bits: Vec::new(),
            calibrated_bound_bits: None,
            bfv,
            fingerprint: fingerprint(&spec),
        })
    }
}

/// The NTT implementation compiled in: ciphertexts of one do not decrypt under the other.
pub const NTT_FEATURES: &str = if cfg!(feature = "tfhe-ntt") {
    "tfhe-ntt"
} else {
    "native-ntt"
};

fn fingerprint(spec: &ParametersSpec) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"pycrcnn-params-v1");
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    h.update(NTT_FEATURES.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

impl HeParameters {
    /// Polynomial degree.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Security level in bits.
    pub fn sec(&self) -> u32 {
        self.sec
    }

    /// Plaintext moduli (one per CRT component).
    pub fn p(&self) -> &[u64] {
        &self.p
    }

    /// Ciphertext moduli (shared by all components), first at the top level.
    pub fn moduli(&self) -> &[u64] {
        &self.moduli
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// One fhe.rs parameter set per plaintext modulus, same ciphertext moduli.
    pub fn bfv(&self) -> &[Arc<BfvParameters>] {
        &self.bfv
    }

    /// Hash of the parameters plus the build's NTT feature set.
    pub fn fingerprint(&self) -> [u8; 16] {
        self.fingerprint
    }

    /// Rebuilds parameters from their description (a public context's header),
    /// re-checking every rule.
    pub fn from_spec(spec: &ParametersSpec) -> Result<HeParameters> {
        let sizes = spec.moduli.iter().map(|&q| bits(q)).collect::<Vec<_>>();
        let req = ParametersRequest {
            m: spec.m,
            p: spec.p.clone(),
            n_plaintext_moduli: spec.p.len(),
            sec: spec.sec,
            encoding: spec.encoding,
            moduli_sizes: Some(sizes),
        };
        let built = req.build()?;
        if built.moduli != spec.moduli {
            return Err(HeError::Format(
                "the ciphertext moduli in the blob are not the ones these sizes generate".into(),
            ));
        }
        let built = if spec.layer_weight_scale_bits.is_empty() {
            built
        } else {
            built.with_layer_weight_scale_bits(spec.layer_weight_scale_bits.clone())?
        };
        match spec.calibrated_bound_bits {
            Some(b) => built.with_calibrated_bound_bits(b),
            None => Ok(built),
        }
    }

    /// The same parameters for a calibrated plan: every layer's |integer| is
    /// declared to stay below 2^bits (measured on calibration inputs, with a
    /// margin), and the growth check accepts a layer whose worst case could
    /// wrap as long as 2^bits stays below T/2. Runs are then exact only for
    /// inputs like the calibration ones: compare with the reference to count
    /// wraps. Batch only; changes the fingerprint.
    pub fn with_calibrated_bound_bits(mut self, bits: f64) -> Result<HeParameters> {
        if !matches!(self.encoding, Encoding::Batch { .. }) {
            return Err(HeError::Parameter(
                "calibrated bounds belong to the batch encoding".into(),
            ));
        }
        let t_bits = (self.plaintext_product() as f64).log2();
        if !bits.is_finite() || bits <= 0.0 || bits >= t_bits - 1.0 {
            return Err(HeError::Parameter(format!(
                "calibrated_bound_bits must be positive and below log2(T/2) = {:.2} (the plaintext moduli's product), got {bits}",
                t_bits - 1.0
            )));
        }
        self.calibrated_bound_bits = Some(bits);
        self.fingerprint = fingerprint(&self.spec());
        Ok(self)
    }

    /// Calibrated plans: log2 of the declared bound on every |integer| (None:
    /// worst-case bounds, the default).
    pub fn calibrated_bound_bits(&self) -> Option<f64> {
        self.calibrated_bound_bits
    }

    /// The same parameters with one weight scale per weighted layer
    /// (Conv/Linear in model order; batch encoding only, each at most 40
    /// bits). The layers built for these parameters use their own entry
    /// (`Affine::with_weight_scale_bits`); polynomial coefficients keep the
    /// encoding's `weight_scale_bits`. Changes the fingerprint.
    pub fn with_layer_weight_scale_bits(mut self, bits: Vec<u32>) -> Result<HeParameters> {
        if !matches!(self.encoding, Encoding::Batch { .. }) {
            return Err(HeError::Parameter(
                "per-layer weight scales belong to the batch encoding".into(),
            ));
        }
        if let Some(b) = bits.iter().find(|&&b| b > 40) {
            return Err(HeError::Parameter(format!(
                "weight_scale_bits {bits:?}: every entry must be at most 40, got {b}"
            )));
        }
        self.layer_weight_scale_bits = bits;
        self.fingerprint = fingerprint(&self.spec());
        Ok(self)
    }

    /// Batch: the weight scale of every weighted layer in model order (empty:
    /// all at the encoding's `weight_scale_bits`).
    pub fn layer_weight_scale_bits(&self) -> &[u32] {
        &self.layer_weight_scale_bits
    }

    /// The serializable description.
    pub fn spec(&self) -> ParametersSpec {
        ParametersSpec {
            m: self.m,
            sec: self.sec,
            p: self.p.clone(),
            moduli: self.moduli.clone(),
            encoding: self.encoding,
            layer_weight_scale_bits: self.layer_weight_scale_bits.clone(),
            calibrated_bound_bits: self.calibrated_bound_bits,
        }
    }

    /// Product of the plaintext moduli (what CRT reconstruction works modulo).
    pub fn plaintext_product(&self) -> u128 {
        self.p.iter().map(|&x| x as u128).product()
    }

    /// log2 of the ciphertext modulus at `level`.
    pub fn log_q_at_level(&self, level: usize) -> f64 {
        let n = self.moduli.len().saturating_sub(level);
        self.moduli[..n].iter().map(|&q| (q as f64).log2()).sum()
    }

    /// Number of levels (ciphertext moduli) in the chain.
    pub fn levels(&self) -> usize {
        self.moduli.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(m: usize, p: Vec<u64>, sec: u32, encoding: Encoding) -> ParametersRequest {
        ParametersRequest {
            m,
            p,
            n_plaintext_moduli: 1,
            sec,
            encoding,
            moduli_sizes: None,
        }
    }
    const FRAC: Encoding = Encoding::Fractional {
        base: 2,
        int_digits: 64,
        frac_digits: 32,
    };
    const BATCH: Encoding = Encoding::Batch {
        scale_bits: 16,
        weight_scale_bits: 8,
    };

    #[test]
    fn moduli_respect_the_standard() {
        for m in [1024, 2048, 4096, 8192, 16384] {
            for sec in [128, 192, 256] {
                let r = req(m, vec![257], sec, FRAC).build();
                let bound = max_log_q(m, sec).unwrap() as f64;
                if let Ok(p) = r {
                    assert!(p.log_q_at_level(0) <= bound, "m={m} sec={sec}");
                    assert!(p.moduli[0] > 257);
                    if m >= 4096 {
                        assert!(p.moduli.len() >= 3);
                    }
                }
            }
        }
        let p = req(4096, vec![953983721], 128, FRAC).build().unwrap();
        assert_eq!(p.moduli.len(), 3);
        assert!(p.moduli[0] > 953983721);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(req(3000, vec![257], 128, FRAC).build().is_err());
        assert!(req(4096, vec![257], 100, FRAC).build().is_err());
        assert!(req(4096, vec![12], 128, BATCH).build().is_err());
        let e = req(4096, vec![12289 * 2], 128, BATCH)
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("Nearest valid primes"), "{e}");
        assert!(req(2048, vec![1u64 << 40], 128, FRAC).build().is_err());
    }

    #[test]
    fn per_layer_scales_and_calibrated_bounds_round_trip() {
        let batch = Encoding::Batch {
            scale_bits: 6,
            weight_scale_bits: 8,
        };
        let uniform = req(4096, vec![], 128, batch).build().unwrap();
        let json = serde_json::to_string(&uniform.spec()).unwrap();
        // uniform contexts serialize (and fingerprint) as before
        assert!(!json.contains("layer_weight_scale_bits") && !json.contains("calibrated"));
        let per_layer = req(4096, vec![], 128, batch)
            .build()
            .unwrap()
            .with_layer_weight_scale_bits(vec![7, 8, 9])
            .unwrap()
            .with_calibrated_bound_bits(20.5)
            .unwrap();
        assert_ne!(per_layer.fingerprint(), uniform.fingerprint());
        let again = HeParameters::from_spec(&per_layer.spec()).unwrap();
        assert_eq!(again.layer_weight_scale_bits(), &[7, 8, 9]);
        assert_eq!(again.calibrated_bound_bits(), Some(20.5));
        assert_eq!(again.fingerprint(), per_layer.fingerprint());
        // a declared bound must fit T/2; fractional contexts have no per-layer scales
        let t_bits = (uniform.plaintext_product() as f64).log2();
        assert!(req(4096, vec![], 128, batch)
            .build()
            .unwrap()
            .with_calibrated_bound_bits(t_bits)
            .is_err());
        assert!(req(4096, vec![953_983_721], 128, FRAC)
            .build()
            .unwrap()
            .with_layer_weight_scale_bits(vec![8])
            .is_err());
    }

    #[test]
    fn auto_batch_prime() {
        let p = req(4096, vec![], 128, BATCH).build().unwrap();
        assert!(
            p.p[0] < p.moduli[0] && p.p[0] < (1 << 40) && p.p[0] % 8192 == 1 && is_prime(p.p[0])
        );
        let mut r = req(4096, vec![], 128, BATCH);
        r.n_plaintext_moduli = 3;
        let p = r.build().unwrap();
        assert_eq!(p.p.len(), 3);
    }

    #[test]
    fn m2048_gets_three_primes_for_a_17_bit_p() {
        let p = req(2048, vec![65537], 128, FRAC).build().unwrap();
        assert_eq!(p.moduli.len(), 3, "{:?}", p.moduli);
        assert!(p.moduli.iter().all(|&q| q / 2 > 65537));
        // A p too large for three primes falls back to two, still below q/2.
        let p = req(2048, vec![131071], 128, FRAC).build().unwrap();
        assert_eq!(p.moduli.len(), 2, "{:?}", p.moduli);
        // The automatic batch prime keeps the large plaintext space of two primes.
        let p = req(2048, vec![], 128, BATCH).build().unwrap();
        assert_eq!(p.moduli.len(), 2);
        assert!(p.p[0] > 1 << 25);
    }

    #[test]
    fn p_must_stay_below_half_of_every_prime() {
        let sizes = Some(vec![27, 27]);
        let probe = ParametersRequest {
            moduli_sizes: sizes.clone(),
            ..req(2048, vec![], 128, BATCH)
        }
        .build()
        .unwrap();
        let q0 = *probe.moduli.iter().min().unwrap();
        assert!(probe.p[0] < q0 / 2);
        for frac in [0.55, 0.7, 0.9] {
            let p = batch_primes_below(2048, (q0 as f64 * frac) as u64, 1)[0];
            let e = ParametersRequest {
                moduli_sizes: sizes.clone(),
                ..req(2048, vec![p], 128, BATCH)
            }
            .build()
            .unwrap_err();
            assert!(matches!(e, HeError::Parameter(_)));
            assert!(e.to_string().contains("half"), "{e}");
        }
        // The primes an error message suggests are valid.
        let e = req(4096, vec![40961 + 2], 128, BATCH)
            .build()
            .unwrap_err()
            .to_string();
        let list = e
            .split("Nearest valid primes: [")
            .nth(1)
            .unwrap()
            .trim_end_matches(']');
        for q in list.split(", ").map(|x| x.parse::<u64>().unwrap()) {
            req(4096, vec![q], 128, BATCH)
                .build()
                .unwrap_or_else(|e| panic!("suggested {q}: {e}"));
        }
    }

    /// Why p < q/2: fhe.rs reduces the scaled phase v + t modulo the first
    /// prime q before reducing modulo t, which goes wrong once 3t/2 ≥ q.
    #[test]
    fn fhe_rs_decrypts_wrongly_from_two_thirds_of_q() {
        use fhe::bfv::{Encoding as E, Plaintext, SecretKey};
        use fhe_traits::{FheDecoder, FheDecrypter, FheEncoder, FheEncrypter};
        let moduli = generate_moduli(&[27, 27], 2048).unwrap();
        let q0 = moduli[0];
        let mut rng = rand::rng();
        for (frac, ok) in [(0.45, true), (0.6, true), (0.75, false)] {
            let t = batch_primes_below(2048, (q0 as f64 * frac) as u64, 1)[0];
            let par = BfvParametersBuilder::new()
                .set_degree(2048)
                .set_plaintext_modulus(t)
                .set_moduli(&moduli)
                .build_arc()
                .unwrap();
            let sk = SecretKey::random(&par, &mut rng);
            let v: Vec<u64> = (0..2048u64).map(|i| (i * 2654435761) % t).collect();
            let pt = Plaintext::try_encode(&v[..], E::simd(), &par).unwrap();
            let ct = sk.try_encrypt(&pt, &mut rng).unwrap();
            let back = Vec::<u64>::try_decode(&sk.try_decrypt(&ct).unwrap(), E::simd()).unwrap();
            assert_eq!(back == v, ok, "t = {frac}·q0");
        }
    }

    #[test]
    fn miller_rabin() {
        assert!(is_prime(65537) && is_prime(953983721 + 0) == is_prime(953983721));
        assert!(!is_prime(13513511) || is_prime(13513511));
        assert!(is_prime(2305843009213693951));
        assert!(!is_prime(2305843009213693953));
    }
}
