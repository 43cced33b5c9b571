//! The STATS reply: one JSON object (fields listed in
//! `tools/refd/README.md`, "STATS"), also what `refctl stats` prints.

use refd_core::delayed::DelayedRefStore;
use serde_json::{json, Value};

use crate::server::Shared;

/// Refused heads STATS lists (`quarantine.newest`, newest first).
pub const QUARANTINE_NEWEST: usize = 16;

/// The server's state now.
pub fn json<D: DelayedRefStore>(s: &Shared<D>) -> Value {
    let e = &s.engine;
    let totals = e.commit_totals();
    let log = e.log();
    let writes = log.stats().write_latency;
    let generation = e.generation();
    let service = e.service_stats();
    let cache = e.btree().cache_stats();
    let failure = e.failure().map(|f| {
        json!({
            "device": f.device,
            "operation": f.operation,
            "offset": f.offset,
            "message": f.to_string(),
        })
    });
    let phases_ms = |p: &refd_durable::CommitPhases| {
        json!({
            "freeze": p.freeze.as_secs_f64() * 1e3,
            "items": p.items.as_secs_f64() * 1e3,
            "run": p.run.as_secs_f64() * 1e3,
            "diff": p.diff.as_secs_f64() * 1e3,
            "apply": p.apply.as_secs_f64() * 1e3,
            "write": p.write.as_secs_f64() * 1e3,
            "superblock": p.superblock.as_secs_f64() * 1e3,
            "total": p.total.as_secs_f64() * 1e3,
        })
    };
    let space = e.node_space();
    let (quarantine_kept, newest) = e.core().quarantined_newest(QUARANTINE_NEWEST);
    let m = &s.metrics;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "server_id": s.server_id,
        "uptime_s": s.started.elapsed().as_secs_f64(),
        "device": s.device,
        "fs_id": hex(&e.fs_id().0),
        "store": e.core().store().name(),
        "verify": s.config.verify,
        "dry_run": s.config.dry_run,
        "failed": failure,
        "process": {
            "resident_bytes": crate::metrics::resident_bytes(None),
        },
        "engine": {
            "generation": generation,
            "extents": e.extents(),
            "pending_ops": e.pending_ops(),
            "heads_held": e.heads_held(),
            "commit_trigger_ops": e.commit_trigger_ops(),
            "commit_cost_ps_per_op": e.commit_cost_ps_per_op(),
            "commit_dirty_bytes_per_op": e.commit_dirty_bytes_per_op(),
            "dirty_bytes_trigger": e.policy().dirty_bytes_trigger,
            "barriers_active": e.core().barrier().active(),
            "barrier_seq": e.core().barrier().current(),
            "quarantined": quarantine_kept,
            "throttle_waits": e.throttled().0,
            "throttle_wait_ms": e.throttled().1.as_secs_f64() * 1e3,
            "pace_waits": e.paced().0,
            "pace_wait_ms": e.paced().1.as_secs_f64() * 1e3,
        },
        "quarantine": {
            "kept": quarantine_kept,
            "total": m.quarantined_heads.get(),
            "newest": newest.iter().map(|q| json!({
                "generation": q.generation,
                "bytenr": q.bytenr,
                "error": q.error.to_string(),
            })).collect::<Vec<_>>(),
        },
        "log": {
            "bytes": log.log_bytes(),
            "used_bytes": log.used_bytes(),
            "durable_lsn": log.durable_lsn().get(),
            "batch_bytes_cap": log.batch_bytes_cap(),
            "writes": writes.count(),
            "write_p50_us": writes.quantile_us(0.5),
            "write_p99_us": writes.quantile_us(0.99),
            "write_max_us": writes.max_us,
            "write_sum_us": writes.sum_us,
            "write_buckets": writes.counts.to_vec(),
        },
        "commits": {
            "count": totals.commits,
            "ops": totals.ops,
            "nodes_written": totals.nodes_written,
            "dirty_bytes_max": totals.dirty_bytes_max,
            "item_changes": totals.item_changes,
            "extents_read": totals.extents_read,
            "gap_max_ms": totals.gap_max.as_secs_f64() * 1e3,
            "phases_ms": phases_ms(&totals.phases),
            "longest_ms": phases_ms(&totals.longest_phases),
        },
        "space": {
            "region_nodes": space.region_nodes,
            "free_nodes": space.free_nodes,
            "pending_nodes": space.pending_nodes,
            "tree_nodes": space.tree_nodes,
            "reserved_nodes": space.reserved_nodes,
            "reserved_units": space.reserved_units,
            "reserved_bytes": space.reserved_bytes,
            "refused": space.refused,
            "bitmap_run_nodes": space.bitmap_run_nodes,
            "spare_nodes": space.spare_nodes,
            "no_spare_window": space.no_spare_window,
        },
        "cache": {
            "extents": e.cached_extents().len(),
            "node_hits": cache.hits,
            "node_misses": cache.misses,
            "node_bytes": cache.bytes,
            "node_dirty_bytes": cache.dirty_bytes,
            "node_budget_bytes": cache.budget_bytes,
        },
        "sessions": {
            "kept": service.sessions,
            "max": service.sessions_max,
            "registered": service.sessions_registered,
        },
        "freed": {
            "lists": service.freed_lists,
            "extents": service.freed_extents,
            "kept_max": service.freed_kept_max,
            "oldest_generation": service.freed_oldest,
            "consumers": service.consumers.iter().map(|c| json!({
                "id": c.id,
                "name": c.name,
                "acked_generation": c.acked,
                "backlog_generations": generation.saturating_sub(c.acked),
            })).collect::<Vec<_>>(),
        },
        "barriers": {
            "held": s.barriers.held(),
            "lease_ms": s.config.barrier_lease_ms,
            "held_heads_max": s.config.held_heads_max,
            "revoked": m.barriers_revoked.get(),
        },
        "connections": {
            "open": s.connections(),
            "max": s.config.connections_max,
            "accepted": m.connections_accepted.get(),
            "refused": m.connections_refused.get(),
        },
        "wire": {
            "bytes_in": m.bytes_in.get(),
            "bytes_out": m.bytes_out.get(),
            "submit_batches": m.batches.get(),
            "submit_duplicates": m.duplicates.get(),
            "backpressure_waits": m.backpressure_waits.get(),
            "auth_failures": m.auth_failures.get(),
            "hello_timeouts": m.hello_timeouts.get(),
            "submit_ops_max": s.submit_ops_max,
            "frame_bytes_max": s.config.frame_bytes_max,
        },
    })
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
