//! `pycrcnn._engine.CipherTensor` and its single-ciphertext subclass `PyCtxt`.

use std::sync::{Arc, RwLock};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyEllipsis, PySlice, PySliceMethods, PyTuple};

use super::context::{as_f64_array, PyContext};
use super::errors::{index_error, HEError};
use super::pool::run;
use crate::he::serialize::{context_from_bytes, open_frame, tensor_from_bytes, tensor_to_bytes};
use crate::he::{CipherTensor, HeError};

/// An n-dimensional array of ciphertexts with its encoding metadata.
/// Logical shape `[N, ...]`; in the batch encoding the batch axis lives in
/// the slots and only takes `:`.
#[pyclass(name = "CipherTensor", module = "pycrcnn._engine", subclass, frozen)]
pub struct PyCipherTensor {
    inner: RwLock<Arc<CipherTensor>>,
    ctx: Py<PyContext>,
}

/// One encrypted value (fractional encoding), as Pyfhel's PyCtxt.
#[pyclass(name = "PyCtxt", module = "pycrcnn._engine", extends = PyCipherTensor, subclass, frozen)]
pub struct PyCtxt;

impl PyCipherTensor {
    /// The Context the tensor belongs to.
    pub fn context_ref(&self) -> &Py<PyContext> {
        &self.ctx
    }

    /// Takes the tensor out, leaving an empty one of no shape behind (for
    /// layers that consume intermediate results).
    pub fn take(&self) -> CipherTensor {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let empty = g.with_data(
            ndarray::ArrayD::default(ndarray::IxDyn(&[0])),
            g.scale(),
            g.growth().clone(),
        );
        let arc = std::mem::replace(&mut *g, Arc::new(empty));
        Arc::try_unwrap(arc).unwrap_or_else(|a| (*a).clone())
    }

    /// The tensor.
    pub fn get(&self) -> Arc<CipherTensor> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Wraps a tensor: a `PyCtxt` for a single fractional ciphertext, else a `CipherTensor`.
pub fn wrap_tensor(py: Python<'_>, t: CipherTensor, ctx: Py<PyContext>) -> PyResult<Py<PyAny>> {
    wrap_shared(py, Arc::new(t), ctx)
}

/// Wraps a shared tensor without copying it (a model run's intermediate
/// handed to a callback: the runner consumes it later only if Python let go).
pub fn wrap_shared(
    py: Python<'_>,
    t: Arc<CipherTensor>,
    ctx: Py<PyContext>,
) -> PyResult<Py<PyAny>> {
    let single = t.batch().is_none() && t.data().ndim() == 0;
    let base = PyCipherTensor {
        inner: RwLock::new(t),
        ctx,
    };
    if single {
        Ok(
            Bound::new(py, PyClassInitializer::from(base).add_subclass(PyCtxt))?
                .into_any()
                .unbind(),
        )
    } else {
        Ok(Bound::new(py, base)?.into_any().unbind())
    }
}

/// The tensor behind a CipherTensor / PyCtxt argument.
pub fn tensor_arg(x: &Bound<'_, PyAny>) -> PyResult<Arc<CipherTensor>> {
    match x.cast::<PyCipherTensor>() {
        Ok(t) => Ok(t.get().get()),
        Err(_) => Err(HEError::new_err(format!(
            "expected a CipherTensor or PyCtxt, got {}",
            x.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))),
    }
}

/// The engine context of a `Context`, or of a `Pyfhel` (its `context` attribute).
pub fn context_arg<'py>(x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyContext>> {
    if let Ok(c) = x.cast::<PyContext>() {
        return Ok(c.clone());
    }
    if let Ok(inner) = x.getattr("context") {
        if let Ok(c) = inner.cast_into::<PyContext>() {
            return Ok(c);
        }
    }
    Err(HEError::new_err(
        "expected a pycrcnn Context or Pyfhel object",
    ))
}

enum Key {
    Index(isize),
    Slice(Vec<usize>, bool),
}

fn parse_key(key: &Bound<'_, PyAny>, shape: &[usize], batch: bool) -> PyResult<Vec<Key>> {
    let items: Vec<Bound<'_, PyAny>> = match key.cast::<PyTuple>() {
        Ok(t) => t.iter().collect(),
        Err(_) => vec![key.clone()],
    };
    let nd = shape.len();
    let n_real = items
        .iter()
        .filter(|i| !i.is(&PyEllipsis::get(key.py())))
        .count();
    if n_real > nd {
        return Err(index_error(format!(
            "too many indices for a tensor of {nd} dimensions"
        )));
    }
    let mut keys = Vec::new();
    let mut axis = 0;
    for it in &items {
        if it.is(&PyEllipsis::get(key.py())) {
            for _ in 0..(nd - n_real) {
                keys.push(Key::Slice((0..shape[axis]).collect(), true));
                axis += 1;
            }
            continue;
        }
        let len = shape[axis];
        if let Ok(s) = it.cast::<PySlice>() {
            let ind = s.indices(len as isize)?;
            let idx: Vec<usize> = (0..ind.slicelength)
                .map(|k| (ind.start + k as isize * ind.step) as usize)
                .collect();
            let full = ind.start == 0 && ind.step == 1 && ind.slicelength == len;
            keys.push(Key::Slice(idx, full));
        } else if let Ok(i) = it.extract::<isize>() {
            let j = if i < 0 { i + len as isize } else { i };
            if j < 0 || j >= len as isize {
                return Err(index_error(format!(
                    "index {i} is out of range for axis {axis} of length {len}"
                )));
            }
            keys.push(Key::Index(j));
        } else {
            return Err(index_error(
                "tensors take integers, slices and ... as indices",
            ));
        }
        axis += 1;
    }
    while keys.len() < nd {
        keys.push(Key::Slice((0..shape[keys.len()]).collect(), true));
    }
    if batch {
        match &keys[0] {
            Key::Slice(_, true) => {}
            _ => {
                return Err(index_error(
                    "in the batch encoding axis 0 (the batch) lives in the ciphertext slots: it only takes ':'; decrypt to select images",
                ))
            }
        }
    }
    Ok(keys)
}

fn index(t: &CipherTensor, keys: &[Key]) -> Result<CipherTensor, HeError> {
    let mut out = t.clone();
    let skip = usize::from(t.batch().is_some());
    for (axis, k) in keys.iter().enumerate().skip(skip) {
        if let Key::Slice(idx, full) = k {
            if !full {
                out = out.take(axis, idx)?;
            }
        }
    }
    for (axis, k) in keys.iter().enumerate().skip(skip).rev() {
        if let Key::Index(i) = k {
            out = out.index_axis(axis, *i as usize)?;
        }
    }
    Ok(out)
}

enum Operand {
    Tensor(Arc<CipherTensor>),
    Plain(ndarray::ArrayD<f64>),
}

fn operand(x: &Bound<'_, PyAny>) -> PyResult<Operand> {
    if let Ok(t) = x.cast::<PyCipherTensor>() {
        return Ok(Operand::Tensor(t.get().get()));
    }
    // Pyfhel's PyPtxt carries its value.
    let v = if let Ok(val) = x.getattr("_pycrcnn_value") {
        val
    } else {
        x.clone()
    };
    Ok(Operand::Plain(as_f64_array(&v)?.as_array().to_owned()))
}

impl PyCipherTensor {
    fn result(&self, py: Python<'_>, t: CipherTensor) -> PyResult<Py<PyAny>> {
        wrap_tensor(py, t, self.ctx.clone_ref(py))
    }
}

#[pymethods]
impl PyCipherTensor {
    /// Rebuilds a tensor from the seed's object array of PyCtxt (or of batch
    /// ciphertexts from `to_numpy()`).
    #[new]
    fn new(py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<Self> {
        let np = py.import("numpy")?;
        let arr = np.call_method1("asarray", (array, "object"))?;
        let shape: Vec<usize> = arr.getattr("shape")?.extract()?;
        let flat = arr.call_method1("reshape", (-1,))?;
        let n: usize = flat.len()?;
        let mut parts = Vec::with_capacity(n);
        let mut ctx: Option<Py<PyContext>> = None;
        for i in 0..n {
            let item = flat.get_item(i)?;
            let t = item.cast::<PyCipherTensor>().map_err(|_| {
                HEError::new_err("every element must be a PyCtxt or a ciphertext from to_numpy()")
            })?;
            if ctx.is_none() {
                ctx = Some(t.get().ctx.clone_ref(py));
            }
            parts.push((*t.get().get()).clone());
        }
        let ctx =
            ctx.ok_or_else(|| HEError::new_err("cannot build a CipherTensor from an empty array"))?;
        let t = run(py, || CipherTensor::stack(&parts, &shape))?;
        Ok(PyCipherTensor {
            inner: RwLock::new(Arc::new(t)),
            ctx,
        })
    }

    /// numpy defers to our reflected operators (`array * tensor` → `tensor.__rmul__`).
    #[classattr]
    fn __array_ufunc__(py: Python<'_>) -> Py<PyAny> {
        py.None()
    }

    /// Logical shape `(N, ...)`.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.get().shape())
    }

    /// Number of dimensions of the logical shape.
    #[getter]
    fn ndim(&self) -> usize {
        self.get().shape().len()
    }

    /// "batch" or "fractional".
    #[getter]
    fn encoding(&self) -> &'static str {
        self.get().params().encoding().name()
    }

    /// Fixed-point scale of the slots (batch); 1 for fractional.
    #[getter]
    fn scale(&self) -> f64 {
        self.get().scale()
    }

    /// Modulus level (0 = all moduli).
    #[getter]
    fn level(&self, py: Python<'_>) -> PyResult<usize> {
        let t = self.get();
        run(py, || t.level())
    }

    /// Number of ciphertexts held.
    #[getter]
    fn n_ciphertexts(&self) -> usize {
        self.get().n_ciphertexts()
    }

    /// The Context it belongs to.
    #[getter]
    fn context(&self, py: Python<'_>) -> Py<PyContext> {
        self.ctx.clone_ref(py)
    }

    fn __len__(&self) -> PyResult<usize> {
        self.get()
            .shape()
            .first()
            .copied()
            .ok_or_else(|| pyo3::exceptions::PyTypeError::new_err("len() of a single ciphertext"))
    }

    fn __getitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        let shape = t.shape();
        if shape.is_empty() {
            return Err(index_error("a single ciphertext cannot be indexed"));
        }
        let keys = parse_key(key, &shape, t.batch().is_some())?;
        let out = index(&t, &keys).map_err(|e| index_error(e.to_string()))?;
        self.result(py, out)
    }

    /// The seed's object array: fractional → PyCtxt per value (logical
    /// shape); batch → one ciphertext (a CipherTensor of shape (N,)) per
    /// physical position `[C, H, W]`.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = self.get();
        let np = py.import("numpy")?;
        let phys = t.data().shape().to_vec();
        let out = np.call_method1("empty", (t.data().len(), "object"))?;
        for (i, e) in t.data().iter().enumerate() {
            let single = t.with_data(
                ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), e.clone()),
                t.scale(),
                t.growth().clone(),
            );
            out.set_item(i, self.result(py, single)?)?;
        }
        out.call_method1("reshape", (PyTuple::new(py, phys)?,))
    }

    /// Decrypts with the tensor's context (needs the secret key).
    fn decrypt<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.ctx.bind(py).get().get();
        let t = self.get();
        let out = run(py, || ctx.decrypt(&t))?;
        Ok(numpy::IntoPyArray::into_pyarray(out, py).into_any())
    }

    /// Minimum noise budget in bits (needs the secret key).
    fn noise_budget(&self, py: Python<'_>) -> PyResult<i64> {
        let ctx = self.ctx.bind(py).get().get();
        let t = self.get();
        run(py, || ctx.noise_budget(&t))
    }

    /// Bound on plaintext growth against the plaintext modulus: coeff_bound, limit, wrap_error_bound, fits.
    fn growth_report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.get().growth_report();
        let d = PyDict::new(py);
        d.set_item("coeff_bound", r.coeff_bound)?;
        d.set_item("limit", r.limit)?;
        d.set_item("wrap_error_bound", r.wrap_error_bound)?;
        d.set_item("fits", r.fits())?;
        Ok(d)
    }

    /// A copy switched down to the last modulus (smallest to send back).
    fn switch_to_last_level(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        let out = run(py, || t.switch_to_last_level())?;
        self.result(py, out)
    }

    /// Serialized tensor: magic, version, parameter fingerprint, key id, checksum.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let t = self.get();
        let b = run(py, || Ok(tensor_to_bytes(&t)))?;
        Ok(PyBytes::new(py, &b))
    }

    /// Parses bytes made under `ctx`'s parameters and key (a Context or Pyfhel).
    #[classmethod]
    fn from_bytes(
        _cls: &Bound<'_, pyo3::types::PyType>,
        py: Python<'_>,
        data: &[u8],
        ctx: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let c = context_arg(ctx)?;
        let engine = c.get().get();
        let t = run(py, || tensor_from_bytes(data, &engine))?;
        wrap_tensor(py, t, c.unbind())
    }

    /// `_assign(other)`: replaces the contents in place (Pyfhel's in-place operations).
    fn _assign(&self, other: &Bound<'_, PyAny>) -> PyResult<()> {
        let t = tensor_arg(other)?;
        match self.inner.write() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
        Ok(())
    }

    fn __add__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        let out = match operand(other)? {
            Operand::Tensor(o) => run(py, || t.add(&o))?,
            Operand::Plain(v) => run(py, || t.add_plain(&v))?,
        };
        self.result(py, out)
    }

    fn __radd__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.__add__(py, other)
    }

    fn __sub__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        let out = match operand(other)? {
            Operand::Tensor(o) => run(py, || t.sub(&o))?,
            Operand::Plain(v) => run(py, || t.add_plain(&v.mapv(|x| -x)))?,
        };
        self.result(py, out)
    }

    fn __rsub__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        let out = match operand(other)? {
            Operand::Tensor(o) => run(py, || o.sub(&t))?,
            Operand::Plain(v) => run(py, || t.neg().add_plain(&v))?,
        };
        self.result(py, out)
    }

    fn __mul__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        let out = match operand(other)? {
            Operand::Tensor(o) => {
                let ctx = self.ctx.bind(py).get().get();
                run(py, || ctx.multiply(&t, &o))?
            }
            Operand::Plain(v) => run(py, || t.mul_plain(&v))?,
        };
        self.result(py, out)
    }

    fn __rmul__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.__mul__(py, other)
    }

    fn __neg__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let t = self.get();
        self.result(py, t.neg())
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        Bound<'py, PyAny>,
        (Bound<'py, PyBytes>, Bound<'py, PyBytes>),
    )> {
        let f = py
            .import("pycrcnn._engine")?
            .getattr("_tensor_from_pickle")?;
        let ctx = self.ctx.bind(py).get();
        Ok((f, (self.to_bytes(py)?, ctx.public_context(py)?)))
    }

    fn __repr__(&self) -> String {
        let t = self.get();
        format!(
            "CipherTensor(shape={:?}, encoding={:?}, scale={}, ciphertexts={})",
            t.shape(),
            t.params().encoding().name(),
            t.scale(),
            t.n_ciphertexts()
        )
    }
}

#[pymethods]
impl PyCtxt {
    /// Parses bytes made under `HE` (a Pyfhel or Context).
    #[staticmethod]
    #[pyo3(name = "from_bytes")]
    #[allow(non_snake_case)]
    fn ctxt_from_bytes(py: Python<'_>, data: &[u8], HE: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let c = context_arg(HE)?;
        let engine = c.get().get();
        let t = run(py, || tensor_from_bytes(data, &engine))?;
        wrap_tensor(py, t, c.unbind())
    }

    /// Writes the ciphertext's bytes to `path`.
    fn save(slf: PyRef<'_, Self>, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        let b = slf.as_super().to_bytes(py)?;
        std::fs::write(&path, b.as_bytes())
            .map_err(|e| HEError::new_err(format!("cannot write {}: {e}", path.display())))
    }

    /// Replaces this ciphertext by the one saved at `path` (same context).
    fn load(slf: PyRef<'_, Self>, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        let data = std::fs::read(&path)
            .map_err(|e| HEError::new_err(format!("cannot read {}: {e}", path.display())))?;
        let base = slf.as_super();
        let engine = base.ctx.bind(py).get().get();
        let t = run(py, || tensor_from_bytes(&data, &engine))?;
        if t.batch().is_some() || t.data().ndim() != 0 {
            return Err(HEError::new_err(
                "the file does not hold a single ciphertext",
            ));
        }
        match base.inner.write() {
            Ok(mut g) => *g = Arc::new(t),
            Err(p) => *p.into_inner() = Arc::new(t),
        }
        Ok(())
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        let base = slf.as_super();
        format!(
            "PyCtxt(level={:?}, encoding={:?})",
            base.get().level().ok(),
            base.get().params().encoding().name()
        )
    }
}

/// Unpickles a tensor: into a live context holding its key, or a public one.
#[pyfunction]
pub fn _tensor_from_pickle(
    py: Python<'_>,
    data: &[u8],
    public_context: &[u8],
) -> PyResult<Py<PyAny>> {
    let frame = open_frame(data).map_err(super::errors::to_py)?;
    let ctx = match PyContext::find_live(py, &frame.key_id) {
        Some(c) => c,
        None => {
            let c = run(py, || context_from_bytes(public_context, false))?;
            PyContext::wrap(py, c)?
        }
    };
    let engine = ctx.get().get();
    let t = run(py, || tensor_from_bytes(data, &engine))?;
    wrap_tensor(py, t, ctx.unbind())
}
