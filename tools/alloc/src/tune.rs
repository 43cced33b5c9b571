//! Allocator settings shared by refd's binaries (all use mimalloc).

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v3 headers): how
/// long freed memory stays committed before it is returned to the kernel.
/// libmimalloc-sys does not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `mi_option_purge_delay` value: never return freed memory to the
/// kernel (mimalloc's default is 1000 ms in v3, 10 ms in v2).
pub const PURGE_DELAY_MS: i64 = -1;

/// Keep freed memory committed for the life of the process: mimalloc
/// never returns it to the kernel ([`PURGE_DELAY_MS`]). A durable commit
/// frees and reallocates hundreds of MB every second (frozen heads,
/// displaced items, item changes, B+tree nodes); returned, that memory is
/// faulted in again and the kernel zeroes it.
///
/// No delay is long enough: mimalloc v3 keeps one purge deadline per
/// arena, set by the first free after the last purge, and at that
/// deadline purges every free slice of the arena, however recently it was
/// freed. Under steady load that is every `delay`, and what a commit
/// freed a moment before is faulted in again by the next one. Measured
/// with `refd-bench durable` (1M extents, 150 s, 2 threads), the 60 s
/// delay used before: RSS fell by 190-740 MB at 62, 68, 122 and 128 s,
/// each time followed by 10-25k page faults, and the longest commit
/// (1.20 s against a mean of 0.81 s) started at 124 s. Earlier figures
/// (60 s of that run): at mimalloc's 1 s default, 166k huge-page faults
/// and ~15% of all CPU in `clear_page_erms` over 10 s; at 10 s, 1,000-1,300
/// huge-page faults and ~100k small ones over 40 s.
///
/// The process holds its peak heap: refd's memory is bounded by design
/// (node cache, pending ops under back-pressure, one commit's working
/// set), so that peak is bounded too. Call first thing in `main`.
pub fn tune() {
    // SAFETY: mi_option_set only stores the value in mimalloc's option
    // table (read on each purge decision); any value is valid for this
    // option (negative: never purge), and it may be called at any time,
    // from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}

/// Bytes per allocation of [`prefault`]: large enough to come straight
/// from mimalloc's arenas, so the memory is free for any size class after.
const PREFAULT_CHUNK_BYTES: usize = 4 << 20;

/// Page size assumed when touching memory (the smallest on x86_64 and
/// aarch64; touching more often than needed is harmless).
const TOUCH_STRIDE_BYTES: usize = 4096;

/// Allocates `bytes` of heap, touches every page, and frees it again:
/// after [`tune`] mimalloc keeps freed memory committed, so what a process
/// allocates next is served from pages the kernel has already faulted in
/// and zeroed. Run it just before a working set of about that size is
/// built, e.g. before a durable engine starts its first commits:
/// first-touch page faults are slow on VMs (measured on the 2-core VM of
/// `docs/benchmarks.md`: ~2.8 s per GiB), and on a fresh device the first
/// commit built its memory that way (1.2-1.5 s for 0.5-1M ops; ~0.2 s
/// after prefaulting 2 GiB). Returns how long it took.
pub fn prefault(bytes: usize) -> std::time::Duration {
    let t = std::time::Instant::now();
    let chunks: Vec<Vec<u8>> = (0..bytes.div_ceil(PREFAULT_CHUNK_BYTES))
        .map(|_| {
            let mut chunk = vec![0u8; PREFAULT_CHUNK_BYTES];
            // calloc-like allocations may skip writing: touch each page.
            for i in (0..chunk.len()).step_by(TOUCH_STRIDE_BYTES) {
                chunk[i] = 1;
            }
            std::hint::black_box(&mut chunk);
            chunk
        })
        .collect();
    drop(chunks);
    t.elapsed()
}

/// The MiB of a prefault of `requested_mib` that this machine can take:
/// at most half the memory available ([`available_memory_bytes`]; all of
/// `requested_mib` where that is unknown), so a small machine is not
/// pushed into reclaim (or the OOM killer) by a default meant for a
/// larger one.
pub fn prefault_mib_capped(requested_mib: usize) -> usize {
    match available_memory_bytes() {
        Some(avail) => requested_mib.min(((avail / 2) >> 20) as usize),
        None => requested_mib,
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where there is no
/// such file or line): how much a prefault may take without pushing the
/// machine into reclaim.
pub fn available_memory_bytes() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::parse_mem_available;

    #[test]
    fn mem_available_parses() {
        let m = "MemTotal:       24683656 kB\nMemFree:        23762596 kB\nMemAvailable:   24246504 kB\n";
        assert_eq!(parse_mem_available(m), Some(24_246_504 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    }
}
