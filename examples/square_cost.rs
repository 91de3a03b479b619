//! Cost of the square's pieces at one parameter set, single thread:
//! fhe.rs's Multiplicator (relinearize + switch down) against the engine's
//! Squarer (tensor in the extended basis, scale back, no relinearization).
//!
//!     cargo run --release --example square_cost [-- 8192 60,60,60 57]

use std::hint::black_box;
use std::time::Instant;

use fhe::bfv::{Ciphertext, Encoding, Multiplicator, Plaintext, RelinearizationKey, SecretKey};
use fhe_traits::{FheEncoder, FheEncrypter};
use pycrcnn::he::square::Squarer;
use pycrcnn::he::{params::Encoding as Enc, Multiplier, ParametersRequest};
use pycrcnn::layers::weighted_sum;

fn ms(n: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(8192);
    let sizes: Vec<usize> = args
        .get(2)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![60, 60, 60]);
    let p_bits: u32 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(57);
    let p = pycrcnn::he::params::batch_primes_below(m, 1u64 << p_bits, 1);
    let req = ParametersRequest {
        m,
        p: p.clone(),
        n_plaintext_moduli: 1,
        sec: 128,
        encoding: Enc::Batch {
            scale_bits: 4,
            weight_scale_bits: 7,
        },
        moduli_sizes: Some(sizes.clone()),
    };
    let params = req.build().expect("parameters");
    let par = params.bfv()[0].clone();
    let mut rng = rand::rng();
    let sk = SecretKey::random(&par, &mut rng);
    let n: usize = 8;
    let cts: Vec<Ciphertext> = (0..n)
        .map(|j| {
            let s: Vec<u64> = (0..m as u64).map(|i| (i + j as u64) % 100).collect();
            sk.try_encrypt(
                &Plaintext::try_encode(&s[..], Encoding::simd(), &par).unwrap(),
                &mut rng,
            )
            .unwrap()
        })
        .collect();
    let rk = RelinearizationKey::new_leveled(&sk, 0, 0, &mut rng).unwrap();
    let mut mult = Multiplicator::default(&rk).unwrap();
    let switch = sizes.len() > 2;
    if switch {
        mult.enable_mod_switching().unwrap();
    }
    let sq = Squarer::new(&par, 0).unwrap();
    println!("m={m} moduli={sizes:?} p={p:?}");
    println!(
        "multiplicator (relin{}): {:.2} ms",
        if switch { "+switch" } else { "" },
        ms(n, || {
            black_box(
                cts.iter()
                    .map(|c| mult.multiply(c, c).unwrap())
                    .collect::<Vec<_>>(),
            );
        })
    );
    println!(
        "squarer (3 parts{}): {:.2} ms",
        if switch { "+switch" } else { "" },
        ms(n, || {
            black_box(
                cts.iter()
                    .map(|c| {
                        let mut s = sq.square(c).unwrap();
                        if switch {
                            s.switch_down().unwrap();
                        }
                        s
                    })
                    .collect::<Vec<_>>(),
            );
        })
    );
    let mut tensors = Vec::new();
    println!(
        "  tensor: {:.2} ms",
        ms(n, || {
            tensors = cts
                .iter()
                .map(|c| sq.tensor(c).unwrap())
                .collect::<Vec<_>>();
        })
    );
    if switch {
        let more: Vec<_> = cts.iter().map(|c| sq.tensor(c).unwrap()).collect();
        println!(
            "  finish switched down in its scaling: {:.2} ms",
            ms(n, || {
                black_box(
                    more.into_iter()
                        .map(|t| sq.finish_switched(t).unwrap())
                        .collect::<Vec<_>>(),
                );
            })
        );
    }
    let mut outs = Vec::new();
    println!(
        "  finish: {:.2} ms",
        ms(n, || {
            outs = tensors
                .into_iter()
                .map(|t| sq.finish(t).unwrap())
                .collect::<Vec<_>>();
        })
    );
    println!(
        "  switch down (3 parts): {:.2} ms",
        ms(n, || {
            for o in outs.iter_mut() {
                o.switch_down().unwrap();
            }
        })
    );
    let rk1 = RelinearizationKey::new_leveled(&sk, 1, 0, &mut rng).unwrap();
    println!(
        "relinearize 3 parts at level 1: {:.2} ms",
        ms(n, || {
            for o in outs.clone().iter_mut() {
                rk1.relinearizes(o).unwrap();
            }
        })
    );
    let mut rel = outs.clone();
    for o in rel.iter_mut() {
        rk1.relinearizes(o).unwrap();
    }
    let c1 = outs[0][0].ctx().clone();
    let ws: Vec<Multiplier> = (0..n)
        .map(|k| Multiplier::scalar(k as i64 - 3, &c1))
        .collect();
    let wr: Vec<&Multiplier> = ws.iter().collect();
    let reps = 50;
    let o3: Vec<&Ciphertext> = outs.iter().collect();
    let o2: Vec<&Ciphertext> = rel.iter().collect();
    println!(
        "weighted-sum term at level 1, 3 parts: {:.4} ms",
        ms(reps * n, || {
            for _ in 0..reps {
                black_box(weighted_sum(&o3, &wr, &par).unwrap());
            }
        })
    );
    println!(
        "weighted-sum term at level 1, 2 parts: {:.4} ms",
        ms(reps * n, || {
            for _ in 0..reps {
                black_box(weighted_sum(&o2, &wr, &par).unwrap());
            }
        })
    );
    let c0 = cts[0][0].ctx().clone();
    let ws0: Vec<Multiplier> = (0..n)
        .map(|k| Multiplier::scalar(k as i64 - 3, &c0))
        .collect();
    let wr0: Vec<&Multiplier> = ws0.iter().collect();
    let i2: Vec<&Ciphertext> = cts.iter().collect();
    println!(
        "weighted-sum term at level 0, 2 parts: {:.4} ms",
        ms(reps * n, || {
            for _ in 0..reps {
                black_box(weighted_sum(&i2, &wr0, &par).unwrap());
            }
        })
    );
}
