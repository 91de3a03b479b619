//! Per-operation cost of raw fhe.rs, single-threaded, with the same parameters
//! the engine picks (batch encoding, automatic plaintext prime). Prints one
//! JSON object: {"<m>": {"<op>": microseconds per ciphertext, ...}, ...}.
//! `benches/ops.py` runs it next to the engine and prints both columns.
//!
//!     cargo run --release --example raw_ops [-- 4096 8192] [--n=1024]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use fhe::bfv::{
    dot_product_scalar, Ciphertext, Encoding, Multiplicator, Plaintext, RelinearizationKey,
    SecretKey,
};
use fhe_traits::{FheEncoder, FheEncrypter};
use num_bigint::BigUint;
use pycrcnn::he::{params::Encoding as Enc, ParametersRequest};

/// Microseconds per output of `f`, which makes `n` outputs from distinct
/// inputs (as the engine does on a tensor) and keeps them until the clock
/// stops; best of `reps` runs. Outputs are dropped outside the timed region.
fn time_us<T>(n: usize, reps: usize, mut f: impl FnMut() -> Vec<T>) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let out = black_box(f());
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        drop(out);
    }
    best
}

fn measure(m: usize, n: usize) -> BTreeMap<&'static str, f64> {
    let req = ParametersRequest {
        m,
        p: vec![],
        n_plaintext_moduli: 1,
        sec: 128,
        encoding: Enc::Batch {
            scale_bits: 16,
            weight_scale_bits: 8,
        },
        moduli_sizes: None,
    };
    let params = req.build().expect("parameters");
    let par = params.bfv[0].clone();
    let t = params.p[0];
    let mut rng = rand::rng();
    let sk = SecretKey::random(&par, &mut rng);
    // As the engine: relinearization key at the top level, products switch down one level.
    let rk = RelinearizationKey::new_leveled(&sk, 0, 0, &mut rng).expect("relinearization key");
    let mut mult = Multiplicator::default(&rk).expect("multiplicator");
    if par.moduli().len() > 2 {
        mult.enable_mod_switching().expect("mod switching");
    }

    let slots: Vec<Vec<u64>> = (0..n as u64)
        .map(|j| (0..m as u64).map(|i| (i * 7919 + j) % t).collect())
        .collect();
    let mut out = BTreeMap::new();
    let mut encrypt_all = || -> Vec<Ciphertext> {
        slots
            .iter()
            .map(|s| {
                let pt = Plaintext::try_encode(&s[..], Encoding::simd(), &par).unwrap();
                let ct: Ciphertext = sk.try_encrypt(&pt, &mut rng).unwrap();
                ct
            })
            .collect()
    };
    out.insert("encrypt", time_us(n, 2, &mut encrypt_all));
    let cts = encrypt_all();
    out.insert("add", time_us(n, 4, || cts.iter().map(|c| c + c).collect()));
    // A negative weight, −77, as Q − 77 (what the notes recommend over t − 77).
    let q: BigUint = par.moduli().iter().map(|&q| BigUint::from(q)).product();
    let w = q - BigUint::from(77u32);
    out.insert(
        "scalar_mul",
        time_us(n, 4, || {
            cts.iter()
                .map(|c| {
                    let parts: Vec<_> = c
                        .iter()
                        .map(|p| {
                            let mut p = p.clone();
                            p *= &w;
                            p
                        })
                        .collect();
                    Ciphertext::new(parts, &par).unwrap()
                })
                .collect()
        }),
    );
    let pts: Vec<Plaintext> = (0..25u64)
        .map(|k| {
            Plaintext::try_encode(&vec![(k * 37 + 1) % t; m][..], Encoding::simd(), &par).unwrap()
        })
        .collect();
    out.insert(
        "weighted_sum_25",
        time_us(n, 2, || {
            (0..n)
                .map(|_| dot_product_scalar(cts[..25].iter(), pts.iter()).unwrap())
                .collect()
        }),
    );
    out.insert(
        "square_relin",
        time_us(n, 1, || {
            cts.iter().map(|c| mult.multiply(c, c).unwrap()).collect()
        }),
    );
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut n = 1024;
    let mut ms = Vec::new();
    for a in &args {
        if let Some(v) = a.strip_prefix("--n=") {
            n = v.parse().expect("--n=<ciphertexts>");
        } else if let Ok(m) = a.parse() {
            ms.push(m);
        }
    }
    if ms.is_empty() {
        ms = vec![4096, 8192];
    }
    n = n.max(25);
    let mut all = BTreeMap::new();
    for m in ms {
        all.insert(m.to_string(), measure(m, n));
    }
    let meta = serde_json::json!({
        "ntt": pycrcnn::he::params::NTT_FEATURES,
        "n": n,
        "results": all,
    });
    println!("{meta}");
}
