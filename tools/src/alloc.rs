//! Allocator settings shared by refd's binaries (all use mimalloc).

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v3 headers): how
/// long freed memory stays committed before it is returned to the kernel.
/// libmimalloc-sys does not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds freed memory stays committed (mimalloc's default is 1000
/// in v3, 10 in v2).
pub const PURGE_DELAY_MS: i64 = 60_000;

/// Keep freed memory committed for [`PURGE_DELAY_MS`] before mimalloc
/// returns it to the kernel. A durable commit frees and reallocates
/// hundreds of MB every second (frozen heads, displaced items, item
/// changes, B+tree nodes); purged sooner, that memory is faulted in again
/// and the kernel zeroes it (measured, `refd-bench durable`, 1M extents:
/// at mimalloc's 1 s default 166k huge-page faults and ~15% of all CPU in
/// `clear_page_erms` over 10 s; at 10 s, 1,000-1,300 huge-page faults and
/// ~100k small ones over 40 s, ~10% of all CPU; at 60 s, 822 huge-page
/// faults and 14k small ones over 60 s, as many as the process's peak
/// footprint (never purging: 760 and 2k over 40 s)). Memory idle for
/// longer is still returned. Call first thing in `main`.
pub fn tune() {
    // SAFETY: mi_option_set only stores the value in mimalloc's option
    // table (read on each purge decision); any value is valid for this
    // option, and it may be called at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}
