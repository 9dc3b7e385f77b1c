//! Allocator tuning. Training allocates and frees tensors of tens of MB every step; mimalloc's
//! default returns that memory to the OS at once, and the page faults to get it back took 30% of
//! a SASRec epoch (perf). Keeping freed memory mapped removes them.

/// mimalloc's `mi_option_purge_delay` (index 15 in both its v2 and v3 option enums).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Call once at the start of a program that uses mimalloc as its global allocator.
pub fn tune() {
    // SAFETY: sets a process-wide integer option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// gemm tuning for small-batch LLM decoding. With 8 activation rows the gemm splits the columns
/// into register tiles of 6 and 2 and, without packing, streams every weight from memory once
/// per tile: twice per step. Packing the weight block once (into L2) for all tiles made batch-8
/// decoding of SmolLM2 faster (see README, benches). `CUREC_GEMM_LHS_PACK` overrides (a multiple
/// of the tile width above which gemm packs; gemm's default is 16).
pub fn tune_gemm() {
    let t = std::env::var("CUREC_GEMM_LHS_PACK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    gemm_common::gemm::set_lhs_packing_threshold_multi_thread(t);
    gemm_common::gemm::set_lhs_packing_threshold_single_thread(t);
}
