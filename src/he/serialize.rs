//! The byte formats of ciphertext tensors, public contexts and secret keys.
//!
//! Frame: magic `PCRN` | format version (u16) | kind (u8) | parameter
//! fingerprint (16) | key id (16) | payload length (u64) | payload | SHA-256 of
//! everything before it (32). fhe.rs's own protobuf parser accepts almost any
//! bit flip, so the checksum is what detects corruption; the fingerprint and
//! key id catch blobs made under other parameters or another key.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use fhe::bfv::{Ciphertext, EvaluationKey, PublicKey, RelinearizationKey, SecretKey};
use fhe_traits::{DeserializeParametrized, Serialize as FheSerialize};
use ndarray::{ArrayD, IxDyn};
use sha2::{Digest, Sha256};

use super::context::{HeContext, Keys};
use super::error::{HeError, Result};
use super::galois::RotationKeys;
use super::growth::Growth;
use super::params::{HeParameters, ParametersSpec};
use super::tensor::{CipherTensor, Element};

const MAGIC: &[u8; 4] = b"PCRN";
const VERSION: u16 = 1;
const HEADER: usize = 4 + 2 + 1 + 16 + 16 + 8;
const CHECKSUM: usize = 32;
/// Largest tensor we accept from bytes (elements).
const MAX_ELEMENTS: u64 = 1 << 24;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A CipherTensor (a single ciphertext is a 0-d tensor).
    Tensor = 1,
    /// Parameters + public and relinearization keys: what a server gets.
    PublicContext = 2,
    /// Everything including the secret key: stays with the client.
    SecretKey = 3,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tensor => "a ciphertext tensor",
            Kind::PublicContext => "a public context",
            Kind::SecretKey => "a secret key (it must never leave the client)",
        }
    }
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Tensor),
            2 => Some(Kind::PublicContext),
            3 => Some(Kind::SecretKey),
            _ => None,
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, x: u8) {
        self.0.push(x)
    }
    fn u32(&mut self, x: u32) {
        self.0.extend_from_slice(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes())
    }
    fn f64(&mut self, x: f64) {
        self.0.extend_from_slice(&x.to_le_bytes())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(HeError::Format("the blob is truncated".into()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?
                .try_into()
                .map_err(|_| HeError::Format("bad u32".into()))?,
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?
                .try_into()
                .map_err(|_| HeError::Format("bad u64".into()))?,
        ))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(
            self.take(8)?
                .try_into()
                .map_err(|_| HeError::Format("bad f64".into()))?,
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(HeError::Format("the blob is truncated".into()));
        }
        self.take(n as usize)
    }
    fn done(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(HeError::Format("trailing bytes after the payload".into()));
        }
        Ok(())
    }
}

fn frame(kind: Kind, fingerprint: &[u8; 16], key_id: &[u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(key_id);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// A checked frame: kind, fingerprint, key id and payload.
pub struct Frame<'a> {
    /// What it holds.
    pub kind: Kind,
    /// Parameter fingerprint.
    pub fingerprint: [u8; 16],
    /// Key id.
    pub key_id: [u8; 16],
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Checks magic, version, length and checksum before anything is parsed.
pub fn open_frame(data: &[u8]) -> Result<Frame<'_>> {
    if data.len() < HEADER + CHECKSUM {
        return Err(HeError::Format(format!(
            "{} bytes is too short to be a pycrcnn blob",
            data.len()
        )));
    }
    if &data[..4] != MAGIC {
        return Err(HeError::Format("not a pycrcnn blob (bad magic)".into()));
    }
    let version = u16::from_le_bytes([data[4], data[5]]);
    if version != VERSION {
        return Err(HeError::Format(format!(
            "format version {version} is not supported (this build reads {VERSION})"
        )));
    }
    let len = u64::from_le_bytes(
        data[39..47]
            .try_into()
            .map_err(|_| HeError::Format("bad header".into()))?,
    );
    if len != (data.len() - HEADER - CHECKSUM) as u64 {
        return Err(HeError::Format(
            "the blob is truncated or has extra bytes".into(),
        ));
    }
    let body = &data[..data.len() - CHECKSUM];
    if Sha256::digest(body).as_slice() != &data[data.len() - CHECKSUM..] {
        return Err(HeError::Format(
            "checksum mismatch: the blob is corrupted".into(),
        ));
    }
    let kind = Kind::from_u8(data[6])
        .ok_or_else(|| HeError::Format(format!("unknown blob kind {}", data[6])))?;
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(&data[7..23]);
    let mut key_id = [0u8; 16];
    key_id.copy_from_slice(&data[23..39]);
    Ok(Frame {
        kind,
        fingerprint,
        key_id,
        payload: &data[HEADER..data.len() - CHECKSUM],
    })
}

fn expect(frame: &Frame, kind: Kind) -> Result<()> {
    if frame.kind != kind {
        return Err(HeError::Format(format!(
            "expected {} but the blob holds {}",
            kind.name(),
            frame.kind.name()
        )));
    }
    Ok(())
}

/// Runs fhe.rs's parser, turning its panics on hostile input into errors.
fn guarded<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, fhe::Error>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(HeError::Format(format!("invalid {what}: {e}"))),
        Err(_) => Err(HeError::Format(format!("invalid {what}"))),
    }
}

/// Serializes a tensor.
pub fn tensor_to_bytes(t: &CipherTensor) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    match t.batch() {
        Some(n) => {
            w.u8(1);
            w.u64(n as u64)
        }
        None => w.u8(0),
    }
    w.f64(t.scale());
    match &t.growth() {
        Growth::Integer(b) => {
            w.u8(0);
            w.f64(*b)
        }
        Growth::Poly(v) => {
            w.u8(1);
            let nz: Vec<(usize, f64)> = v
                .iter()
                .enumerate()
                .filter(|(_, &x)| x != 0.0)
                .map(|(i, &x)| (i, x))
                .collect();
            w.u32(nz.len() as u32);
            for (i, x) in nz {
                w.u32(i as u32);
                w.f64(x);
            }
        }
    }
    w.u32(t.data().ndim() as u32);
    for &d in t.data().shape() {
        w.u64(d as u64);
    }
    w.u32(t.params().p().len() as u32);
    for e in t.data().iter() {
        for ct in e {
            w.bytes(&ct.to_bytes());
        }
    }
    frame(Kind::Tensor, &t.params().fingerprint(), &t.key_id(), &w.0)
}

/// Parses a tensor made under `ctx`'s parameters and key.
pub fn tensor_from_bytes(data: &[u8], ctx: &HeContext) -> Result<CipherTensor> {
    let f = open_frame(data)?;
    expect(&f, Kind::Tensor)?;
    let params = ctx.params();
    if f.fingerprint != params.fingerprint() {
        return Err(HeError::Format(
            "the ciphertext was made under other encryption parameters than this context's".into(),
        ));
    }
    let key_id = ctx.key_id()?;
    if f.key_id != key_id {
        return Err(HeError::Format(
            "the ciphertext was encrypted under another key than this context's".into(),
        ));
    }
    let mut r = Reader {
        buf: f.payload,
        pos: 0,
    };
    let batch = match r.u8()? {
        0 => None,
        1 => {
            let n = r.u64()?;
            if n == 0 || n > params.m() as u64 {
                return Err(HeError::Format(format!(
                    "batch size {n} is out of range 1..={}",
                    params.m()
                )));
            }
            Some(n as usize)
        }
        x => return Err(HeError::Format(format!("bad batch flag {x}"))),
    };
    let scale = r.f64()?;
    if !(scale.is_finite() && scale >= 1.0) {
        return Err(HeError::Format("bad scale".into()));
    }
    let growth = match r.u8()? {
        0 => Growth::Integer(r.f64()?),
        1 => {
            let n = r.u32()? as usize;
            if n > params.m() {
                return Err(HeError::Format("bad growth bound".into()));
            }
            let mut v = vec![0.0; params.m()];
            for _ in 0..n {
                let i = r.u32()? as usize;
                let x = r.f64()?;
                if i >= params.m() || !x.is_finite() {
                    return Err(HeError::Format("bad growth bound".into()));
                }
                v[i] = x;
            }
            Growth::Poly(v)
        }
        x => return Err(HeError::Format(format!("bad growth kind {x}"))),
    };
    let batch_enc = matches!(params.encoding(), super::params::Encoding::Batch { .. });
    if batch_enc != batch.is_some() || batch_enc != matches!(growth, Growth::Integer(_)) {
        return Err(HeError::Format(
            "the tensor's encoding does not match the context's".into(),
        ));
    }
    let ndim = r.u32()? as usize;
    if ndim > 8 {
        return Err(HeError::Format(format!("{ndim} dimensions is too many")));
    }
    let mut shape = Vec::with_capacity(ndim);
    let mut count: u64 = 1;
    for _ in 0..ndim {
        let d = r.u64()?;
        count = count.saturating_mul(d);
        shape.push(d as usize);
    }
    if count > MAX_ELEMENTS {
        return Err(HeError::Format(format!(
            "{count} elements is more than the {MAX_ELEMENTS} allowed"
        )));
    }
    let ncomp = r.u32()? as usize;
    if ncomp != params.p().len() {
        return Err(HeError::Format(
            "wrong number of plaintext-modulus components".into(),
        ));
    }
    // Each ciphertext takes at least its 8-byte length: refuse before allocating.
    if (count as usize).saturating_mul(ncomp).saturating_mul(8) > f.payload.len() {
        return Err(HeError::Format("the blob is truncated".into()));
    }
    let mut elems: Vec<Element> = Vec::with_capacity(count as usize);
    let mut level = None;
    for _ in 0..count {
        let mut e = Vec::with_capacity(ncomp);
        for k in 0..ncomp {
            let b = r.bytes()?;
            let par = &params.bfv()[k];
            let ct = guarded("ciphertext", || Ciphertext::from_bytes(b, par))?;
            // Three parts: the unrelinearized output of a square.
            if !(2..=3).contains(&ct.len()) {
                return Err(HeError::Format(
                    "a ciphertext must have two or three parts".into(),
                ));
            }
            let l = par
                .level_of_context(ct[0].ctx())
                .map_err(|e| HeError::Format(e.to_string()))?;
            if *level.get_or_insert(l) != l {
                return Err(HeError::Format("ciphertexts at different levels".into()));
            }
            e.push(ct);
        }
        elems.push(e);
    }
    r.done()?;
    let data =
        ArrayD::from_shape_vec(IxDyn(&shape), elems).map_err(|e| HeError::Format(e.to_string()))?;
    Ok(CipherTensor::from_parts(
        data,
        batch,
        scale,
        growth,
        params.clone(),
        key_id,
    ))
}

fn write_spec(w: &mut Writer, params: &HeParameters) {
    w.bytes(&serde_json::to_vec(&params.spec()).unwrap_or_default());
}

fn read_params(r: &mut Reader, fingerprint: &[u8; 16]) -> Result<Arc<HeParameters>> {
    let spec: ParametersSpec = serde_json::from_slice(r.bytes()?)
        .map_err(|e| HeError::Format(format!("bad parameter description: {e}")))?;
    let params = HeParameters::from_spec(&spec)
        .map_err(|e| HeError::Format(format!("invalid parameters in the blob: {e}")))?;
    if &params.fingerprint() != fingerprint {
        return Err(HeError::Format(
            "parameter fingerprint mismatch (another build or NTT feature set?)".into(),
        ));
    }
    Ok(Arc::new(params))
}

fn write_public_keys(w: &mut Writer, keys: &Keys) {
    for ((pk, rks), rot) in keys.public.iter().zip(&keys.relin).zip(&keys.rotations) {
        w.bytes(&pk.to_bytes());
        w.u32(rks.len() as u32);
        for rk in rks {
            w.bytes(&rk.to_bytes());
        }
        // Rotation keys: per level, the steps held and one evaluation key.
        w.u32(rot.levels.len() as u32);
        for l in &rot.levels {
            w.u32(l.level as u32);
            w.u32(l.steps.len() as u32);
            for &s in &l.steps {
                w.u32(s as u32);
            }
            w.bytes(&l.key.to_bytes());
        }
    }
}

fn read_rotation_keys(
    r: &mut Reader,
    params: &HeParameters,
    par: &Arc<fhe::bfv::BfvParameters>,
) -> Result<RotationKeys> {
    let n = r.u32()? as usize;
    // At most two keys per level: plain giant steps and special-prime baby steps (galois.rs).
    if n > 2 * params.levels() {
        return Err(HeError::Format("too many rotation keys".into()));
    }
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        let level = r.u32()? as usize;
        let count = r.u32()? as usize;
        if count == 0 || count > params.m() / 2 {
            return Err(HeError::Format(format!(
                "a rotation key with {count} steps"
            )));
        }
        let steps = (0..count)
            .map(|_| r.u32().map(|s| s as usize))
            .collect::<Result<Vec<_>>>()?;
        let b = r.bytes()?;
        let key = guarded("rotation key", || EvaluationKey::from_bytes(b, par))?;
        parts.push((level, steps, key));
    }
    RotationKeys::from_parts(parts, par)
}

type PublicKeys = (
    Vec<PublicKey>,
    Vec<Vec<RelinearizationKey>>,
    Vec<RotationKeys>,
);

fn read_public_keys(r: &mut Reader, params: &HeParameters) -> Result<PublicKeys> {
    let mut pks = Vec::new();
    let mut rks = Vec::new();
    let mut rots = Vec::new();
    for par in params.bfv() {
        let b = r.bytes()?;
        pks.push(guarded("public key", || PublicKey::from_bytes(b, par))?);
        let n = r.u32()? as usize;
        if n > params.levels() {
            return Err(HeError::Format("too many relinearization keys".into()));
        }
        let mut per_level = Vec::with_capacity(n);
        for _ in 0..n {
            let b = r.bytes()?;
            per_level.push(guarded("relinearization key", || {
                RelinearizationKey::from_bytes(b, par)
            })?);
        }
        rks.push(per_level);
        rots.push(read_rotation_keys(r, params, par)?);
    }
    Ok((pks, rks, rots))
}

/// The public context: parameters, public and relinearization keys.
pub fn public_context_to_bytes(ctx: &HeContext) -> Result<Vec<u8>> {
    let keys = ctx.keys()?;
    let mut w = Writer(Vec::new());
    write_spec(&mut w, &ctx.params());
    write_public_keys(&mut w, keys);
    Ok(frame(
        Kind::PublicContext,
        &ctx.params().fingerprint(),
        &keys.key_id,
        &w.0,
    ))
}

/// Everything, the secret key included (for the client to save).
pub fn secret_key_to_bytes(ctx: &HeContext) -> Result<Vec<u8>> {
    let keys = ctx.keys()?;
    let sks = ctx.secret()?;
    let mut w = Writer(Vec::new());
    write_spec(&mut w, &ctx.params());
    write_public_keys(&mut w, keys);
    for sk in sks {
        w.bytes(&sk.to_bytes());
    }
    Ok(frame(
        Kind::SecretKey,
        &ctx.params().fingerprint(),
        &keys.key_id,
        &w.0,
    ))
}

/// Loads a public context, or a secret key when `allow_secret` (the client's own file).
pub fn context_from_bytes(data: &[u8], allow_secret: bool) -> Result<HeContext> {
    let f = open_frame(data)?;
    match (f.kind, allow_secret) {
        (Kind::PublicContext, _) | (Kind::SecretKey, true) => {}
        (Kind::SecretKey, false) => {
            return Err(HeError::Format(
                "this blob holds a secret key; a server only accepts a public context (ctx.public_context())".into(),
            ))
        }
        (k, _) => return Err(HeError::Format(format!("expected a public context but the blob holds {}", k.name()))),
    }
    let mut r = Reader {
        buf: f.payload,
        pos: 0,
    };
    let params = read_params(&mut r, &f.fingerprint)?;
    let (pks, rks, rots) = read_public_keys(&mut r, &params)?;
    let secret = if f.kind == Kind::SecretKey {
        let mut sks = Vec::new();
        for par in params.bfv() {
            let b = r.bytes()?;
            sks.push(guarded("secret key", || SecretKey::from_bytes(b, par))?);
        }
        Some(sks)
    } else {
        None
    };
    r.done()?;
    let mut keys = Keys::new(secret, pks, rks, params.levels())
        .map_err(|e| HeError::Format(format!("invalid relinearization keys: {e}")))?;
    if rots.windows(2).any(|w| w[0].held() != w[1].held()) {
        return Err(HeError::Format(
            "the plaintext moduli hold different rotation keys".into(),
        ));
    }
    keys.rotations = rots;
    if keys.key_id != f.key_id {
        return Err(HeError::Format(
            "the key id does not match the keys in the blob".into(),
        ));
    }
    Ok(HeContext::with_keys(params, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::context::tests::{make, make_n, random, BATCH, FRAC};
    use rand::Rng;

    fn is_format<T>(r: Result<T>) -> bool {
        matches!(r, Err(HeError::Format(ref m)) if !m.is_empty())
    }

    /// Re-frames a payload with a valid checksum: what a forger (not a bit flip) produces.
    fn reframe(blob: &[u8], payload: &[u8]) -> Vec<u8> {
        let f = open_frame(blob).unwrap();
        frame(f.kind, &f.fingerprint, &f.key_id, payload)
    }

    #[test]
    fn round_trips() {
        let ctx = make(2048, vec![65537], FRAC, None);
        let x = random(&[2, 3], -5.0, 5.0);
        let t = ctx.encrypt(x.view()).unwrap();
        let back = tensor_from_bytes(&tensor_to_bytes(&t), &ctx).unwrap();
        assert_eq!(back.shape(), t.shape());
        assert_eq!(back.growth(), t.growth());
        assert_eq!(ctx.decrypt(&back).unwrap(), ctx.decrypt(&t).unwrap());
        // Secret key blob: a new context that decrypts the old ciphertexts.
        let sk = secret_key_to_bytes(&ctx).unwrap();
        let ctx2 = context_from_bytes(&sk, true).unwrap();
        assert!(ctx2.has_secret_key());
        let again = tensor_from_bytes(&tensor_to_bytes(&t), &ctx2).unwrap();
        assert_eq!(ctx2.decrypt(&again).unwrap(), ctx.decrypt(&t).unwrap());
        // Batch with CRT, after switching to the last level.
        let ctx = make_n(4096, vec![], 2, BATCH, None);
        let x = random(&[3, 2], -5.0, 5.0);
        // (Level 1: a single remaining prime leaves no budget at these parameters.)
        let t = ctx.encrypt(x.view()).unwrap().switch_to_level(1).unwrap();
        let blob = tensor_to_bytes(&t);
        let back = tensor_from_bytes(&blob, &ctx).unwrap();
        assert_eq!(back.level().unwrap(), 1);
        assert_eq!(ctx.decrypt(&back).unwrap(), ctx.decrypt(&t).unwrap());
        let pc = public_context_to_bytes(&ctx).unwrap();
        let server = context_from_bytes(&pc, false).unwrap();
        assert!(tensor_from_bytes(&blob, &server).is_ok());
    }

    #[test]
    fn every_bit_flip_and_truncation_is_a_format_error() {
        let ctx = make(1024, vec![257], FRAC, None);
        let t = ctx.encrypt(random(&[1], -1.0, 1.0).view()).unwrap();
        let blob = tensor_to_bytes(&t);
        assert!(blob.len() < 8000, "{}", blob.len());
        let mut bad = blob.clone();
        for i in 0..blob.len() * 8 {
            bad[i / 8] ^= 1 << (i % 8);
            assert!(is_format(tensor_from_bytes(&bad, &ctx)), "bit {i}");
            bad[i / 8] ^= 1 << (i % 8);
        }
        for n in 0..blob.len() {
            assert!(
                is_format(tensor_from_bytes(&blob[..n], &ctx)),
                "truncated to {n}"
            );
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(is_format(tensor_from_bytes(&longer, &ctx)));
        assert!(tensor_from_bytes(&blob, &ctx).is_ok());
    }

    #[test]
    fn public_context_and_secret_key_flips_sampled() {
        let ctx = make(1024, vec![257], FRAC, None);
        let pc = public_context_to_bytes(&ctx).unwrap();
        let sk = secret_key_to_bytes(&ctx).unwrap();
        let mut rng = rand::rng();
        for blob in [&pc, &sk] {
            let mut bad = blob.clone();
            for _ in 0..500 {
                let i = rng.random_range(0..blob.len() * 8);
                bad[i / 8] ^= 1 << (i % 8);
                assert!(is_format(context_from_bytes(&bad, true)), "bit {i}");
                bad[i / 8] ^= 1 << (i % 8);
            }
            for _ in 0..200 {
                let n = rng.random_range(0..blob.len());
                assert!(is_format(context_from_bytes(&blob[..n], true)));
            }
        }
    }

    #[test]
    fn forged_payloads_never_panic() {
        // A valid checksum over a corrupted payload reaches the parsers: every
        // outcome must be a value, never a panic (Ok is allowed where a change
        // is still well-formed, e.g. inside ciphertext coefficients).
        let ctx = make(1024, vec![257], FRAC, None);
        let t = ctx.encrypt(random(&[2], -1.0, 1.0).view()).unwrap();
        let blob = tensor_to_bytes(&t);
        let payload = open_frame(&blob).unwrap().payload.to_vec();
        let mut rng = rand::rng();
        let mut errors = 0;
        let mut p = payload.clone();
        // Every bit of the metadata and the first ciphertext's framing, then a sample.
        let positions: Vec<usize> = (0..120 * 8)
            .chain((0..3000).map(|_| rng.random_range(0..payload.len() * 8)))
            .collect();
        for &i in &positions {
            p[i / 8] ^= 1 << (i % 8);
            match tensor_from_bytes(&reframe(&blob, &p), &ctx) {
                Ok(_) => {}
                Err(HeError::Format(_)) => errors += 1,
                Err(e) => panic!("bit {i}: not a format error: {e:?}"),
            }
            p[i / 8] ^= 1 << (i % 8);
        }
        assert!(errors > 100);
        // Random bytes, with and without a valid frame.
        for len in [0usize, 1, 10, 100, 1000, 5000] {
            let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            assert!(is_format(tensor_from_bytes(&junk, &ctx)));
            assert!(is_format(context_from_bytes(&junk, true)));
            assert!(is_format(tensor_from_bytes(&reframe(&blob, &junk), &ctx)));
            let pc = public_context_to_bytes(&ctx).unwrap();
            assert!(is_format(context_from_bytes(&reframe(&pc, &junk), true)));
        }
        // Huge shapes and counts are refused before allocating.
        let mut w = Writer(Vec::new());
        w.u8(0);
        w.f64(1.0);
        w.u8(1);
        w.u32(0);
        w.u32(3);
        for d in [1u64 << 40, 1 << 40, 0] {
            w.u64(d);
        }
        w.u32(1);
        assert!(tensor_from_bytes(&reframe(&blob, &w.0), &ctx).is_err());
        let mut w = Writer(Vec::new());
        w.u8(0);
        w.f64(1.0);
        w.u8(1);
        w.u32(0);
        w.u32(1);
        w.u64(1 << 20);
        w.u32(1);
        assert!(is_format(tensor_from_bytes(&reframe(&blob, &w.0), &ctx)));
    }

    #[test]
    fn foreign_blobs_are_refused() {
        let a = make(2048, vec![65537], FRAC, None);
        let b = make(2048, vec![65537], FRAC, None);
        let c = make(2048, vec![40961], FRAC, None);
        let x = random(&[1, 2], -1.0, 1.0);
        let blob = tensor_to_bytes(&a.encrypt(x.view()).unwrap());
        match tensor_from_bytes(&blob, &b) {
            Err(HeError::Format(m)) => assert!(m.contains("another key"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        match tensor_from_bytes(&blob, &c) {
            Err(HeError::Format(m)) => assert!(m.contains("parameters"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let pc = public_context_to_bytes(&a).unwrap();
        let sk = secret_key_to_bytes(&a).unwrap();
        assert!(is_format(tensor_from_bytes(&pc, &a)));
        assert!(is_format(tensor_from_bytes(&sk, &a)));
        assert!(is_format(context_from_bytes(&blob, false)));
        assert!(is_format(context_from_bytes(&blob, true)));
        match context_from_bytes(&sk, false) {
            Err(HeError::Format(m)) => assert!(m.contains("secret key"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A public context whose key id was replaced by another's (with a valid checksum).
        let f = open_frame(&pc).unwrap();
        let other = b.key_id().unwrap();
        let forged = frame(Kind::PublicContext, &f.fingerprint, &other, f.payload);
        assert!(is_format(context_from_bytes(&forged, false)));
        // A context without keys cannot load tensors or export itself.
        let keyless =
            HeContext::new(crate::he::params::HeParameters::from_spec(&a.params().spec()).unwrap());
        assert!(tensor_from_bytes(&blob, &keyless).is_err());
        assert!(public_context_to_bytes(&keyless).is_err());
    }
}
