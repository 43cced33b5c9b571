//! A counting global allocator: heap bytes currently allocated, so the
//! ingest benchmark can report bytes per pending ref. Counting is off
//! until [`count_live`] (an atomic add per allocation the other benchmarks
//! should not pay for). Each thread counts in its own slot, so counting
//! does not share a written cache line between threads.
//!
//! It wraps mimalloc, the allocator refd's binaries use: with glibc malloc,
//! memory freed by one thread's compaction into another thread's arena is
//! trimmed back to the kernel and faulted in again (measured: 53% of
//! cycles in `clear_page_erms` at 2 threads).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

use mimalloc::MiMalloc as System;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

/// Wraps mimalloc and counts live bytes.
#[derive(Debug)]
pub struct Counting;

/// Counter slots: each thread adds to its own slot, and [`live_bytes`]
/// sums them. One shared counter was a contended cache line: measured,
/// its `lock add` was 21% of the samples of the ingest benchmark's
/// `--lookups` thread (every thread's frees and allocations bounced it).
const SLOTS: usize = 64;

/// A counter on its own cache lines (128 bytes: adjacent-line prefetch).
#[repr(align(128))]
struct Slot(AtomicIsize);

#[allow(clippy::declare_interior_mutable_const)] // only an array initialiser
const ZERO: Slot = Slot(AtomicIsize::new(0));
static LIVE: [Slot; SLOTS] = [ZERO; SLOTS];
/// Next slot to give a thread (round robin; threads past [`SLOTS`] share).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// On its own line: read by every allocation, written once.
#[repr(align(128))]
struct Flag(AtomicBool);
static COUNTING: Flag = Flag(AtomicBool::new(false));

thread_local! {
    /// This thread's slot (`usize::MAX`: none yet). A const initialiser and
    /// no destructor: reading it never allocates, so the allocator may.
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn slot() -> usize {
    MY_SLOT
        .try_with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
                s.set(i);
            }
            i
        })
        .unwrap_or(0)
}

fn count(delta: isize) {
    if COUNTING.0.load(Ordering::Relaxed) {
        // Memory freed by another thread than the one that allocated it
        // moves bytes between slots; only the sum means anything.
        LIVE[slot()].0.fetch_add(delta, Ordering::Relaxed);
    }
}

/// Count live bytes from now on ([`live_bytes`] differences are then
/// exact for memory allocated after this call).
pub fn count_live() {
    COUNTING.0.store(true, Ordering::Relaxed);
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
/// The sum of every thread's slot: not a snapshot of one instant while
/// other threads allocate, as the single counter was not either.
pub fn live_bytes() -> isize {
    // Wrapping, as the slots' adds do (a slot alone may run far from 0).
    LIVE.iter()
        .map(|s| s.0.load(Ordering::Relaxed))
        .fold(0, isize::wrapping_add)
}
