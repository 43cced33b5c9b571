//! A counting global allocator: heap bytes currently allocated, so the
//! ingest benchmark can report bytes per pending ref. Counting is off
//! until [`count_live`]: one shared counter updated by every thread's
//! allocations is a contended cache line the other benchmarks should not
//! pay for.
//!
//! It wraps mimalloc, the allocator refd's binaries use: with glibc malloc,
//! memory freed by one thread's compaction into another thread's arena is
//! trimmed back to the kernel and faulted in again (measured: 53% of
//! cycles in `clear_page_erms` at 2 threads).

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc as System;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// Wraps mimalloc and counts live bytes.
#[derive(Debug)]
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

/// Count live bytes from now on ([`live_bytes`] differences are then
/// exact for memory allocated after this call).
pub fn count_live() {
    COUNTING.store(true, Ordering::Relaxed);
}

// SAFETY: every method forwards to mimalloc with the caller's arguments
// unchanged, so its guarantees hold; the counter is only arithmetic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, forwarded.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by us (hence mimalloc) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by us with `layout`; forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Heap bytes currently allocated through the counting allocator.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}
