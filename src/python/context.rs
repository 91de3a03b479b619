//! `pycrcnn._engine.Context`: parameters and keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use numpy::{IntoPyArray, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyWeakrefReference};

use super::errors::{to_py, HEError, ParameterError};
use super::packed::PyPackedModel;
use super::pool::run;
use super::tensor::{tensor_arg, wrap_tensor};
use crate::he::galois::{power_of_two_needs, RotationNeed};
use crate::he::serialize::{context_from_bytes, public_context_to_bytes, secret_key_to_bytes};
use crate::he::{CipherTensor, Encoding, HeContext, ParametersRequest};
use crate::model::packed::PackedModel;

/// Live contexts by key id, so that unpickled tensors find the context they belong to.
static LIVE: Mutex<Option<HashMap<[u8; 16], Py<PyWeakrefReference>>>> = Mutex::new(None);

/// Encryption parameters and keys. The key holder's context has the secret
/// key; a server's (from `Context.from_public`) computes but cannot decrypt.
#[pyclass(name = "Context", module = "pycrcnn._engine", frozen, weakref)]
pub struct PyContext {
    inner: RwLock<Arc<HeContext>>,
    /// The packed model this context was planned for (packs `encrypt`, reads `decrypt`).
    packed: RwLock<Option<Arc<PackedModel>>>,
}

impl PyContext {
    /// The current parameters and keys.
    pub fn get(&self) -> Arc<HeContext> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The packed model the context was planned for, if any.
    pub fn packed(&self) -> Option<Arc<PackedModel>> {
        match self.packed.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether `t` is a packed result of this context's packed model.
    fn packed_result(&self, t: &CipherTensor) -> Option<Arc<PackedModel>> {
        let pm = self.packed()?;
        (t.batch() == Some(self.get().params().m()) && t.data().shape() == [1]).then_some(pm)
    }

    fn set(&self, ctx: HeContext) {
        match self.inner.write() {
            Ok(mut g) => *g = Arc::new(ctx),
            Err(p) => *p.into_inner() = Arc::new(ctx),
        }
    }

    fn register(slf: &Bound<'_, PyContext>) -> PyResult<()> {
        if let Ok(id) = slf.get().get().key_id() {
            let r = PyWeakrefReference::new(slf.as_any())?;
            if let Ok(mut g) = LIVE.lock() {
                let map = g.get_or_insert_with(HashMap::new);
                map.retain(|_, w| w.bind(slf.py()).upgrade().is_some());
                // A live context holding the secret key is never displaced by a
                // public one with the same key id: unpickled tensors should land
                // where they can be decrypted.
                let holder_alive = map
                    .get(&id)
                    .and_then(|w| w.bind(slf.py()).upgrade())
                    .and_then(|o| o.cast_into::<PyContext>().ok())
                    .is_some_and(|c| c.get().get().has_secret_key());
                if !holder_alive || slf.get().get().has_secret_key() {
                    map.insert(id, r.unbind());
                }
            }
        }
        Ok(())
    }

    /// A live context holding the keys with this id, if any.
    pub fn find_live<'py>(py: Python<'py>, key_id: &[u8; 16]) -> Option<Bound<'py, PyContext>> {
        let g = LIVE.lock().ok()?;
        let w = g.as_ref()?.get(key_id)?;
        w.bind(py).upgrade()?.cast_into::<PyContext>().ok()
    }

    /// Wraps an engine context.
    pub fn wrap(py: Python<'_>, ctx: HeContext) -> PyResult<Bound<'_, PyContext>> {
        let b = Bound::new(
            py,
            PyContext {
                inner: RwLock::new(Arc::new(ctx)),
                packed: RwLock::new(None),
            },
        )?;
        PyContext::register(&b)?;
        Ok(b)
    }
}

fn plaintext_moduli(p: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u64>> {
    match p {
        None => Ok(vec![]),
        Some(x) if x.is_none() => Ok(vec![]),
        Some(x) => {
            if let Ok(v) = x.extract::<u64>() {
                Ok(vec![v])
            } else if let Ok(v) = x.extract::<Vec<u64>>() {
                Ok(v)
            } else {
                Err(ParameterError::new_err(
                    "p must be a positive integer, a list of them (CRT), or None",
                ))
            }
        }
    }
}

#[pymethods]
impl PyContext {
    /// Validates parameters; keys come from `keygen()`.
    #[new]
    #[pyo3(signature = (m=4096, p=None, sec=128, encoding="batch", scale_bits=16, weight_scale_bits=None, base=2, int_digits=64, frac_digits=32, moduli_sizes=None, n_plaintext_moduli=1, p_bits=None, calibrated_bound_bits=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        m: usize,
        p: Option<&Bound<'_, PyAny>>,
        sec: u32,
        encoding: &str,
        scale_bits: u32,
        weight_scale_bits: Option<&Bound<'_, PyAny>>,
        base: u32,
        int_digits: usize,
        frac_digits: usize,
        moduli_sizes: Option<Vec<usize>>,
        n_plaintext_moduli: usize,
        p_bits: Option<u32>,
        calibrated_bound_bits: Option<f64>,
    ) -> PyResult<PyContext> {
        let mut p = plaintext_moduli(p)?;
        // An int (every weighted layer; default 8) or a list: one per
        // weighted layer (Conv/Linear in model order); polynomial
        // coefficients then use the largest entry.
        let (weight_scale_bits, layer_bits): (u32, Vec<u32>) = match weight_scale_bits {
            None => (8, Vec::new()),
            Some(w) => match w.extract::<u32>() {
                Ok(b) => (b, Vec::new()),
                Err(_) => {
                    let list = w.extract::<Vec<u32>>().map_err(|_| {
                        ParameterError::new_err(
                            "weight_scale_bits must be an int or a list of ints (one per Conv/Linear layer, in model order)",
                        )
                    })?;
                    if list.is_empty() || encoding != "batch" {
                        return Err(ParameterError::new_err(
                            "a list of weight_scale_bits (one per Conv/Linear layer) needs the batch encoding and at least one entry",
                        ));
                    }
                    (list.iter().copied().max().unwrap_or(0), list)
                }
            },
        };
        if let Some(bits) = p_bits {
            // Smaller plaintext primes cost less noise per product; CRT over
            // more of them keeps the plaintext space.
            if !p.is_empty() || encoding != "batch" || !(14..=61).contains(&bits) {
                return Err(ParameterError::new_err(
                    "p_bits (14..61) picks the batch encoding's plaintext primes; give either p or p_bits",
                ));
            }
            p = crate::he::params::batch_primes_below(m, 1u64 << bits, n_plaintext_moduli);
            if p.len() < n_plaintext_moduli {
                return Err(ParameterError::new_err(format!(
                    "there are fewer than {n_plaintext_moduli} primes ≡ 1 mod {} below 2^{bits}",
                    2 * m
                )));
            }
        }
        let encoding = match encoding {
            "batch" => Encoding::Batch {
                scale_bits,
                weight_scale_bits,
            },
            "fractional" => {
                if p.is_empty() {
                    // The seed's published modulus where it fits, else a small prime.
                    p = vec![if m >= 4096 { 953_983_721 } else { 65537 }];
                }
                Encoding::Fractional {
                    base,
                    int_digits,
                    frac_digits,
                }
            }
            other => {
                return Err(ParameterError::new_err(format!(
                    "encoding must be 'batch' or 'fractional', got {other:?}"
                )))
            }
        };
        let req = ParametersRequest {
            m,
            p,
            n_plaintext_moduli,
            sec,
            encoding,
            moduli_sizes,
        };
        let params = run(py, || {
            let built = req.build()?;
            let built = if layer_bits.is_empty() {
                built
            } else {
                built.with_layer_weight_scale_bits(layer_bits)?
            };
            match calibrated_bound_bits {
                Some(b) => built.with_calibrated_bound_bits(b),
                None => Ok(built),
            }
        })?;
        Ok(PyContext {
            inner: RwLock::new(Arc::new(HeContext::new(params))),
            packed: RwLock::new(None),
        })
    }

    /// Generates the secret, public and relinearization keys, and rotation
    /// keys: those of the packed model the context was planned for, or with
    /// `rotations=True` the power-of-two steps, or `[(level, [steps])]`.
    #[pyo3(signature = (rotations=None))]
    fn keygen(slf: &Bound<'_, PyContext>, rotations: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let me = slf.get();
        let mut c = me.get().without_keys();
        let needs: Vec<RotationNeed> = match rotations {
            Some(r) if r.is_instance_of::<pyo3::types::PyBool>() => {
                if r.is_truthy()? {
                    power_of_two_needs(c.params().m())
                } else {
                    vec![]
                }
            }
            Some(r) if !r.is_none() => r
                .extract::<Vec<(usize, Vec<usize>)>>()
                .map_err(|_| {
                    HEError::new_err("rotations must be True, False, None or [(level, [steps])]")
                })?
                .into_iter()
                .map(|(level, steps)| RotationNeed::at(level, steps))
                .collect(),
            _ => match me.packed() {
                Some(pm) => pm.layout(c.params()).map_err(to_py)?.rotation_needs(),
                None => vec![],
            },
        };
        // A packed model multiplies at the levels of its activations only.
        let levels = match me.packed() {
            Some(pm) => pm.layout(c.params()).map_err(to_py)?.product_levels(),
            None => usize::MAX,
        };
        let ctx = run(slf.py(), move || {
            c.keygen_for_levels(levels)?;
            if !needs.is_empty() {
                c.rotation_keygen(&needs)?;
            }
            Ok(c)
        })?;
        me.set(ctx);
        PyContext::register(slf)
    }

    /// Plans this context for a packed model: `encrypt` packs one image
    /// `[1, C, H, W]`, `keygen` makes its rotation keys, `decrypt` reads its result.
    fn attach_packed(&self, model: &Bound<'_, PyPackedModel>) -> PyResult<()> {
        let pm = model.get().get().clone();
        pm.layout(self.get().params()).map_err(to_py)?;
        match self.packed.write() {
            Ok(mut g) => *g = Some(pm),
            Err(p) => *p.into_inner() = Some(pm),
        }
        Ok(())
    }

    /// A keyless context matching a saved plan (`plan.info`, or what a server
    /// publishes from `export_model(..., plan=plan)`); `keygen()` makes its keys.
    #[staticmethod]
    fn from_plan<'py>(py: Python<'py>, info: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        py.import("pycrcnn.planner")?
            .call_method1("context_from_plan", (info,))
    }

    /// The packed model the context was planned for (None otherwise).
    #[getter]
    fn packed_model(&self) -> Option<PyPackedModel> {
        self.packed().map(PyPackedModel::wrap)
    }

    /// Rotation keys held: [(level, [steps])].
    #[getter]
    fn rotation_steps(&self) -> Vec<(usize, Vec<usize>)> {
        self.get()
            .rotation_steps()
            .into_iter()
            .map(|n| (n.level, n.steps))
            .collect()
    }

    /// True when this context holds the secret key.
    #[getter]
    fn has_secret_key(&self) -> bool {
        self.get().has_secret_key()
    }

    /// Parameters, public key and relinearization keys as bytes: all a server needs.
    pub fn public_context<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let ctx = self.get();
        let b = run(py, || public_context_to_bytes(&ctx))?;
        Ok(PyBytes::new(py, &b))
    }

    /// A compute-only context from `public_context()` bytes (a secret key blob is refused).
    #[staticmethod]
    fn from_public<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyContext>> {
        let ctx = run(py, || context_from_bytes(data, false))?;
        PyContext::wrap(py, ctx)
    }

    /// Everything including the secret key, as bytes. Keep them private.
    fn secret_key_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let ctx = self.get();
        let b = run(py, || secret_key_to_bytes(&ctx))?;
        Ok(PyBytes::new(py, &b))
    }

    /// The full context from `secret_key_bytes()`.
    #[staticmethod]
    fn from_secret_bytes<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyContext>> {
        let ctx = run(py, || context_from_bytes(data, true))?;
        if !ctx.has_secret_key() {
            return Err(super::errors::FormatError::new_err(
                "these bytes hold a public context, not a secret key",
            ));
        }
        PyContext::wrap(py, ctx)
    }

    /// Writes the secret key (and the rest of the context) to `path`.
    /// Whoever reads this file can decrypt everything encrypted under it.
    fn save_secret_key(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        let ctx = self.get();
        let b = run(py, || secret_key_to_bytes(&ctx))?;
        write_private(&path, &b)
            .map_err(|e| HEError::new_err(format!("cannot write {}: {e}", path.display())))
    }

    /// Loads a context saved with `save_secret_key`.
    #[staticmethod]
    fn load_secret_key<'py>(
        py: Python<'py>,
        path: std::path::PathBuf,
    ) -> PyResult<Bound<'py, PyContext>> {
        let data = std::fs::read(&path)
            .map_err(|e| HEError::new_err(format!("cannot read {}: {e}", path.display())))?;
        let ctx = run(py, || context_from_bytes(&data, true))?;
        if !ctx.has_secret_key() {
            return Err(super::errors::FormatError::new_err(format!(
                "{} holds a public context, not a secret key",
                path.display()
            )));
        }
        PyContext::wrap(py, ctx)
    }

    /// Encrypts an array (batch: axis 0 is the batch of images).
    fn encrypt(slf: &Bound<'_, PyContext>, x: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let arr = as_f64_array(x)?;
        let view = arr.as_array().to_owned();
        let ctx = slf.get().get();
        if let Some(pm) = slf.get().packed() {
            let [c, h, w] = pm.spec().in_shape;
            if view.shape() != [1, c, h, w] {
                return Err(HEError::new_err(format!(
                    "this context is planned for a packed model: encrypt one image [1, {c}, {h}, {w}], got {:?}",
                    view.shape()
                )));
            }
            let scale = (pm.spec().input_bits as f64).exp2();
            let limit = (*ctx.params().p().iter().min().unwrap_or(&0) / 2) as f64;
            if let Some(bad) = view
                .iter()
                .find(|v| !v.is_finite() || (*v * scale).round().abs() >= limit)
            {
                return Err(HEError::new_err(format!(
                    "cannot encrypt {bad}: inputs must be finite and below {:.3e}",
                    limit / scale
                )));
            }
            let ints: Vec<i64> = view.iter().map(|v| (v * scale).round() as i64).collect();
            let t = run(py, || pm.encrypt(&ctx, &ints))?;
            return wrap_tensor(py, t, slf.clone().unbind());
        }
        let t = run(py, || ctx.encrypt(view.view()))?;
        wrap_tensor(py, t, slf.clone().unbind())
    }

    /// Decrypts to float64 of the logical shape; raises NoiseBudgetExhausted
    /// instead of returning garbage.
    fn decrypt<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let t = tensor_arg(x)?;
        let ctx = self.get();
        if let Some(pm) = self.packed_result(&t) {
            // Logits = integers / 2^output_bits, [1, classes].
            let v = run(py, || pm.decrypt_integers(&ctx, &t))?;
            let scale = (pm.spec().output_bits as f64).exp2();
            let out = ndarray::Array2::from_shape_vec(
                (1, v.len()),
                v.iter().map(|&y| y as f64 / scale).collect(),
            )
            .map_err(|e| HEError::new_err(e.to_string()))?;
            return Ok(out.into_pyarray(py).into_any());
        }
        let out = run(py, || ctx.decrypt(&t))?;
        Ok(out.into_pyarray(py).into_any())
    }

    /// The exact decrypted integers, CRT-recombined (float64 cannot hold
    /// them). A packed result of the model this context was planned for gives
    /// [1, classes] as an object array of Python ints; a batch tensor its
    /// logical shape (the values times the tensor's scale), int64 when all
    /// fit, else an object array. Raises NoiseBudgetExhausted instead of
    /// returning garbage.
    fn decrypt_integers<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = tensor_arg(x)?;
        let ctx = self.get();
        if self.packed().is_some() {
            // A context planned for the packed layout reads packed results only
            // (its packed inputs hold shifted copies of the image, not values).
            let pm = self.packed_result(&t).ok_or_else(|| {
                HEError::new_err("decrypt_integers reads packed results of the model this context was planned for (pycrcnn.plan(..., layout=\"packed\"))")
            })?;
            let v = run(py, || pm.decrypt_integers(&ctx, &t))?;
            let np = py.import("numpy")?;
            let list = pyo3::types::PyList::new(py, [v])?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("dtype", "object")?;
            return np.call_method("array", (list,), Some(&kwargs));
        }
        let out = run(py, || ctx.decrypt_integers(&t))?;
        super::integers::integers_to_py(py, out)
    }

    /// Minimum invariant noise budget in bits over the ciphertexts of `x` (≤ 0: exhausted).
    fn noise_budget(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<i64> {
        let t = tensor_arg(x)?;
        let ctx = self.get();
        run(py, || ctx.noise_budget(&t))
    }

    /// Element-wise square (relinearized).
    fn square(slf: &Bound<'_, PyContext>, x: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = tensor_arg(x)?;
        let ctx = slf.get().get();
        let out = run(slf.py(), || ctx.square(CipherTensor::clone(&t)))?;
        wrap_tensor(slf.py(), out, slf.clone().unbind())
    }

    /// Element-wise product of two tensors (relinearized).
    fn multiply(
        slf: &Bound<'_, PyContext>,
        a: &Bound<'_, PyAny>,
        b: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let (ta, tb) = (tensor_arg(a)?, tensor_arg(b)?);
        let ctx = slf.get().get();
        let out = run(slf.py(), || ctx.multiply(&ta, &tb))?;
        wrap_tensor(slf.py(), out, slf.clone().unbind())
    }

    /// Σ coefficients[k] · x^k element-wise (lowest degree first).
    fn polynomial(
        slf: &Bound<'_, PyContext>,
        x: &Bound<'_, PyAny>,
        coefficients: Vec<f64>,
    ) -> PyResult<Py<PyAny>> {
        let t = tensor_arg(x)?;
        let ctx = slf.get().get();
        let out = run(slf.py(), || {
            crate::layers::polynomial(&ctx, &t, &coefficients)
        })?;
        wrap_tensor(slf.py(), out, slf.clone().unbind())
    }

    /// Measured plaintext coefficients (needs the secret key): `max_abs`
    /// against `limit` (p/2 or T/2) and `wrap_risk`, the decode error that
    /// possibly wrapped coefficients (measured above p/4) could cause.
    fn measure_coefficients<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = tensor_arg(x)?;
        let ctx = self.get();
        let (max_abs, limit, risk) = run(py, || ctx.measure_coefficients(&t))?;
        let d = PyDict::new(py);
        d.set_item("max_abs", max_abs)?;
        d.set_item("limit", limit)?;
        d.set_item("wrap_risk", risk)?;
        Ok(d)
    }

    /// Decrypts and re-encrypts (key holder only): a fresh noise budget.
    fn rencrypt(slf: &Bound<'_, PyContext>, x: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = tensor_arg(x)?;
        let ctx = slf.get().get();
        let out = run(slf.py(), || ctx.rencrypt(&t))?;
        wrap_tensor(slf.py(), out, slf.clone().unbind())
    }

    /// Polynomial degree.
    #[getter]
    fn m(&self) -> usize {
        self.get().params().m()
    }

    /// Plaintext modulus (a list when several are combined by CRT).
    #[getter]
    fn p(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ps = self.get().params().p().to_vec();
        Ok(if ps.len() == 1 {
            ps[0].into_pyobject(py)?.into_any().unbind()
        } else {
            ps.into_pyobject(py)?.into_any().unbind()
        })
    }

    /// Security level in bits.
    #[getter]
    fn sec(&self) -> u32 {
        self.get().params().sec()
    }

    /// "batch" or "fractional".
    #[getter]
    fn encoding(&self) -> &'static str {
        self.get().params().encoding().name()
    }

    /// Whether a result switched down to the last modulus stays decryptable
    /// (the engine's rule; what `switch_result="auto"` of a model run follows).
    #[getter]
    fn switch_is_safe(&self) -> bool {
        crate::model::switch_is_safe(self.get().params())
    }

    /// Ciphertext moduli.
    #[getter]
    fn moduli(&self) -> Vec<u64> {
        self.get().params().moduli().to_vec()
    }

    /// Hex id of the keys (None before keygen).
    #[getter]
    fn key_id(&self) -> Option<String> {
        self.get()
            .key_id()
            .ok()
            .map(|k| k.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Hex fingerprint of the parameters (including the NTT build).
    #[getter]
    fn fingerprint(&self) -> String {
        self.get()
            .params()
            .fingerprint()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// All parameters as a dict (what a server compares requests with).
    fn parameters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ctx = self.get();
        let par = ctx.params();
        let d = PyDict::new(py);
        d.set_item("m", par.m())?;
        d.set_item(
            "p",
            if par.p().len() == 1 {
                par.p()[0].into_pyobject(py)?.into_any()
            } else {
                par.p().to_vec().into_pyobject(py)?.into_any()
            },
        )?;
        d.set_item("sec", par.sec())?;
        d.set_item("encoding", par.encoding().name())?;
        d.set_item("moduli", par.moduli().to_vec())?;
        d.set_item("log_q", par.log_q_at_level(0))?;
        match par.encoding() {
            Encoding::Batch {
                scale_bits,
                weight_scale_bits,
            } => {
                d.set_item("scale_bits", scale_bits)?;
                if par.layer_weight_scale_bits().is_empty() {
                    d.set_item("weight_scale_bits", weight_scale_bits)?;
                } else {
                    d.set_item("weight_scale_bits", par.layer_weight_scale_bits().to_vec())?;
                }
                if let Some(b) = par.calibrated_bound_bits() {
                    d.set_item("calibrated_bound_bits", b)?;
                }
            }
            Encoding::Fractional {
                base,
                int_digits,
                frac_digits,
            } => {
                d.set_item("base", base)?;
                d.set_item("int_digits", int_digits)?;
                d.set_item("frac_digits", frac_digits)?;
            }
        }
        Ok(d)
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, PyContext>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let me = slf.get();
        let cls = py.get_type::<PyContext>();
        if me.get().has_secret_key() {
            Ok((
                cls.getattr("from_secret_bytes")?,
                (me.secret_key_bytes(py)?,),
            ))
        } else {
            Ok((cls.getattr("from_public")?, (me.public_context(py)?,)))
        }
    }

    fn __repr__(&self) -> String {
        let c = self.get();
        let keys = if c.has_secret_key() {
            "secret key"
        } else if c.keys().is_ok() {
            "public keys only"
        } else {
            "no keys"
        };
        format!(
            "Context(m={}, p={:?}, sec={}, encoding={:?}, {keys})",
            c.params().m(),
            c.params().p(),
            c.params().sec(),
            c.params().encoding().name()
        )
    }
}

fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(data)
}

/// Any array-like as a float64 numpy array.
pub fn as_f64_array<'py>(x: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, f64>> {
    let np = x.py().import("numpy")?;
    // asarray keeps 0-d inputs 0-d (ascontiguousarray would make them 1-d).
    let kwargs = pyo3::types::PyDict::new(x.py());
    kwargs.set_item("dtype", "float64")?;
    kwargs.set_item("order", "C")?;
    let arr = np
        .call_method("asarray", (x,), Some(&kwargs))
        .map_err(|e| HEError::new_err(format!("expected numbers or a numeric array: {e}")))?;
    arr.extract::<PyReadonlyArrayDyn<'py, f64>>()
        .map_err(|e| to_py(crate::he::HeError::Value(e.to_string())))
}
