//! The GPU check of whet's opt-in CUDA kernels (`WHET_CUDA_KERNELS=1`): every kernel against
//! the composed candle form of the same function, on the GPU, forward and backward, in f32
//! and bf16. Inputs are random with a fresh seed each run (printed; `WHET_KERNEL_SEED=N`
//! repeats one), the kernels' outputs start as NaN (poison), and the reference is the composed
//! form in f32 from the same (bf16-rounded) inputs.
//!
//! One line per check, `KERNEL <name> <dtype> PASS|FAIL <errors>`, then a summary; the exit
//! status is 0 only when every check passed. Without a usable GPU it fails: there is nothing
//! to check here without one. Built only with `--features cuda` (`required-features`), and
//! not part of `cargo xtask test`'s GPU-free CUDA tests; the GPU bundle's run.sh runs it
//! first.

use std::process::ExitCode;

use candle_core::{DType, Device, Result, Tensor, Var};
use whet_engine::cuda;
use whet_engine::ops;
use whet_engine::rng::SplitMix64;

/// Largest error relative to the reference's largest magnitude that passes.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 3e-2,
        _ => 2e-4,
    }
}

/// `max |a − b| / max |b|` (NaN anywhere gives NaN, which fails every comparison).
fn relative_error(a: &Tensor, reference: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?;
    if a.dims() != b.dims() {
        candle_core::bail!("shapes {:?} and {:?}", a.shape(), b.shape());
    }
    let diff = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
    let nan = a
        .ne(&a)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(if nan > 0 { f64::NAN } else { diff / scale })
}

struct Check {
    device: Device,
    rng: SplitMix64,
    failures: Vec<String>,
    passed: usize,
}

/// One run of a function: its output (f32) and the gradients of a random projection of it
/// with respect to each input (f32).
struct Outcome {
    output: Tensor,
    grads: Vec<Tensor>,
}

impl Check {
    /// Uniform values in [-scale, scale) on the host.
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) as f32)
            .map(|u| (2.0 * u - 1.0) * scale)
            .collect()
    }

    fn random(&mut self, shape: &[usize], scale: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.values(n, scale), shape, &Device::Cpu)
    }

    /// Runs `f` on `inputs` (host f32) moved to the GPU in `dtype` (inputs flagged false in
    /// `keep_f32` stay f32), with the kernels on or off; the output is projected on
    /// `projection` and differentiated.
    fn run(
        &self,
        inputs: &[Tensor],
        keep_f32: &[bool],
        dtype: DType,
        projection: &Tensor,
        kernels: bool,
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Outcome> {
        cuda::set_kernels_enabled(kernels);
        cuda::set_poison_outputs(kernels);
        let vars = inputs
            .iter()
            .zip(keep_f32)
            .map(|(t, &f32_only)| {
                let t = t.to_device(&self.device)?;
                Var::from_tensor(&if f32_only { t } else { t.to_dtype(dtype)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let output = f(&tensors)?.to_dtype(DType::F32)?;
        let projected = (output.flatten_all()? * projection.to_device(&self.device)?)?.sum_all()?;
        let grads = projected.backward()?;
        let grads = vars
            .iter()
            .map(|v| {
                grads
                    .get(v)
                    .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))?
                    .to_dtype(DType::F32)
            })
            .collect::<Result<Vec<_>>>()?;
        cuda::set_poison_outputs(false);
        Ok(Outcome { output, grads })
    }

    /// Compares `f` with the kernels on (in `dtype`) against the composed form in f32 from the
    /// same inputs rounded to `dtype`, and prints the line.
    fn compare(
        &mut self,
        name: &str,
        dtype: DType,
        inputs: &[Tensor],
        keep_f32: &[bool],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let outcome = (|| -> Result<(f64, Vec<f64>)> {
            // The inputs as the kernel sees them, so the reference starts from the same values.
            let rounded = inputs
                .iter()
                .zip(keep_f32)
                .map(|(t, &f32_only)| {
                    if f32_only {
                        Ok(t.clone())
                    } else {
                        t.to_dtype(dtype)?.to_dtype(DType::F32)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let size = f(&rounded
                .iter()
                .map(|t| t.to_device(&self.device))
                .collect::<Result<Vec<_>>>()?)?
            .elem_count();
            let projection = self.random(&[size], 1.0)?;
            let kernel = self.run(&rounded, keep_f32, dtype, &projection, true, f)?;
            let reference = self.run(&rounded, keep_f32, DType::F32, &projection, false, f)?;
            let forward = relative_error(&kernel.output, &reference.output)?;
            let backward = kernel
                .grads
                .iter()
                .zip(&reference.grads)
                .map(|(a, b)| relative_error(a, b))
                .collect::<Result<Vec<_>>>()?;
            Ok((forward, backward))
        })();
        let tol = tolerance(dtype);
        let line = match outcome {
            Ok((forward, backward)) => {
                let ok = forward < tol && backward.iter().all(|e| *e < tol);
                let grads: Vec<String> = backward.iter().map(|e| format!("{e:.2e}")).collect();
                format!(
                    "{} fwd={forward:.2e} bwd=[{}] tol={tol:.0e}",
                    if ok { "PASS" } else { "FAIL" },
                    grads.join(",")
                )
            }
            Err(e) => format!("FAIL error: {e}"),
        };
        self.record(name, dtype, line);
    }

    fn record(&mut self, name: &str, dtype: DType, line: String) {
        println!("KERNEL {name} {} {line}", dtype.as_str());
        if line.starts_with("PASS") {
            self.passed += 1;
        } else {
            self.failures.push(format!("{name} {}", dtype.as_str()));
        }
    }
}

/// (batch, seq) mask: sequence 0 wholly real; sequence 1 left-padded (its first rows see no
/// key, the uniform-average case) with a padded key inside too.
fn padded_mask(batch: usize, seq: usize) -> Result<Tensor> {
    let mut mask = vec![1u32; batch * seq];
    if batch > 1 {
        mask[seq..seq + 5].fill(0);
        mask[seq + seq / 2] = 0;
    }
    Tensor::from_vec(mask, (batch, seq), &Device::Cpu)
}

fn check_attention(c: &mut Check, dtype: DType, head_dim: usize) -> Result<()> {
    let (batch, heads, kv_heads, seq) = (2, 4, 2, 100);
    let q = c.random(&[batch, heads, seq, head_dim], 1.0)?;
    let k = c.random(&[batch, kv_heads, seq, head_dim], 1.0)?;
    let v = c.random(&[batch, kv_heads, seq, head_dim], 1.0)?;
    let mask = ops::AttentionMask::new(&padded_mask(batch, seq)?.to_device(&c.device)?)?;
    c.compare(
        &format!("attention_hd{head_dim}"),
        dtype,
        &[q, k, v],
        &[false; 3],
        &|t| ops::causal_attention(&t[0], &t[1], &t[2], &mask),
    );
    Ok(())
}

fn check_norms(c: &mut Check, dtype: DType) -> Result<()> {
    let x = c.random(&[3, 77, 1024], 2.0)?;
    let w = c.random(&[1024], 1.0)?;
    c.compare("rms_norm", dtype, &[x, w], &[false; 2], &|t| {
        ops::rms_norm(&t[0], &t[1], 1e-6)
    });
    // The q/k norms' shape: rows of head_dim.
    let x = c.random(&[2, 50, 4, 128], 2.0)?;
    let w = c.random(&[128], 1.0)?;
    c.compare("rms_norm_qk", dtype, &[x, w], &[false; 2], &|t| {
        ops::rms_norm(&t[0], &t[1], 1e-6)
    });
    let x = c.random(&[2, 90, 1024], 1.0)?;
    let residual = c.random(&[2, 90, 1024], 1.0)?;
    let w = c.random(&[1024], 1.0)?;
    c.compare(
        "add_rms_norm",
        dtype,
        &[x, residual, w],
        &[false; 3],
        &|t| {
            let (sum, normed) = ops::add_rms_norm(&t[0], &t[1], &t[2], 1e-6)?;
            Tensor::cat(&[&sum, &normed], 0)
        },
    );
    Ok(())
}

fn check_elementwise(c: &mut Check, dtype: DType) -> Result<()> {
    let x = c.random(&[2, 4, 100, 128], 1.0)?;
    let rope = ops::RotaryEmbedding::new(128, 1_000_000.0, 100, &c.device)?;
    c.compare("rope", dtype, &[x], &[false], &|t| rope.apply(&t[0]));
    let gate = c.random(&[3, 70, 600], 4.0)?;
    let up = c.random(&[3, 70, 600], 1.0)?;
    c.compare("swiglu", dtype, &[gate, up], &[false; 2], &|t| {
        ops::swiglu(&t[0], &t[1])
    });
    Ok(())
}

fn check_embedding(c: &mut Check, dtype: DType) -> Result<()> {
    let (vocab, hidden) = (500, 64);
    let table = c.random(&[vocab, hidden], 1.0)?;
    // Repeated ids: the backward's atomics add into the same rows.
    let ids: Vec<u32> = (0..2 * 300)
        .map(|_| c.rng.below(vocab as u64 / 4) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (2, 300), &c.device)?;
    // The table is the f32 master, as a trainable embedding is; the rows come out in dtype.
    c.compare("embedding", dtype, &[table], &[true], &|t| {
        ops::embedding(&t[0], &ids, dtype)
    });
    Ok(())
}

fn check_head_loss(c: &mut Check, dtype: DType) -> Result<()> {
    // Qwen3's vocabulary, so the rows go through the kernel in more than one chunk.
    let (batch, seq, hidden, vocab) = (2, 2048, 128, 151_936);
    let x = c.random(&[batch, seq, hidden], 1.0)?;
    let w = c.random(&[vocab, hidden], 0.5)?;
    let mut labels: Vec<i64> = (0..batch * seq)
        .map(|_| c.rng.below(vocab as u64) as i64)
        .collect();
    labels[10..40].fill(ops::IGNORE_INDEX);
    let labels = Tensor::from_vec(labels, (batch, seq), &c.device)?;
    c.compare("head_loss", dtype, &[x, w], &[false; 2], &|t| {
        Ok(ops::head_loss(&t[0], &t[1], &labels, true)?.ce.sum)
    });
    Ok(())
}

fn check_grouped_matmul(c: &mut Check, dtype: DType) -> Result<()> {
    let (rows, k, experts, n, top_k) = (300, 96, 8, 80, 2);
    // The last expert gets no rows: its weight gradient must come out zero.
    let chosen: Vec<u32> = (0..rows * top_k)
        .map(|i| ((i as u64 * 7 + c.rng.below(5)) % (experts as u64 - 1)) as u32)
        .collect();
    let chosen = Tensor::from_vec(chosen, (rows, top_k), &c.device)?;
    let groups = cuda::moe_groups(&chosen, experts)?
        .ok_or_else(|| candle_core::Error::Msg("moe_groups did not run".into()))?;
    // The grouping equals train.cu's (host-synchronised) one, pick for pick.
    let host = cuda::group_by_expert(&chosen, experts)?
        .ok_or_else(|| candle_core::Error::Msg("group_by_expert did not run".into()))?;
    let same = groups.rows.to_vec1::<u32>()? == host.rows.to_vec1::<u32>()?
        && groups.slots.to_vec1::<u32>()? == host.slots.to_vec1::<u32>()?;
    c.record(
        "moe_groups",
        DType::U32,
        if same {
            "PASS rows and slots equal group_by_expert's".into()
        } else {
            "FAIL rows or slots differ".into()
        },
    );
    let counts = host.counts.clone();
    let x = c.random(&[rows * top_k, k], 1.0)?;
    let w = c.random(&[experts, n, k], 0.5)?;
    c.compare("grouped_matmul", dtype, &[x, w], &[false; 2], &|t| {
        if cuda::kernels_enabled() {
            return cuda::grouped_matmul(&t[0], &t[1], &groups)?
                .ok_or_else(|| candle_core::Error::Msg("grouped_matmul did not run".into()));
        }
        // Composed: each expert's block of rows times its matrix.
        let mut at = 0;
        let mut blocks = Vec::new();
        for (e, &count) in counts.iter().enumerate() {
            if count > 0 {
                blocks.push(t[0].narrow(0, at, count)?.matmul(&t[1].get(e)?.t()?)?);
            }
            at += count;
        }
        // The unused expert's slice of the stacked gradient stays zero, as the kernel's.
        Tensor::cat(&blocks, 0)
    });
    Ok(())
}

fn check_optimizer(c: &mut Check) -> Result<()> {
    let sizes = [1000, 70_000, 3, (1 << 17) + 5];
    let make = |c: &mut Check, n: usize, scale: f32| -> Result<Tensor> {
        c.random(&[n], scale)?.to_device(&c.device)
    };
    let mut params = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let grad = if i == 2 { None } else { Some(make(c, n, 1.0)?) };
        let exp_avg_sq = make(c, n, 1.0)?.abs()?;
        params.push((
            make(c, n, 1.0)?,
            grad,
            make(c, n, 0.1)?,
            exp_avg_sq,
            i % 2 == 0,
        ));
    }
    let scalars = cuda::AdamWScalars {
        decay: Some(0.999),
        one_minus_beta1: 0.1,
        beta2: 0.999,
        one_minus_beta2: 0.001,
        bias_correction2_sqrt: 0.3,
        eps: 1e-8,
        neg_step_size: -1e-3,
    };
    // The reference: the single-tensor kernel, which hf_parity holds to the CPU's update.
    let mut expected = Vec::new();
    for (p, g, m, v, decay) in &params {
        let s = cuda::AdamWScalars {
            decay: decay.then_some(0.999),
            ..scalars
        };
        expected.push(
            cuda::adamw(p, g.as_ref(), m, v, &s)?
                .ok_or_else(|| candle_core::Error::Msg("adamw did not run".into()))?,
        );
    }
    let copies = params
        .iter()
        .map(|(p, g, m, v, d)| Ok((p.copy()?, g.clone(), m.copy()?, v.copy()?, *d)))
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<cuda::AdamWTensors> = copies
        .iter()
        .map(|(p, g, m, v, d)| cuda::AdamWTensors {
            param: p,
            grad: g.as_ref(),
            exp_avg: m,
            exp_avg_sq: v,
            decay: *d,
        })
        .collect();
    cuda::adamw_multi(&tensors, &scalars)?;
    let mut identical = true;
    for ((p, _, m, v, _), (ep, em, ev)) in copies.iter().zip(&expected) {
        for (a, b) in [(p, ep), (m, em), (v, ev)] {
            identical &= a.to_vec1::<f32>()? == b.to_vec1::<f32>()?;
        }
    }
    c.record(
        "adamw_multi",
        DType::F32,
        if identical {
            "PASS bit-identical to adamw_f32".into()
        } else {
            "FAIL differs from adamw_f32".into()
        },
    );
    let grads: Vec<&Tensor> = params.iter().filter_map(|p| p.1.as_ref()).collect();
    let multi = cuda::sum_of_squares_multi(&grads)?
        .ok_or_else(|| candle_core::Error::Msg("sum_of_squares_multi did not run".into()))?
        .to_scalar::<f64>()?;
    let mut single = 0.0;
    for g in &grads {
        single += cuda::sum_of_squares(g)?
            .ok_or_else(|| candle_core::Error::Msg("sum_of_squares did not run".into()))?
            .to_scalar::<f64>()?;
    }
    let err = (multi - single).abs() / single.abs().max(1e-300);
    c.record(
        "sum_of_squares_multi",
        DType::F64,
        format!(
            "{} rel={err:.2e} tol=1e-12",
            if err < 1e-12 { "PASS" } else { "FAIL" }
        ),
    );
    Ok(())
}

fn main() -> ExitCode {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            println!("KERNEL all - FAIL no usable CUDA device: {e}");
            eprintln!("cuda_kernels checks whet's CUDA kernels on a GPU and needs one ({e}).");
            return ExitCode::FAILURE;
        }
    };
    let seed = std::env::var("WHET_KERNEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("seed {seed} (WHET_KERNEL_SEED={seed} repeats this run)");
    let mut c = Check {
        device,
        rng: SplitMix64::new(seed),
        failures: Vec::new(),
        passed: 0,
    };
    type Group = fn(&mut Check, DType) -> Result<()>;
    let groups: [(&str, Group); 7] = [
        ("attention_hd64", |c, d| check_attention(c, d, 64)),
        ("attention_hd128", |c, d| check_attention(c, d, 128)),
        ("norms", check_norms),
        ("elementwise", check_elementwise),
        ("embedding", check_embedding),
        ("head_loss", check_head_loss),
        ("grouped_matmul", check_grouped_matmul),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (name, group) in groups {
            if let Err(e) = group(&mut c, dtype) {
                c.record(name, dtype, format!("FAIL setup: {e}"));
            }
        }
    }
    if let Err(e) = check_optimizer(&mut c) {
        c.record("adamw_multi", DType::F32, format!("FAIL setup: {e}"));
    }
    cuda::set_kernels_enabled(false);
    println!(
        "kernels: {} passed, {} failed{}",
        c.passed,
        c.failures.len(),
        if c.failures.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.failures.join(", "))
        }
    );
    if c.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
