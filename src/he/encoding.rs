//! Number encodings: the seed's fractional encoding (coefficients of one
//! polynomial) and the batch encoding's fixed point (one integer per slot).
//! See ../shared/notes/fractional-encoding.md for the specification.

use super::error::{HeError, Result};

/// Digits of `v` in the fractional encoding as centred integer coefficients of
/// a length-`m` polynomial. Errors if the integer part needs more than
/// `int_digits` digits or `v` is not finite.
pub fn fractional_encode(
    v: f64,
    m: usize,
    base: u32,
    int_digits: usize,
    frac_digits: usize,
) -> Result<Vec<i64>> {
    if !v.is_finite() {
        return Err(HeError::Value(format!(
            "cannot encode {v}: only finite numbers"
        )));
    }
    let b = base as f64;
    let sign: i64 = if v < 0.0 { -1 } else { 1 };
    let a = v.abs();
    let mut n = a.floor();
    let mut f = a - n;
    let mut c = vec![0i64; m];
    let mut i = 0;
    while n >= 1.0 {
        if i >= int_digits {
            return Err(HeError::PlaintextOverflow {
                message: format!(
                    "{v} needs more than int_digits={int_digits} base-{base} integer digits"
                ),
                bound: v.abs(),
                limit: (base as f64).powi(int_digits as i32),
            });
        }
        let d = n % b;
        c[i] = sign * d as i64;
        n = ((n - d) / b).floor();
        i += 1;
    }
    for i in 1..=frac_digits {
        if f == 0.0 {
            break;
        }
        f *= b;
        let d = f.floor();
        f -= d;
        c[m - i] = -sign * d as i64;
    }
    Ok(c)
}

/// Value of centred coefficients in the fractional encoding.
pub fn fractional_decode(c: &[i64], base: u32) -> f64 {
    let m = c.len();
    let b = base as f64;
    let mut v = 0.0;
    for (i, &ci) in c.iter().enumerate() {
        if ci == 0 {
            continue;
        }
        if i < m / 2 {
            v += ci as f64 * b.powi(i as i32);
        } else {
            v -= ci as f64 * b.powi(-((m - i) as i32));
        }
    }
    v
}

/// Centres `x` mod `p` into (-p/2, p/2].
pub fn centre(x: u64, p: u64) -> i64 {
    if x > p / 2 {
        -((p - x) as i64)
    } else {
        x as i64
    }
}

/// Reduces a signed integer into [0, p).
pub fn reduce_i128(x: i128, p: u64) -> u64 {
    x.rem_euclid(p as i128) as u64
}

/// CRT reconstruction of residues (one per modulus) into the centred integer
/// modulo the product of the moduli (product below 2^121).
pub fn crt_centred(residues: &[u64], moduli: &[u64]) -> i128 {
    if moduli.len() == 1 {
        return centre(residues[0], moduli[0]) as i128;
    }
    // Garner's algorithm with u128 arithmetic.
    let big: u128 = moduli.iter().map(|&m| m as u128).product();
    let mut x: u128 = 0;
    let mut prod: u128 = 1;
    for (&r, &m) in residues.iter().zip(moduli) {
        let mm = m as u128;
        let cur = x % mm;
        let diff = (r as u128 + mm - cur) % mm;
        let inv = mod_inverse((prod % mm) as u64, m) as u128;
        let t = mulmod_u128(diff, inv, mm);
        x += t * prod;
        prod *= mm;
    }
    if x > big / 2 {
        x as i128 - big as i128
    } else {
        x as i128
    }
}

fn mulmod_u128(a: u128, b: u128, m: u128) -> u128 {
    // m < 2^62 here, so a, b < 2^62 and the product fits in u128.
    (a % m) * (b % m) % m
}

fn mod_inverse(a: u64, m: u64) -> u64 {
    let (mut t, mut new_t) = (0i128, 1i128);
    let (mut r, mut new_r) = (m as i128, a as i128);
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    t.rem_euclid(m as i128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_examples() {
        let m = 2048;
        let c = fractional_encode(1.25, m, 2, 64, 32).unwrap();
        assert_eq!(c[0], 1);
        assert_eq!(c[2046], -1);
        assert_eq!(c.iter().filter(|&&x| x != 0).count(), 2);
        let c = fractional_encode(-3.5, m, 2, 64, 32).unwrap();
        assert_eq!((c[0], c[1], c[2047]), (-1, -1, 1));
        assert_eq!(fractional_decode(&c, 2), -3.5);
        let c = fractional_encode(0.1, m, 2, 64, 32).unwrap();
        assert_eq!((c[2044], c[2043], c[2040], c[2039]), (-1, -1, -1, -1));
        assert!((fractional_decode(&c, 2) - 0.1).abs() < 2f64.powi(-32));
        assert!(fractional_encode(2f64.powi(70), m, 2, 64, 32).is_err());
        assert!(fractional_encode(f64::NAN, m, 2, 64, 32).is_err());
    }

    #[test]
    fn crt_roundtrip() {
        let moduli = [65537u64, 114689, 786433];
        for x in [-123456789012i128, -1, 0, 5, 987654321098] {
            let r: Vec<u64> = moduli.iter().map(|&m| reduce_i128(x, m)).collect();
            assert_eq!(crt_centred(&r, &moduli), x);
        }
    }
}
