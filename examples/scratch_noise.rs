use pycrcnn::he::*;
use ndarray::{ArrayD, IxDyn};
fn run(m: usize, p: u64, sizes: Option<Vec<usize>>, squares: usize) {
    let frac = Encoding::Fractional { base: 2, int_digits: 64, frac_digits: 32 };
    let req = ParametersRequest { m, p: vec![p], n_plaintext_moduli: 1, sec: 128, encoding: frac, moduli_sizes: sizes.clone() };
    let par = match req.build() { Ok(p) => p, Err(e) => { println!("{sizes:?}: {e}"); return } };
    println!("m={m} p={p} moduli {:?}", par.moduli);
    let mut ctx = HeContext::new(par);
    ctx.keygen().unwrap();
    let vals: Vec<f64> = (0..8).map(|i| (i as f64 * 0.7316 - 2.9) * 1.0123456789).collect();
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 8]), vals.clone()).unwrap();
    let mut t = ctx.encrypt(x.view()).unwrap();
    println!("  fresh {}", ctx.noise_budget(&t).unwrap());
    let mut expect = vals.clone();
    for _ in 0..squares {
        t = match ctx.square(&t) { Ok(s) => s, Err(e) => { println!("  err {e}"); return } };
        expect.iter_mut().for_each(|v| *v = *v * *v);
        let b = ctx.noise_budget(&t).unwrap();
        let err = ctx.decrypt(&t).map(|a| a.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max));
        println!("  square budget {b} maxerr {:?}", err.map_err(|e| e.to_string().chars().take(30).collect::<String>()));
    }
}
fn main() {
    run(2048, 65537, None, 1);
    run(2048, 65537, Some(vec![18, 18, 18]), 1);
    run(2048, 65537, Some(vec![20, 17, 17]), 1);
    run(2048, 257, Some(vec![14, 14, 13, 13]), 1);
    run(4096, 953983721, None, 1);
    run(8192, 953983721, None, 2);
    run(8192, 65537, None, 2);
}
