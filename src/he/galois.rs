//! Rotation (Galois) keys: which column-rotation steps a context can apply,
//! per ciphertext level. fhe.rs's key switching has no special prime, so a
//! rotation adds a fixed amount of noise (≈ 2^65 at n=8192); keys are made
//! for the level the ciphertexts are at when they are rotated, and a model
//! asks for the (level, steps) it needs. A missing step is an error that
//! names it. Step m/2 is not a column rotation (those are 1..m/2) but the
//! swap of the two SIMD rows.

use std::sync::Arc;

use fhe::bfv::{BfvParameters, Ciphertext, EvaluationKey, EvaluationKeyBuilder, SecretKey};
use fhe_traits::Serialize as FheSerialize;

use super::error::{HeError, Result};

/// The rotation steps wanted at one ciphertext level.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RotationNeed {
    /// The ciphertext level the rotated ciphertexts are at.
    pub level: usize,
    /// Column-rotation steps (slot s+k moves to slot s), each in 1..m/2;
    /// m/2 swaps the two rows.
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
    if let Some(bad) = need.steps.iter().find(|&&s| s == 0 || s > half) {
        return Err(HeError::Parameter(format!(
            "rotation step {bad} is outside 1..{half} (m/2; m/2 swaps the rows)"
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
                if s == par.degree() / 2 {
                    b.enable_row_rotation()?;
                } else {
                    b.enable_column_rotation(s)?;
                }
            }
            levels.push(LevelKey {
                level: need.level,
                steps,
                key: b.build(&mut rng)?,
            });
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
            let half = par.degree() / 2;
            let holds = |s: usize| {
                if s == half {
                    key.supports_row_rotation()
                } else {
                    key.supports_column_rotation_by(s)
                }
            };
            if let Some(s) = steps.iter().find(|&&s| !holds(s)) {
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
            levels.push(LevelKey { level, steps, key });
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

    /// Rotates `ct` (at `level`) by `step` columns (m/2: swaps the rows),
    /// or says which key is missing.
    pub fn rotate(&self, ct: &Ciphertext, level: usize, step: usize) -> Result<Ciphertext> {
        let l = self
            .levels
            .iter()
            .find(|l| l.level == level && l.steps.contains(&step))
            .ok_or_else(|| missing(level, step))?;
        if step == ct[0].coefficients().ncols() / 2 {
            return Ok(l.key.rotates_rows(ct)?);
        }
        Ok(l.key.rotates_columns_by(ct, step)?)
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
        assert!(rot.rotate(ct, 0, 1).is_ok());
        match rot.rotate(ct, 0, 2) {
            Err(HeError::Value(m)) => assert!(m.contains("step 2") && m.contains("level 0"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Steps outside 1..=m/2 and levels without room are refused when generating.
        assert!(ctx
            .rotation_keygen(&[RotationNeed::at(0, vec![2049])])
            .is_err());
        // Step m/2 is the row swap: generated, carried by the public context, applied.
        ctx.rotation_keygen(&[RotationNeed::at(0, vec![1, 2048])])
            .unwrap();
        let server = context_from_bytes(&public_context_to_bytes(&ctx).unwrap(), false).unwrap();
        let rot = &server.keys().unwrap().rotations[1];
        assert!(rot.supports(0, 2048));
        assert!(rot.rotate(ct, 0, 2048).is_ok());
        assert!(ctx
            .rotation_keygen(&[RotationNeed::at(5, vec![1])])
            .is_err());
        assert_eq!(
            power_of_two_needs(2048)[0].steps,
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
        );
    }
}
