//! Process-wide settings of the CPU trainer, made once at start-up by the `whet` binary, and the
//! line that says what a CPU run ran on.

/// glibc's defaults hand every allocation over 128 KiB (and, adaptively, up to 32 MiB) back to
/// the kernel on free, so each step's fresh activations and gradients page-fault again and
/// every free shoots down the other threads' TLBs. Keeping freed memory in the heap for reuse
/// measured 1.1x (small) to 1.6x (tiny) on `whet bench train` (BENCHMARKS.md).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts.
    unsafe {
        // The largest threshold glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit): blocks below it
        // come from the heap. Fixing it also stops glibc's adaptive threshold.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Return the top of the heap to the kernel only once 1 GiB of it is free.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Runs `f` (the whole command) on a worker of rayon's global pool, one thread per core: the
/// command's own thread then takes part in every parallel matmul and fused op instead of
/// sleeping while the pool works, so no more threads want the cores than there are cores.
/// candle's second pool for element-wise ops (its spinning "barrier pool") is not started
/// (`CANDLE_NUM_THREADS=1` unless set): the large element-wise work runs in whet's fused ops on
/// this pool.
pub fn on_one_thread_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called first thing in main, before any other thread exists (no racing reader).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    match rayon::ThreadPoolBuilder::new().build_global() {
        Ok(()) => rayon::scope(|_| f()),
        // Already built (a test harness): run where we are.
        Err(_) => f(),
    }
}

/// The threads whet's CPU products and fused ops split their work into: candle's count
/// (RAYON_NUM_THREADS, else the physical cores), read once. candle works it out anew on every
/// call, parsing /proc/cpuinfo each time, which was about 5 % of a `tiny` step.
pub fn cpu_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// The matrix-multiply kernel candle's CPU backend runs here: the `gemm` crate picks AVX-512
/// (x86-v4, enabled in this crate's manifest) or AVX2+FMA at run time.
pub fn matmul_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        // pulp's x86-v4 level, which gemm's AVX-512 kernels need.
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512cd")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return "gemm (AVX-512)";
        }
        if std::is_x86_feature_detected!("fma") {
            return "gemm (AVX2+FMA)";
        }
    }
    "gemm (portable)"
}
