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
