//! [`DurableEngine::verify`]: fsck of a live engine between commits.

use std::ops::ControlFlow;

use refd_core::delayed::DelayedRefStore;
use refd_ioring::btree::TreeCheck;
use refd_ioring::Storage;

use super::read::{read_extent, read_extent_count, read_held, scan_extents};
use super::{lock, DurableEngine};
use crate::codec;
use crate::error::VerifyError;

impl<S: Storage + Clone, D: DelayedRefStore> DurableEngine<S, D> {
    /// fsck: the B+tree's on-disk walk, every extent item decoded and
    /// checked (streaming: memory is one extent), no extent starting inside
    /// the one before, the held heads decoded
    /// and as many as the engine holds since its last commit, every
    /// cached extent equal to the B+tree's, and the extent count the
    /// engine keeps (and the tree records) equal to the items scanned. Call between commits (it
    /// takes the commit lock).
    pub fn verify(&self) -> Result<TreeCheck, VerifyError> {
        let st = lock(&self.commit);
        let device = self.storage.device_name();
        let check = self.tree.check().map_err(|source| VerifyError::Check {
            device: device.to_string(),
            source: Box::new(source),
        })?;
        // The held set on disk is the last commit's (or recovery's): as
        // many heads, in as many chunks, as the engine holds in memory.
        let (held, chunks) = read_held(&self.tree, device)?;
        let in_memory = self.heads_held();
        if chunks != st.held_chunks || held.len() as u64 != in_memory {
            return Err(VerifyError::Held {
                on_disk: held.len(),
                chunks,
                in_memory,
                in_memory_chunks: st.held_chunks,
            });
        }
        // The extent count: the engine's is the last commit's, which the
        // tree records (unless no commit since open recorded it yet).
        let recorded = read_extent_count(&self.tree, device)?;
        let cached = self.engine.tree();
        let mut matched = 0usize;
        let mut extents = 0u64;
        let mut differs = None;
        let mut overlap = None;
        let mut prev: Option<(u64, u64)> = None;
        scan_extents(
            &self.tree,
            device,
            0..=codec::EXTENT_BYTENR_MAX,
            |b, item| {
                extents += 1;
                if let Some((p, n)) = prev.filter(|&(p, n)| p.saturating_add(n) > b) {
                    overlap = Some(VerifyError::Overlap {
                        bytenr: b,
                        prev: p,
                        prev_bytes: n,
                    });
                    return ControlFlow::Break(());
                }
                prev = Some((b, item.num_bytes));
                if let Some(c) = cached.get(b) {
                    if *c != item {
                        differs = Some(b);
                        return ControlFlow::Break(());
                    }
                    matched += 1;
                }
                ControlFlow::Continue(())
            },
        )?;
        if let Some(e) = overlap {
            return Err(e);
        }
        if let Some(bytenr) = differs {
            return Err(VerifyError::CacheDiffers { bytenr });
        }
        let in_memory = self.extents();
        if extents != in_memory || recorded.is_some_and(|r| r != extents) {
            return Err(VerifyError::ExtentCount {
                counted: extents,
                in_memory,
                recorded,
            });
        }
        if matched != cached.len() {
            let first = cached
                .iter()
                .map(|(b, _)| b)
                .find(|&b| read_extent(&self.tree, device, b).ok().flatten().is_none());
            return Err(VerifyError::CacheMissing {
                count: cached.len() - matched,
                first,
            });
        }
        Ok(check)
    }
}
