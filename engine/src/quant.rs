//! bitsandbytes' 4-bit blockwise quantization, the frozen base of QLoRA: NF4 or FP4 codes in
//! blocks of [`BLOCK_SIZE`] values scaled by the block's absolute maximum, optionally with the
//! absmax themselves quantized to 8 bits ("double quantization"). This module owns the code
//! books, the quantizer (run once on the host, at load) and the dequantization (candle tensor
//! ops, so it runs on whatever device holds the weight).
//!
//! What "as bitsandbytes does" means here, where its backends disagree: whet follows its CUDA
//! kernels (`kQuantizeBlockwise*`, `dQuantizeNF4`, `dQuantizeFP4`, `dQuantize`), the path QLoRA
//! trains on. A value is scaled by the f32 reciprocal of its block's absmax and mapped to a code
//! by the kernel's decision tree (`x > threshold` picks the upper code, so an exact tie goes to
//! the lower one; FP4 decides sign and magnitude apart, so its ties go toward zero). An all-zero
//! block scales to NaN and gets code 0 (CUDA's result; bnb's CPU path writes the zero code;
//! both dequantize to 0). The 8-bit absmax codes are the nearest entry of
//! `create_dynamic_map(signed=True)` found by the kernel's binary search (bnb's CPU path uses an
//! approximate 65536-bin table instead, which sometimes picks a neighbour).
//!
//! Layout, as bnb stores it: element i of the flattened (row-major) tensor is in block i / 64;
//! two codes per byte, the even element in the high nibble; an odd count leaves a last low
//! nibble holding the code of 0. The last block may be partial; its absmax is over the values it
//! has. Double quantization subtracts the mean of all absmax (`offset`) and quantizes the rest
//! in blocks of [`ABSMAX_BLOCK_SIZE`], each with its own f32 absmax.

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

/// Values per 4-bit block (bitsandbytes' default, which transformers and PEFT use).
pub const BLOCK_SIZE: usize = 64;
/// Absmax per 8-bit block under double quantization (bnb's `quantize_blockwise(blocksize=256)`).
pub const ABSMAX_BLOCK_SIZE: usize = 256;

/// The 4-bit data type (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// NormalFloat4: the 16 quantiles of a standard normal, normalised to [-1, 1].
    Nf4,
    /// A 4-bit float (1 sign, 2 exponent, 1 mantissa bit), normalised to [-1, 1].
    Fp4,
}

/// NF4, as `get_4bit_type("nf4")`: index = code (bnb's literals, digit for digit, which torch
/// reads as Python floats and rounds to f32).
const NF4: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// `dQuantizeNF4`'s thresholds (its literals, rounded to f32 as a C++ compiler does): the
/// midpoints of adjacent NF4 codes.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// FP4 before normalisation, by bit pattern (`get_4bit_type("fp4")`): 0b0xxx positive,
/// 0b1xxx negative.
const FP4_UNNORMALISED: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// `dQuantizeFP4`'s thresholds on |x| (its literals, which differ from the exact midpoints of
/// the normalised codes by a few ulps) and the magnitude bits each interval gets.
#[allow(clippy::excessive_precision)]
const FP4_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];
const FP4_MAGNITUDES: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

impl QuantType {
    /// `nf4` or `fp4`, as `--bnb_4bit_quant_type` spells them.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(Self::Nf4),
            "fp4" => Some(Self::Fp4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The 16 code values, indexed by the 4-bit code (bnb's `get_4bit_type`, which divides by
    /// the largest magnitude).
    pub fn code(self) -> [f32; 16] {
        match self {
            Self::Nf4 => NF4.map(|v| v as f32),
            Self::Fp4 => FP4_UNNORMALISED.map(|v| v / 12.0),
        }
    }

    /// The 4-bit code of `x`, a value already multiplied by its block's 1 / absmax.
    pub fn index(self, x: f32) -> u8 {
        match self {
            // A balanced tree over sorted thresholds, each `x > t` going right, lands on the
            // number of thresholds below x (0 for NaN, as every comparison fails).
            Self::Nf4 => NF4_THRESHOLDS.iter().map(|&t| u8::from(x > t)).sum(),
            Self::Fp4 => {
                let sign = if x < 0.0 { 0b1000 } else { 0 };
                let above = FP4_THRESHOLDS
                    .iter()
                    .map(|&t| usize::from(x.abs() > t))
                    .sum::<usize>();
                sign | FP4_MAGNITUDES[above]
            }
        }
    }

    /// The largest distance between adjacent code values: a value is at most half of it times
    /// its absmax away from its dequantized code.
    pub fn largest_gap(self) -> f32 {
        let mut code = self.code();
        code.sort_by(f32::total_cmp);
        code.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
    }
}

/// How QLoRA stores the frozen base (`bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantOptions {
    pub quant_type: QuantType,
    pub double_quant: bool,
}

/// bnb's `create_dynamic_map(signed=True)`, the 8-bit code of double quantization: for each
/// exponent i in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)` times 10^(i - 6), both
/// signs, then 0 and 1, sorted (127 negative values, 0, 128 positive values up to 1).
/// Computed in f32 as torch does it — linspace as `start + step * k` for the first half and
/// `end - step * (steps - 1 - k)` for the rest, each a fused multiply-add in torch's vectorised
/// CPU build — so every entry equals bnb's bit for bit.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let linspace = |steps: usize| -> Vec<f32> {
            let (start, end) = (0.1f32, 1.0f32);
            let step = (end - start) / (steps - 1) as f32;
            (0..steps)
                .map(|k| {
                    if k < steps / 2 {
                        step.mul_add(k as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - k) as f32, end)
                    }
                })
                .collect()
        };
        let mut values = Vec::with_capacity(256);
        for i in 0..7 {
            let bounds = linspace((1 << i) + 1);
            let scale = [1e-6f32, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i];
            for pair in bounds.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                values.push(scale * mean);
                values.push(-scale * mean);
            }
        }
        values.push(0.0);
        values.push(1.0);
        values.sort_by(f32::total_cmp);
        values.try_into().expect("the dynamic map has 256 entries")
    })
}

/// The index of the entry of the sorted 256-entry `code` nearest to `x`, by `dQuantize`'s
/// binary search: seven halving steps from the middle, then the midpoint between the last probe
/// and its bracketing neighbour decides (a tie keeps the probe).
fn nearest_of_256(code: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut lower_pivot, mut upper_pivot) = (127usize, 0usize, 255usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut value = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > value {
            lower_pivot = pivot;
            lower = value;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = value;
            pivot -= step;
        }
        value = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let index = if x > value {
        if x > (upper + value) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + value) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    index as u8
}

/// The absolute maximum of each block of `block` values (the last may be short).
fn block_absmax(values: &[f32], block: usize) -> Vec<f32> {
    values
        .chunks(block)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// bnb's `quantize_blockwise` with the dynamic map: the 8-bit code of each value and the f32
/// absmax of each block of `block` values.
pub fn quantize_blockwise_8bit(values: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let code = dynamic_map();
    let absmax = block_absmax(values, block);
    let codes = values
        .chunks(block)
        .zip(&absmax)
        .flat_map(|(chunk, &max)| {
            let inverse = 1.0 / max;
            chunk
                .iter()
                .map(move |&v| nearest_of_256(code, v * inverse))
        })
        .collect();
    (codes, absmax)
}

/// The per-block scales of a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantization: block i's absmax is `dynamic_map[codes[i]] * scales[i / 256] +
    /// offset`.
    Double {
        codes: Vec<u8>,
        scales: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    /// Each block's absmax as dequantization uses it (f32, as bnb computes it).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::F32(values) => values.clone(),
            Absmax::Double {
                codes,
                scales,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * scales[i / ABSMAX_BLOCK_SIZE] + offset)
                    .collect()
            }
        }
    }

    /// Bytes the scales take.
    pub fn bytes(&self) -> usize {
        match self {
            Absmax::F32(values) => 4 * values.len(),
            Absmax::Double { codes, scales, .. } => codes.len() + 4 * scales.len() + 4,
        }
    }
}

/// A 4-bit tensor on the host: what `bitsandbytes.functional.quantize_4bit` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4Bit {
    pub shape: Vec<usize>,
    pub quant_type: QuantType,
    /// Two codes per byte, the even element in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Quantized4Bit {
    /// Quantizes `values` (the flattened tensor of `shape`) in blocks of [`BLOCK_SIZE`].
    pub fn quantize(values: &[f32], shape: &[usize], options: QuantOptions) -> Self {
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "values and shape disagree"
        );
        let quant_type = options.quant_type;
        let absmax = block_absmax(values, BLOCK_SIZE);
        let mut packed = Vec::with_capacity(values.len().div_ceil(2));
        for (chunk, &max) in values.chunks(BLOCK_SIZE).zip(&absmax) {
            let inverse = 1.0 / max;
            // Blocks hold an even count except the last, so pairs never straddle blocks; the
            // kernel pads a short block with zeros, hence the code of 0 * inverse.
            for pair in chunk.chunks(2) {
                let high = quant_type.index(pair[0] * inverse);
                let low = quant_type.index(pair.get(1).copied().unwrap_or(0.0) * inverse);
                packed.push((high << 4) | low);
            }
        }
        let absmax = if options.double_quant {
            // The mean over all blocks, summed in f64 (torch's f32 reduction may differ in the
            // last bit; this one does not depend on the device).
            let offset = (absmax.iter().map(|&a| f64::from(a)).sum::<f64>()
                / absmax.len().max(1) as f64) as f32;
            let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
            let (codes, scales) = quantize_blockwise_8bit(&centered, ABSMAX_BLOCK_SIZE);
            Absmax::Double {
                codes,
                scales,
                offset,
            }
        } else {
            Absmax::F32(absmax)
        };
        Self {
            shape: shape.to_vec(),
            quant_type,
            packed,
            absmax,
        }
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// `code[index] * absmax` in f32 for every element (the reference the tensor form is tested
    /// against).
    pub fn dequantize(&self) -> Vec<f32> {
        let code = self.quant_type.code();
        let absmax = self.absmax.values();
        (0..self.elem_count())
            .map(|i| {
                let byte = self.packed[i / 2];
                let index = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                code[index as usize] * absmax[i / BLOCK_SIZE]
            })
            .collect()
    }

    /// Bytes of the packed codes and the scales.
    pub fn resident_bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }
}

/// Makes [`QuantizedTensor`]s on one device, holding the lookup tables they share.
#[derive(Debug, Clone)]
pub struct Quantizer {
    options: QuantOptions,
    /// (256, 2) f32: byte -> (code of its high nibble, code of its low nibble).
    pairs: Tensor,
    /// (16,) f32: the code book (what the CUDA kernel looks nibbles up in).
    code: Tensor,
    /// (256,) f32: the dynamic map, for double quantization.
    dynamic_map: Tensor,
}

impl Quantizer {
    pub fn new(options: QuantOptions, device: &Device) -> Result<Self> {
        let code = options.quant_type.code();
        let pairs: Vec<f32> = (0..=255u8)
            .flat_map(|b| [code[(b >> 4) as usize], code[(b & 0x0f) as usize]])
            .collect();
        Ok(Self {
            options,
            pairs: Tensor::from_vec(pairs, (256, 2), device)?,
            code: Tensor::from_slice(code.as_slice(), 16, device)?,
            dynamic_map: Tensor::from_slice(dynamic_map(), 256, device)?,
        })
    }

    pub fn options(&self) -> QuantOptions {
        self.options
    }

    /// Quantizes `weight` (any float dtype, any device; its values are read on the host).
    pub fn quantize(&self, weight: &Tensor) -> Result<QuantizedTensor> {
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.upload(&Quantized4Bit::quantize(
            &values,
            weight.dims(),
            self.options,
        ))
    }

    /// The tensor form of `host`, on this quantizer's device.
    pub fn upload(&self, host: &Quantized4Bit) -> Result<QuantizedTensor> {
        let device = self.pairs.device();
        let bytes = host.packed.len();
        let absmax = match &host.absmax {
            Absmax::F32(values) => {
                StoredAbsmax::F32(Tensor::from_slice(values, values.len(), device)?)
            }
            Absmax::Double {
                codes,
                scales,
                offset,
            } => StoredAbsmax::Double {
                codes: Tensor::from_slice(codes, codes.len(), device)?,
                scales: Tensor::from_slice(scales, scales.len(), device)?,
                offset: *offset,
                dynamic_map: self.dynamic_map.clone(),
            },
        };
        Ok(QuantizedTensor {
            shape: host.shape.clone(),
            quant_type: host.quant_type,
            packed: Tensor::from_slice(&host.packed, bytes, device)?,
            absmax,
            resident_bytes: host.resident_bytes(),
            pairs: self.pairs.clone(),
            code: self.code.clone(),
        })
    }
}

/// The scales of a [`QuantizedTensor`], as tensors on its device.
#[derive(Debug, Clone)]
enum StoredAbsmax {
    F32(Tensor),
    Double {
        codes: Tensor,
        scales: Tensor,
        offset: f32,
        dynamic_map: Tensor,
    },
}

/// A 4-bit weight on a device (QLoRA's frozen base linear): packed u8 codes and block scales,
/// dequantized by tensor ops whenever the forward pass needs it.
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    shape: Vec<usize>,
    quant_type: QuantType,
    /// (ceil(n / 2),) u8.
    packed: Tensor,
    absmax: StoredAbsmax,
    resident_bytes: usize,
    /// The quantizer's (256, 2) byte -> codes table and (16,) code book (shared, not counted
    /// as resident).
    pairs: Tensor,
    code: Tensor,
}

/// `values` (n,) padded with zeros to a multiple of `block`, as (n / block, block).
fn blocks(values: Tensor, block: usize) -> Result<Tensor> {
    let n = values.dim(0)?;
    let padded = n.div_ceil(block) * block;
    let values = if padded > n {
        let zeros = Tensor::zeros(padded - n, values.dtype(), values.device())?;
        Tensor::cat(&[&values, &zeros], 0)?
    } else {
        values
    };
    values.reshape((padded / block, block))
}

impl QuantizedTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the packed codes and the block scales (what QLoRA keeps per weight).
    pub fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// Each block's absmax, (blocks,) f32.
    fn absmax(&self) -> Result<Tensor> {
        match &self.absmax {
            StoredAbsmax::F32(absmax) => Ok(absmax.clone()),
            StoredAbsmax::Double {
                codes,
                scales,
                offset,
                dynamic_map,
            } => {
                let count = codes.dim(0)?;
                // (blocks,) codes -> (groups, 256) values * (groups, 1) scales, then + offset.
                let ids = codes.to_dtype(DType::U32)?;
                let values = blocks(dynamic_map.index_select(&ids, 0)?, ABSMAX_BLOCK_SIZE)?;
                let absmax = values.broadcast_mul(&scales.unsqueeze(1)?)?;
                absmax.flatten_all()?.narrow(0, 0, count)? + f64::from(*offset)
            }
        }
    }

    /// The weight in `dtype`: `code[index] * absmax` in f32, then cast (as bnb's kernels do).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        if let Some(values) = self.dequantize_on_gpu(dtype)? {
            return values.reshape(self.shape.as_slice());
        }
        // (bytes,) u8 -> (bytes, 2) codes -> (blocks, 64) * (blocks, 1) absmax. The ids are
        // widened first: candle's index_select reads an id of its type's maximum (0xff in u8)
        // as "no row" and writes zeros.
        let ids = self.packed.to_dtype(DType::U32)?;
        let codes = self.pairs.index_select(&ids, 0)?.flatten_all()?;
        let values = blocks(codes, BLOCK_SIZE)?.broadcast_mul(&self.absmax()?.unsqueeze(1)?)?;
        values
            .flatten_all()?
            .narrow(0, 0, self.elem_count())?
            .reshape(self.shape.as_slice())?
            .to_dtype(dtype)
    }
}

impl QuantizedTensor {
    /// [`dequantize`](Self::dequantize) by whet's CUDA kernel, without the composed form's
    /// (n,) u32 ids and f32 temporaries; None off the GPU.
    fn dequantize_on_gpu(&self, dtype: DType) -> Result<Option<Tensor>> {
        use crate::cuda::{Absmax4Bit, Packed4Bit};
        let absmax = match &self.absmax {
            StoredAbsmax::F32(absmax) => Absmax4Bit::F32(absmax),
            StoredAbsmax::Double {
                codes,
                scales,
                offset,
                dynamic_map,
            } => Absmax4Bit::Double {
                codes,
                dynamic_map,
                scales,
                offset: *offset,
            },
        };
        let packed = Packed4Bit {
            packed: &self.packed,
            code: &self.code,
            absmax,
            elem_count: self.elem_count(),
        };
        crate::cuda::dequantize_4bit(&packed, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NF4_OPTIONS: QuantOptions = QuantOptions {
        quant_type: QuantType::Nf4,
        double_quant: false,
    };
    const FP4_OPTIONS: QuantOptions = QuantOptions {
        quant_type: QuantType::Fp4,
        double_quant: false,
    };

    /// Nibbles of `packed`, high first.
    fn nibbles(packed: &[u8]) -> Vec<u8> {
        packed.iter().flat_map(|b| [b >> 4, b & 0x0f]).collect()
    }

    /// Deterministic values with a spread of magnitudes (splitmix64 -> roughly normal).
    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|i| {
                let (u1, u2) = (uniform().max(1e-12), uniform());
                let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                // Blocks of very different scale, as rows of a trained weight have.
                (normal * 0.02 * (1.0 + (i / 64 % 7) as f64)) as f32
            })
            .collect()
    }

    #[test]
    fn code_books_are_bitsandbytes() {
        let nf4 = QuantType::Nf4.code();
        assert_eq!((nf4[0], nf4[7], nf4[15]), (-1.0, 0.0, 1.0));
        assert!(nf4.windows(2).all(|w| w[0] < w[1]), "NF4 is sorted");
        // The tree's thresholds are the midpoints of adjacent codes, to the last bit or the
        // one next to it (a decimal literal rounded straight to f32, against an f32 sum).
        for (i, t) in NF4_THRESHOLDS.iter().enumerate() {
            let midpoint = (nf4[i] + nf4[i + 1]) / 2.0;
            let ulps = t.to_bits().abs_diff(midpoint.to_bits());
            assert!(ulps <= 1, "threshold {i}: {t} vs {midpoint}");
        }
        let fp4 = QuantType::Fp4.code();
        assert_eq!(
            fp4[..8],
            [
                0.0,
                0.0625 / 12.0,
                8.0 / 12.0,
                1.0,
                4.0 / 12.0,
                0.5,
                2.0 / 12.0,
                0.25
            ]
        );
        for i in 0..8 {
            assert_eq!(fp4[i + 8], -fp4[i], "the sign bit negates");
        }
        assert!(fp4[8].is_sign_negative(), "code 0b1000 is -0.0");
        // NF4's widest step is its first, from -1 to -0.6962.
        assert_eq!(QuantType::Nf4.largest_gap(), nf4[1] - nf4[0]);
        assert_eq!(QuantType::Fp4.largest_gap(), 1.0 - 8.0 / 12.0);
        assert_eq!(QuantType::parse("fp4"), Some(QuantType::Fp4));
        assert_eq!(QuantType::parse("int4"), None);
    }

    #[test]
    fn every_code_value_maps_to_its_own_index() {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for (index, &value) in quant_type.code().iter().enumerate() {
                let got = quant_type.index(value);
                // FP4's -0.0 is also +0.0, which CUDA's sign test (`x < 0`) sends to 0b0000.
                let expected = if quant_type == QuantType::Fp4 && index == 8 {
                    0
                } else {
                    index as u8
                };
                assert_eq!(got, expected, "{quant_type:?} code {index} = {value}");
            }
        }
    }

    #[test]
    fn nf4_of_known_values() {
        // One block of 64 with absmax 2.0 (the last value), so x / absmax is x / 2:
        // 0 -> 0.0 (7); 2.0 -> 1.0 (15); -2.0 -> -1.0 (0); 1.0 -> 0.5: between 0.4407 (12) and
        // 0.5626 (13), below their midpoint 0.50166, so 12; -0.5 -> -0.25: between -0.2844 (4)
        // and -0.1848 (5), below their midpoint -0.23461, so 4.
        // Ties: 2 * 0.0397901 scales to the 7/8 midpoint exactly and goes down to 7; one ulp
        // above it goes up to 8. 2 * -0.8480964 is the 0/1 midpoint: down to 0.
        let tie = 2.0 * NF4_THRESHOLDS[7];
        let mut values = vec![
            0.0,
            2.0,
            -2.0,
            1.0,
            -0.5,
            tie,
            f32::from_bits(tie.to_bits() + 1),
        ];
        values.push(2.0 * NF4_THRESHOLDS[0]);
        values.resize(63, 0.25); // 0.125 -> between 0.0796 (8) and 0.1609 (9): midpoint 0.12026 -> 9
        values.push(2.0);
        let q = Quantized4Bit::quantize(&values, &[64], NF4_OPTIONS);
        assert_eq!(q.absmax, Absmax::F32(vec![2.0]));
        assert_eq!(q.packed.len(), 32);
        assert_eq!(&q.packed[..4], &[0x7f, 0x0c, 0x47, 0x80]);
        assert!(q.packed[4..31].iter().all(|&b| b == 0x99));
        assert_eq!(q.packed[31], 0x9f);
    }

    #[test]
    fn fp4_of_known_values() {
        // absmax 1.2, so x * (1 / 1.2): 1.2 -> 1.0 (0b0011); -0.6 -> -0.5 (0b1101);
        // 0.3 -> 0.25 (0b0111); -0.9 -> -0.75: between 0.6667 and 1 with CUDA's threshold
        // 0.8333: 0.6667 (0b1010); 0.001 -> 0.00083 below 0.0026: zero (0b0000);
        // -0.001 -> sign set, magnitude zero (0b1000); 0.05 -> 0.0417: 0.0052 (0b0001);
        // 0.0 -> 0b0000.
        let values = [1.2f32, -0.6, 0.3, -0.9, 0.001, -0.001, 0.05, 0.0];
        let q = Quantized4Bit::quantize(&values, &[2, 4], FP4_OPTIONS);
        assert_eq!(q.absmax, Absmax::F32(vec![1.2]));
        assert_eq!(nibbles(&q.packed), vec![3, 13, 7, 10, 0, 8, 1, 0]);
        // FP4 ties go toward zero on both signs (sign and magnitude are decided apart).
        let t = FP4_THRESHOLDS[3]; // 0.29166667, between 0.25 and 0.3333
        assert_eq!(QuantType::Fp4.index(t), 0b0111);
        assert_eq!(QuantType::Fp4.index(-t), 0b1111);
    }

    #[test]
    fn partial_blocks_zero_blocks_and_odd_counts() {
        // 64 + 64 zeros + 3: the middle block's absmax is 0, so its values scale to NaN and get
        // code 0 (CUDA), which dequantizes to -1 * 0 = 0; the last block (3 values) has its own
        // absmax and an odd count, so the final low nibble is the code of 0 (NF4: 7).
        let mut values: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 32.0).collect();
        values.extend(std::iter::repeat_n(0.0, 64));
        values.extend([0.5, -0.25, 0.125]);
        let q = Quantized4Bit::quantize(&values, &[131], NF4_OPTIONS);
        assert_eq!(q.packed.len(), 66);
        assert_eq!(q.absmax, Absmax::F32(vec![1.0, 0.0, 0.5]));
        assert!(q.packed[32..64].iter().all(|&b| b == 0x00));
        // 0.5 / 0.5 = 1 (15), -0.25 / 0.5 = -0.5 (between -0.5251 and -0.3949: midpoint
        // -0.45999, so 2), 0.125 / 0.5 = 0.25 (between 0.2461 and 0.3379: 10), pad 7.
        assert_eq!(&q.packed[64..], &[0xf2, 0xa7]);
        let back = q.dequantize();
        assert_eq!(back.len(), 131);
        assert!(back[64..128].iter().all(|&v| v == 0.0));
        assert_eq!(back[128], 0.5);
        let fp4 = Quantized4Bit::quantize(&values, &[131], FP4_OPTIONS);
        assert!(fp4.packed[32..64].iter().all(|&b| b == 0x00));
        assert_eq!(fp4.packed[65] & 0x0f, 0, "FP4's code of 0");
    }

    #[test]
    fn round_trip_error_is_at_most_half_the_largest_gap_times_absmax() {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            let values = sample(64 * 40 + 17, 7);
            let options = QuantOptions {
                quant_type,
                double_quant: false,
            };
            let q = Quantized4Bit::quantize(&values, &[values.len()], options);
            let back = q.dequantize();
            let Absmax::F32(absmax) = &q.absmax else {
                unreachable!()
            };
            let half_gap = quant_type.largest_gap() / 2.0;
            for (i, (v, b)) in values.iter().zip(&back).enumerate() {
                let bound = half_gap * absmax[i / BLOCK_SIZE] * (1.0 + 1e-5);
                assert!((v - b).abs() <= bound, "{quant_type:?} {i}: {v} -> {b}");
            }
            // And the code picked is the nearest one (up to rounding at the midpoints).
            let code = quant_type.code();
            for (i, v) in values.iter().enumerate() {
                let x = v / absmax[i / BLOCK_SIZE];
                let best = code.iter().map(|c| (c - x).abs()).fold(f32::MAX, f32::min);
                let got =
                    (code[quant_type.index(v * (1.0 / absmax[i / BLOCK_SIZE])) as usize] - x).abs();
                assert!(got <= best + 1e-6, "{quant_type:?} {i}");
            }
        }
    }

    #[test]
    fn the_dynamic_map_is_bitsandbytes() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        // i = 0: the midpoint of linspace(0.1, 1, 2), 0.55, times 1e-6.
        assert_eq!(map[128], 0.55f32 * 1e-6f32);
        assert_eq!(map[126], -(0.55f32 * 1e-6f32));
        assert_eq!(map[127], 0.0);
        assert_eq!(map[255], 1.0);
        // i = 6: the last midpoint of linspace(0.1, 1, 65), (1 - 0.9 / 64 + 1) / 2.
        assert_eq!(map[254], 0.992_968_75);
        assert_eq!(map[0], -0.992_968_75);
        // Bit patterns printed by bnb 0.50.2's create_dynamic_map(signed=True).
        let bits = |i: usize| map[i].to_bits();
        assert_eq!(
            [bits(0), bits(126), bits(129), bits(252)],
            [3_212_718_899, 3_037_963_191, 911_874_708, 1_064_763_392]
        );
        // The search finds the nearest entry everywhere but exact midpoints.
        let mut state = 11u64;
        for _ in 0..20_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            let got = (map[nearest_of_256(map, x) as usize] - x).abs();
            let best = map.iter().map(|c| (c - x).abs()).fold(f32::MAX, f32::min);
            assert!(got <= best, "{x}");
        }
        assert_eq!(nearest_of_256(map, 1.0), 255);
        assert_eq!(nearest_of_256(map, -1.0), 0);
        assert_eq!(nearest_of_256(map, 0.0), 127);
        assert_eq!(nearest_of_256(map, f32::NAN), 0);
    }

    #[test]
    fn double_quant_reconstructs_the_absmax_closely() {
        // 300 blocks: two groups of absmax codes (256 + 44).
        let values = sample(64 * 300, 3);
        let options = QuantOptions {
            quant_type: QuantType::Nf4,
            double_quant: true,
        };
        let q = Quantized4Bit::quantize(&values, &[300, 64], options);
        let plain = Quantized4Bit::quantize(&values, &[300, 64], NF4_OPTIONS);
        assert_eq!(q.packed, plain.packed, "the 4-bit codes do not change");
        let Absmax::F32(exact) = &plain.absmax else {
            unreachable!()
        };
        let Absmax::Double {
            codes,
            scales,
            offset,
        } = &q.absmax
        else {
            panic!("{:?}", q.absmax)
        };
        assert_eq!((codes.len(), scales.len()), (300, 2));
        let mean = exact.iter().map(|&a| f64::from(a)).sum::<f64>() / 300.0;
        assert_eq!(*offset, mean as f32);
        // Each reconstructed absmax is within half the dynamic map's largest gap (0.0141) of
        // its group's scale, plus f32 rounding.
        let map = dynamic_map();
        let largest_gap = map.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max);
        for (i, (a, r)) in exact.iter().zip(q.absmax.values()).enumerate() {
            let scale = scales[i / ABSMAX_BLOCK_SIZE];
            assert!(
                (a - r).abs() <= largest_gap / 2.0 * scale + 1e-6 * a,
                "block {i}: {a} -> {r}"
            );
        }
        // So the round trip stays within the 4-bit bound with the absmax error added.
        let back = q.dequantize();
        for (i, (v, b)) in values.iter().zip(&back).enumerate() {
            let block = i / BLOCK_SIZE;
            let absmax_error = largest_gap / 2.0 * scales[block / ABSMAX_BLOCK_SIZE];
            let bound = QuantType::Nf4.largest_gap() / 2.0 * exact[block] + absmax_error;
            assert!((v - b).abs() <= bound * (1.0 + 1e-5), "{i}: {v} -> {b}");
        }
    }

    #[test]
    fn resident_size_is_half_a_byte_per_value_plus_the_scales() {
        let values = sample(64 * 512, 5);
        let plain = Quantized4Bit::quantize(&values, &[256, 128], NF4_OPTIONS);
        assert_eq!(plain.packed.len(), 64 * 512 / 2);
        assert_eq!(plain.absmax.bytes(), 4 * 512);
        assert_eq!(plain.resident_bytes(), 16_384 + 2_048);
        let double = Quantized4Bit::quantize(
            &values,
            &[256, 128],
            QuantOptions {
                quant_type: QuantType::Nf4,
                double_quant: true,
            },
        );
        // One byte per block, an f32 per 256 blocks, and the offset.
        assert_eq!(double.absmax.bytes(), 512 + 2 * 4 + 4);
        // 4.5 bits per value without double quant, about 4.127 with it (QLoRA's figures).
        let bits = |q: &Quantized4Bit| 8.0 * q.resident_bytes() as f64 / values.len() as f64;
        assert_eq!(bits(&plain), 4.5);
        assert!((bits(&double) - 4.127).abs() < 0.01, "{}", bits(&double));
    }

    #[test]
    fn tensor_dequantization_equals_the_host_reference() {
        let device = Device::Cpu;
        for options in [
            NF4_OPTIONS,
            FP4_OPTIONS,
            QuantOptions {
                quant_type: QuantType::Nf4,
                double_quant: true,
            },
        ] {
            let quantizer = Quantizer::new(options, &device).unwrap();
            // 33 x 65 = 2145 values: 34 blocks, the last partial, an odd count.
            let values = sample(33 * 65, 9);
            let weight = Tensor::from_vec(values.clone(), (33, 65), &device).unwrap();
            let q = quantizer.quantize(&weight).unwrap();
            let host = Quantized4Bit::quantize(&values, &[33, 65], options);
            assert_eq!(q.elem_count(), 2145);
            assert_eq!(q.resident_bytes(), host.resident_bytes());
            let back = q.dequantize(DType::F32).unwrap();
            assert_eq!(back.dims(), &[33, 65]);
            let back: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
            let expected = host.dequantize();
            for (i, (a, b)) in back.iter().zip(&expected).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0),
                    "{options:?} {i}: {a} != {b}"
                );
            }
            let bf16 = q.dequantize(DType::BF16).unwrap();
            assert_eq!(bf16.dtype(), DType::BF16);
        }
    }
}
