//! Scheduling of the daemon's latency-bound threads.
//!
//! On a machine whose cores are all busy (the committer, its run workers
//! and the compactor are CPU-bound), a thread woken by a socket or by a
//! durable log write can wait for a CPU until the running thread's time
//! slice ends (1.4 ms on a 2-core machine with Linux's default). Since
//! Linux 6.12 (EEVDF custom slices), a SCHED_OTHER thread may ask for a
//! shorter slice with `sched_setattr(2)`'s `sched_runtime`; a thread with
//! a shorter slice gets an earlier deadline and preempts on wake-up,
//! without taking more than its fair share of CPU. The daemon asks for
//! it on the threads that wake to answer requests (each connection's
//! reader and writer); older kernels accept and ignore the field. The
//! call lives in `refd_core::priority` beside the commit's real-time
//! priority ceiling, which restores a thread's slice after a boost.

pub use refd_core::priority::request_slice;
