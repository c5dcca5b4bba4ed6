//! whet's 4-bit quantizer against bitsandbytes' own `quantize_4bit` (its CPU backend, in the
//! reference Python environment): the same packed codes, absmax and double-quantization state
//! for NF4 and FP4 on a weight with a partial last block and more than 256 blocks.
//!
//! bnb's CPU backend differs from its CUDA kernels, which whet follows, in two places that this
//! test allows for and nowhere else: at decision boundaries (f32 midpoints against the kernel's
//! literal thresholds, a few ulps apart) and in the 8-bit absmax codes (an approximate lookup
//! table instead of the kernel's exact nearest-code search).

#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;

use whet_engine::quant::{dynamic_map, Absmax, QuantOptions, QuantType, Quantized4Bit};

const SCRIPT: &str = r#"
import json, sys
import numpy as np, torch
import bitsandbytes.functional as F
rows, cols = int(sys.argv[2]), int(sys.argv[3])
A = torch.from_numpy(np.fromfile(sys.argv[1], dtype="<f4").reshape(rows, cols))
bits = lambda t: t.detach().float().contiguous().numpy().view(np.uint32).ravel().tolist()
out = {"dynamic_map": bits(F.create_dynamic_map(signed=True))}
for quant_type in ["nf4", "fp4"]:
    for double in [False, True]:
        packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=double)
        case = {"packed": packed.flatten().tolist(), "dequantized": bits(F.dequantize_4bit(packed, state))}
        if double:
            case["codes"] = state.absmax.flatten().tolist()
            case["scales"] = bits(state.state2.absmax)
            case["offset"] = bits(state.offset.reshape(1))[0]
        else:
            case["absmax"] = bits(state.absmax)
        out[f"{quant_type}-{double}"] = case
print(json.dumps(out))
"#;

/// A weight whose rows have different scales, with no all-zero block.
fn weight(rows: usize, cols: usize) -> Vec<f32> {
    let mut state = 42u64;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..rows * cols)
        .map(|i| {
            let (u1, u2) = (uniform().max(1e-12), uniform());
            let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (normal * 0.03 * (1.0 + (i / cols % 5) as f64)) as f32
        })
        .collect()
}

fn u32s(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn u8s(value: &serde_json::Value) -> Vec<u8> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect()
}

fn floats(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

#[test]
fn quantizer_matches_bitsandbytes() {
    let python = match prerequisites::reference_python_with("bitsandbytes") {
        Ok(python) => python,
        Err(why) => return prerequisites::skip("quantizer_matches_bitsandbytes", &why),
    };
    // 130 x 129 = 16770 values: 263 blocks of 64 (the last holds 2), two groups of absmax.
    let (rows, cols) = (130, 129);
    let values = weight(rows, cols);
    let path = std::env::temp_dir().join(format!("whet-quant-{}.f32", std::process::id()));
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    let output = std::process::Command::new(&python)
        .args(["-c", SCRIPT, path.to_str().unwrap()])
        .args([rows.to_string(), cols.to_string()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "bitsandbytes failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bnb: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let map_bits: Vec<u32> = dynamic_map().iter().map(|v| v.to_bits()).collect();
    assert_eq!(map_bits, u32s(&bnb["dynamic_map"]), "create_dynamic_map");

    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        let code = quant_type.code();
        for double_quant in [false, true] {
            let python_bool = if double_quant { "True" } else { "False" };
            let case = &bnb[format!("{}-{python_bool}", quant_type.name())];
            let options = QuantOptions {
                quant_type,
                double_quant,
            };
            let ours = Quantized4Bit::quantize(&values, &[rows, cols], options);
            let plain = Quantized4Bit::quantize(
                &values,
                &[rows, cols],
                QuantOptions {
                    double_quant: false,
                    ..options
                },
            );
            let Absmax::F32(absmax) = &plain.absmax else {
                unreachable!()
            };

            // The 4-bit codes: equal, except where the scaled value sits on a boundary (both
            // codes equally near to within rounding).
            let theirs = u8s(&case["packed"]);
            assert_eq!(ours.packed.len(), theirs.len());
            let mut boundary = 0;
            for (i, v) in values.iter().enumerate() {
                let nibble = |p: &[u8]| {
                    let b = p[i / 2];
                    if i % 2 == 0 {
                        b >> 4
                    } else {
                        b & 0x0f
                    }
                };
                let (a, b) = (nibble(&ours.packed), nibble(&theirs));
                // FP4 has +0 and -0 (CUDA gives a tiny negative value the sign bit).
                if code[a as usize] != code[b as usize] {
                    let x = v / absmax[i / 64];
                    let gap = (code[a as usize] - x).abs() - (code[b as usize] - x).abs();
                    assert!(
                        gap.abs() < 2e-6,
                        "{options:?} element {i}: {v} -> ours {a}, bnb {b}"
                    );
                    boundary += 1;
                }
            }
            assert!(boundary <= 2, "{options:?}: {boundary} boundary cases");

            if double_quant {
                let Absmax::Double {
                    codes,
                    scales,
                    offset,
                } = &ours.absmax
                else {
                    panic!("{options:?}: no double quantization")
                };
                let their_offset = f32::from_bits(case["offset"].as_u64().unwrap() as u32);
                assert!(
                    (offset - their_offset).abs() <= 1e-6 * offset.abs(),
                    "offset {offset} vs {their_offset}"
                );
                let their_scales = floats(&u32s(&case["scales"]));
                assert_eq!(scales.len(), their_scales.len());
                for (a, b) in scales.iter().zip(&their_scales) {
                    assert!((a - b).abs() <= 1e-6 * a.abs(), "scale {a} vs {b}");
                }
                // Ours is the nearest code; bnb's CPU table sometimes picks a neighbour.
                let their_codes = u8s(&case["codes"]);
                let map = dynamic_map();
                let mut differ = 0;
                for (i, (&a, &b)) in codes.iter().zip(&their_codes).enumerate() {
                    if a != b {
                        let y = (absmax[i] - offset) / scales[i / 256];
                        let (ours_off, theirs_off) =
                            ((map[a as usize] - y).abs(), (map[b as usize] - y).abs());
                        assert!(ours_off <= theirs_off + 1e-6, "absmax code {i}");
                        differ += 1;
                    }
                }
                assert!(
                    differ <= codes.len() / 50,
                    "{differ} of {} absmax codes differ",
                    codes.len()
                );
            } else {
                let their_absmax = u32s(&case["absmax"]);
                let our_absmax: Vec<u32> = absmax.iter().map(|a| a.to_bits()).collect();
                assert_eq!(our_absmax, their_absmax, "{options:?}: absmax");
                // With the same codes and absmax, dequantization is the same to the bit.
                let theirs = floats(&u32s(&case["dequantized"]));
                let back = ours.dequantize();
                let same = back
                    .iter()
                    .zip(&theirs)
                    .filter(|(a, b)| a.to_bits() == b.to_bits() || (**a == 0.0 && **b == 0.0))
                    .count();
                assert!(same + boundary >= back.len(), "{options:?}: dequantized");
            }
        }
    }
}
