//! OpenBLAS's `cblas_sgemm` for the fused ops' f32 products, where it beats the `gemm`
//! crate: on CPUs without AVX-512 (measured in BENCHMARKS.md). It is Debian's single-threaded
//! build, linked statically (engine/build.rs); a product on rayon's pool is split into row
//! (or column) blocks, one call per block, so no second thread pool competes with rayon's.

use std::sync::atomic::{AtomicU8, Ordering};

#[allow(non_camel_case_types)]
type blasint = i32;
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn cblas_sgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: blasint,
        n: blasint,
        k: blasint,
        alpha: f32,
        a: *const f32,
        lda: blasint,
        b: *const f32,
        ldb: blasint,
        beta: f32,
        c: *mut f32,
        ldc: blasint,
    );
    fn openblas_get_config() -> *const std::ffi::c_char;
    fn openblas_get_corename() -> *const std::ffi::c_char;
}

/// Which library computes the fused ops' f32 products (`whet bench train --matmul`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Matmul {
    /// OpenBLAS where `gemm` has no AVX-512 kernel for this CPU, else `gemm`: the faster of
    /// the two on each machine kind measured.
    Auto,
    Gemm,
    #[value(name = "openblas")]
    OpenBlas,
}

static CHOICE: AtomicU8 = AtomicU8::new(Matmul::Auto as u8);

/// Sets the matmul library for the whole process.
pub fn set_matmul(choice: Matmul) {
    CHOICE.store(choice as u8, Ordering::Relaxed);
}

/// Whether the fused ops' f32 products go to OpenBLAS.
pub fn openblas_on() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        c if c == Matmul::Gemm as u8 => false,
        c if c == Matmul::OpenBlas as u8 => true,
        _ => !crate::host::gemm_has_avx512(),
    }
}

/// OpenBLAS's build line and the kernels it picked for this CPU, e.g. `OpenBLAS 0.3.21
/// DYNAMIC_ARCH NO_AFFINITY Zen SINGLE_THREADED (Zen)`.
pub fn openblas_version() -> String {
    // SAFETY: both return static NUL-terminated strings.
    let (config, core) = unsafe {
        (
            std::ffi::CStr::from_ptr(openblas_get_config()),
            std::ffi::CStr::from_ptr(openblas_get_corename()),
        )
    };
    format!(
        "{} ({})",
        config.to_string_lossy().trim(),
        core.to_string_lossy().trim()
    )
}

/// One operand as BLAS takes it: (transposed?, leading dimension), for a `rows × cols` matrix
/// with the given strides; None when neither stride is 1.
fn operand(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(bool, usize)> {
    if cs == 1 && rs >= cols.max(1) {
        Some((false, rs))
    } else if rs == 1 && cs >= rows.max(1) {
        Some((true, cs))
    } else {
        None
    }
}

/// `dst = [dst +] alpha · a b` (as [`super::attention::gemm_into`]) through OpenBLAS, split
/// over `threads` rayon tasks; false, having done nothing, when the strides don't suit BLAS
/// or a dimension exceeds its integers.
///
/// # Safety
/// As `gemm_into`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    alpha: f32,
    threads: usize,
) -> bool {
    let fits = |x: usize| blasint::try_from(x).is_ok();
    let (Some((ta, lda)), Some((tb, ldb))) = (operand(m, k, a_rs, a_cs), operand(k, n, b_rs, b_cs))
    else {
        return false;
    };
    if ![m, n, k, lda, ldb, dst_rs].into_iter().all(fits) || dst_rs < n {
        return false;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    let call = |m: usize, n: usize, a: *const f32, b: *const f32, c: *mut f32| {
        cblas_sgemm(
            ROW_MAJOR,
            if ta { TRANS } else { NO_TRANS },
            if tb { TRANS } else { NO_TRANS },
            m as blasint,
            n as blasint,
            k as blasint,
            alpha,
            a,
            lda as blasint,
            b,
            ldb as blasint,
            beta,
            c,
            dst_rs as blasint,
        )
    };
    // Blocks of whole 16-row/column panels along the longer side, one per thread.
    let split = if m >= n { m } else { n };
    let block = split.div_ceil(threads.max(1)).div_ceil(16) * 16;
    if threads <= 1 || block >= split {
        call(m, n, a, b, dst);
        return true;
    }
    // Raw pointers are not Send; the blocks are disjoint parts of dst.
    let (a, b, dst) = (a as usize, b as usize, dst as usize);
    rayon::scope(|scope| {
        for start in (0..split).step_by(block) {
            let len = block.min(split - start);
            scope.spawn(move |_| {
                let (a, b, dst) = (a as *const f32, b as *const f32, dst as *mut f32);
                if m >= n {
                    // Rows start..start+len of a and dst.
                    let a = a.add(start * if ta { 1 } else { lda });
                    call(len, n, a, b, dst.add(start * dst_rs));
                } else {
                    // Columns start..start+len of b and dst.
                    let b = b.add(start * if tb { ldb } else { 1 });
                    call(m, len, a, b, dst.add(start));
                }
            });
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a · b` in f64, a and b by (row stride, column stride).
    fn reference(
        (m, n, k): (usize, usize, usize),
        (a, a_rs, a_cs): (&[f32], usize, usize),
        (b, b_rs, b_cs): (&[f32], usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| f64::from(a[i * a_rs + p * a_cs]) * f64::from(b[p * b_rs + j * b_cs]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn sgemm_matches_the_product_in_every_layout_and_split() {
        let values = |n: usize, seed: u64| -> Vec<f32> {
            crate::ops::tests::test_values(n, seed)
                .iter()
                .map(|&v| v as f32)
                .collect()
        };
        // Wide and tall shapes (row and column splits), edges off the 16-panel grid.
        for (m, n, k) in [(37, 5, 19), (5, 70, 33), (64, 64, 8), (1, 9, 4)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (values(m * k, 1), values(k * n, 2));
                let a_strides = if ta { (1, m) } else { (k, 1) };
                let b_strides = if tb { (1, k) } else { (n, 1) };
                let expected = reference(
                    (m, n, k),
                    (&a, a_strides.0, a_strides.1),
                    (&b, b_strides.0, b_strides.1),
                );
                for (threads, accumulate) in [(1, false), (3, false), (2, true)] {
                    // dst with a row stride wider than n.
                    let dst_rs = n + 3;
                    let mut dst = vec![0.5f32; m * dst_rs];
                    let done = unsafe {
                        sgemm(
                            (m, n, k),
                            (dst.as_mut_ptr(), dst_rs),
                            accumulate,
                            (a.as_ptr(), a_strides.0, a_strides.1),
                            (b.as_ptr(), b_strides.0, b_strides.1),
                            2.0,
                            threads,
                        )
                    };
                    assert!(done);
                    for i in 0..m {
                        for j in 0..dst_rs {
                            let got = f64::from(dst[i * dst_rs + j]);
                            let want = if j >= n {
                                0.5
                            } else {
                                2.0 * expected[i * n + j] + if accumulate { 0.5 } else { 0.0 }
                            };
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{m}x{n}x{k} ta={ta} tb={tb} threads={threads}: [{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn strides_blas_cannot_take_are_declined() {
        let (a, b) = ([1f32; 16], [1f32; 16]);
        let mut dst = [0f32; 4];
        // a with neither stride 1 (every other element).
        let done = unsafe {
            sgemm(
                (2, 2, 2),
                (dst.as_mut_ptr(), 2),
                false,
                (a.as_ptr(), 4, 2),
                (b.as_ptr(), 2, 1),
                1.0,
                1,
            )
        };
        assert!(!done);
        assert_eq!(dst, [0.0; 4]);
    }

    /// Debian's single-threaded OpenBLAS must take calls from several threads at once (its
    /// buffers are locked, USE_LOCKING): rayon's tasks each make their own.
    #[test]
    fn concurrent_calls_from_many_threads_agree() {
        use rayon::prelude::*;
        let (m, n, k) = (96, 80, 200);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let product = || {
            let mut dst = vec![0f32; m * n];
            let done = unsafe {
                sgemm(
                    (m, n, k),
                    (dst.as_mut_ptr(), n),
                    false,
                    (a.as_ptr(), k, 1),
                    (b.as_ptr(), n, 1),
                    1.0,
                    1,
                )
            };
            assert!(done);
            dst
        };
        let first = product();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            .build()
            .unwrap();
        pool.install(|| {
            (0..256).into_par_iter().for_each(|_| {
                let again = product();
                assert!(first
                    .iter()
                    .zip(&again)
                    .all(|(x, y)| x.to_bits() == y.to_bits()));
            })
        });
    }
}
