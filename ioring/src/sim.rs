//! [`SimStorage`]: an in-memory [`Storage`] for deterministic crash tests.
//!
//! The simulated device models a disk with a volatile write cache:
//!
//! - `durable` is what the media holds; it survives [`SimStorage::crash`].
//! - Every completed write also lands in `current` (what reads return) and,
//!   per logical sector, in a list of *pending* versions not yet durable.
//! - [`Storage::flush`] makes every pending sector durable (latest version);
//!   [`Storage::write_durable`] makes its own sectors durable and forgets the
//!   older pending versions of those sectors (a device never writes an older
//!   cached version of a sector after a newer one reached the media).
//! - [`SimStorage::crash`] returns a new device holding what power loss could
//!   leave: for every sector with pending versions, independently, either
//!   the durable content or any one of its pending versions, and possibly
//!   *torn*: a prefix of that version (a multiple of
//!   [`SimConfig::torn_unit_bytes`]) followed by the previous content. Which
//!   writes survive is therefore independent of their completion order.
//!
//! - [`SimStorage::process_crash`] returns the device as the next process
//!   sees it after this one died (SIGKILL) without a power loss: media and
//!   volatile cache kept, and the writes that were submitted but not
//!   completed ([`FaultPlan::process_crash_at`]) *in flight*: each, by the
//!   seeded PRNG, never lands or lands (whole, or only its first sectors)
//!   in the volatile cache at a seeded point of the next process's first
//!   reads, at the latest just before its first write or flush takes
//!   effect (the kernel completes or cancels a dead process's I/O before
//!   the last reference to its open device goes away, which an exclusive
//!   lock waits for).
//!
//! Faults: a [`FaultPlan`] makes the Nth write, flush or read return `EIO`.
//! A failed write or flush latches the device exactly like
//! [`crate::UringStorage`]; a failed write still leaves the batch's data in
//! the volatile cache (as after a real `EIO` the sectors' content is
//! unknown), and a failed flush leaves pending data pending, so a later
//! crash may persist any part of it. [`SimStorage::flip_bit`] corrupts media.
//!
//! Everything random derives from [`SimConfig::seed`] through
//! `rand_chacha`'s [`ChaCha8Rng`], whose output is value-stable across
//! platforms and releases, so a failing seed reproduces the same crash
//! image on every machine.
//! Pending versions per sector are bounded by [`PENDING_VERSIONS_MAX`]; older
//! ones are dropped, as a real cache coalesces rewrites of the same sector.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::device::{Geometry, GeometryError};
use crate::storage::{
    check_range, check_read_batch, check_write_batch, FailureLatch, IoFailure, IoOp, Storage,
    StorageError,
};

/// Largest simulated device, in bytes (256 MiB): it lives in memory twice.
pub const SIM_BYTES_MAX: u64 = 256 << 20;
/// Most unflushed versions remembered per sector.
pub const PENDING_VERSIONS_MAX: usize = 4;

/// Configuration of a [`SimStorage`].
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Name used in errors.
    pub name: String,
    /// Simulated geometry; sectors for crash decisions are logical blocks.
    pub geometry: Geometry,
    /// Seed of every random decision.
    pub seed: u64,
    /// Probability that a sector which keeps a pending version at a random
    /// crash is torn, in `0.0..=1.0`.
    pub torn_probability: f64,
    /// Granule of a tear in bytes: a power of two dividing the logical
    /// block size. Equal to the block size means sectors never tear.
    pub torn_unit_bytes: u32,
}

impl SimConfig {
    /// A `size_bytes` device with 4096-byte blocks, a 10% tear probability at
    /// 512-byte granularity, and the given seed.
    pub fn new(size_bytes: u64, seed: u64) -> Self {
        Self {
            name: format!("sim-{seed:#x}"),
            geometry: Geometry {
                size_bytes,
                logical_block_bytes: 4096,
                physical_block_bytes: 4096,
            },
            seed,
            torn_probability: 0.1,
            torn_unit_bytes: 512,
        }
    }

    fn check(&self) -> Result<(), SimError> {
        self.geometry.check().map_err(SimError::Geometry)?;
        if self.geometry.size_bytes > SIM_BYTES_MAX {
            return Err(SimError::InvalidConfig {
                field: "geometry.size_bytes",
                reason: "larger than SIM_BYTES_MAX (256 MiB)",
            });
        }
        if !(0.0..=1.0).contains(&self.torn_probability) {
            return Err(SimError::InvalidConfig {
                field: "torn_probability",
                reason: "must be within 0.0..=1.0",
            });
        }
        let unit = self.torn_unit_bytes;
        if !unit.is_power_of_two() || unit > self.geometry.logical_block_bytes {
            return Err(SimError::InvalidConfig {
                field: "torn_unit_bytes",
                reason: "must be a power of two dividing the logical block size",
            });
        }
        Ok(())
    }
}

/// How [`SimStorage::crash_with`] treats unflushed sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPolicy {
    /// Per sector: keep the durable content or any pending version, maybe
    /// torn, chosen by the seeded PRNG.
    Random,
    /// Every sector keeps its latest version (the cache was written back).
    KeepAll,
    /// Every unflushed write is lost.
    LoseAll,
}

/// Which operations fail with `EIO`, counted from the moment the plan is
/// installed with [`SimStorage::set_fault_plan`]; 1 means the next one. Each
/// entry of a batch counts as one write or read; `write_durable` counts as a
/// write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail the Nth write.
    pub write_eio_at: Option<u64>,
    /// Fail the Nth flush.
    pub flush_eio_at: Option<u64>,
    /// Fail the Nth read.
    pub read_eio_at: Option<u64>,
    /// Bytes `start..end` are a media error: every read overlapping them
    /// fails with `EIO` (as a sector torn by a power loss can read back),
    /// until the plan is replaced.
    pub unreadable: Option<(u64, u64)>,
    /// The Nth write is acknowledged (also a durable one) but never reaches
    /// the device: a lost write.
    pub lost_write_at: Option<u64>,
    /// The Nth write is acknowledged but lands at byte address `.1`
    /// (moved back to fit in the device) instead of its own, which keeps
    /// its old content: a misdirected write.
    pub misdirected_write_at: Option<(u64, u64)>,
    /// The Nth read returns what the device held when the plan was
    /// installed, not what was written since: a stale read.
    pub stale_read_at: Option<u64>,
    /// The Nth flush fails with `EIO` and every unflushed write is dropped
    /// (its pages are "clean": a later flush succeeds without them), and the
    /// device does **not** latch: Linux's fsync after a write-back error.
    /// Whoever called the flush must latch the failure itself.
    pub flush_eio_clean_at: Option<u64>,
    /// The process dies during the call holding the Nth write: every write
    /// of that call is submitted but not completed (kept in flight for
    /// [`SimStorage::process_crash`], not applied), the call and every
    /// later call fail as after a `SIGKILL` (the storage latches).
    pub process_crash_at: Option<u64>,
}

/// Most operations of the next process before which an in-flight write of
/// a dead one may still land ([`SimStorage::process_crash`]).
pub const IN_FLIGHT_LAND_OPS_MAX: u64 = 24;

/// A write of a dead process that lands in the next one's volatile cache
/// just before the next process's operation number `before_op` (or its
/// first write or flush, whichever comes first).
#[derive(Debug, Clone)]
struct Landing {
    offset: u64,
    data: Box<[u8]>,
    before_op: u64,
}

/// Operation counters of a [`SimStorage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Writes (batch entries and durable writes), including failed ones.
    pub writes: u64,
    /// Of which durable writes.
    pub durable_writes: u64,
    /// Flushes, including failed ones.
    pub flushes: u64,
    /// Reads (batch entries), including failed ones.
    pub reads: u64,
    /// Bytes accepted by writes.
    pub bytes_written: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
}

/// Errors of the simulator's own API (not of [`Storage`] calls).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The geometry is unusable.
    #[error("invalid simulated geometry: {0}")]
    Geometry(GeometryError),
    /// A configuration field is out of range.
    #[error("invalid simulator config: {field} {reason}")]
    InvalidConfig {
        /// Offending field.
        field: &'static str,
        /// What is expected.
        reason: &'static str,
    },
    /// An image does not match the configured size.
    #[error("image has {image_bytes} bytes but the geometry says {size_bytes}")]
    ImageSize {
        /// Image length.
        image_bytes: u64,
        /// Configured size.
        size_bytes: u64,
    },
    /// A byte offset or range is outside the device.
    #[error("byte range {start}..{end} is outside the {size_bytes}-byte device")]
    OutOfBounds {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// Device size.
        size_bytes: u64,
    },
    /// A bit index above 7.
    #[error("bit index {bit} is not in 0..8")]
    BadBit {
        /// Requested bit.
        bit: u8,
    },
}

#[derive(Debug)]
struct FaultTargets {
    write_at: Option<u64>,
    flush_at: Option<u64>,
    read_at: Option<u64>,
    unreadable: Option<(u64, u64)>,
    lost_write_at: Option<u64>,
    misdirected_write_at: Option<(u64, u64)>,
    stale_read_at: Option<u64>,
    flush_clean_at: Option<u64>,
    process_crash_at: Option<u64>,
    /// The device as it was when a plan with `stale_read_at` was installed.
    stale: Option<Vec<u8>>,
}

impl FaultTargets {
    fn none() -> Self {
        FaultTargets {
            write_at: None,
            flush_at: None,
            read_at: None,
            unreadable: None,
            lost_write_at: None,
            misdirected_write_at: None,
            stale_read_at: None,
            flush_clean_at: None,
            process_crash_at: None,
            stale: None,
        }
    }
}

#[derive(Debug)]
struct SimState {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Unflushed versions per sector index, oldest first.
    pending: BTreeMap<u64, Vec<Box<[u8]>>>,
    rng: ChaCha8Rng,
    faults: FaultTargets,
    counters: SimCounters,
    /// Writes in flight when the process died ([`FaultPlan::process_crash_at`]).
    in_flight: Vec<(u64, Box<[u8]>)>,
    /// Writes of a dead process still to land here, and the operations
    /// seen so far (reads, writes, flushes: calls).
    landing: Vec<Landing>,
    calls: u64,
}

/// In-memory simulated device; see the module docs.
#[derive(Debug)]
pub struct SimStorage {
    config: SimConfig,
    state: Mutex<SimState>,
    latch: FailureLatch,
}

fn eio() -> Arc<io::Error> {
    Arc::new(io::Error::from_raw_os_error(libc::EIO))
}

impl SimStorage {
    /// A zero-filled device.
    pub fn new(config: SimConfig) -> Result<Self, SimError> {
        config.check()?;
        let image = vec![0u8; config.geometry.size_bytes as usize];
        Self::from_image(config, image)
    }

    /// A device whose media holds `image` (for example a crash image saved
    /// by a test).
    pub fn from_image(config: SimConfig, image: Vec<u8>) -> Result<Self, SimError> {
        config.check()?;
        if image.len() as u64 != config.geometry.size_bytes {
            return Err(SimError::ImageSize {
                image_bytes: image.len() as u64,
                size_bytes: config.geometry.size_bytes,
            });
        }
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self {
            state: Mutex::new(SimState {
                current: image.clone(),
                durable: image,
                pending: BTreeMap::new(),
                rng,
                faults: FaultTargets::none(),
                counters: SimCounters::default(),
                in_flight: Vec::new(),
                landing: Vec::new(),
                calls: 0,
            }),
            config,
            latch: FailureLatch::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        // The state is only mutated in small steps that leave it consistent,
        // so a panic elsewhere while holding the lock does not corrupt it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sector_bytes(&self) -> u64 {
        u64::from(self.config.geometry.logical_block_bytes)
    }

    /// Installs a fault plan; counts start now. Replaces any earlier plan.
    pub fn set_fault_plan(&self, plan: FaultPlan) {
        let mut st = self.state();
        let c = st.counters;
        st.faults = FaultTargets {
            write_at: plan.write_eio_at.map(|n| c.writes.saturating_add(n)),
            flush_at: plan.flush_eio_at.map(|n| c.flushes.saturating_add(n)),
            read_at: plan.read_eio_at.map(|n| c.reads.saturating_add(n)),
            unreadable: plan.unreadable,
            lost_write_at: plan.lost_write_at.map(|n| c.writes.saturating_add(n)),
            misdirected_write_at: plan
                .misdirected_write_at
                .map(|(n, to)| (c.writes.saturating_add(n), to)),
            stale_read_at: plan.stale_read_at.map(|n| c.reads.saturating_add(n)),
            flush_clean_at: plan.flush_eio_clean_at.map(|n| c.flushes.saturating_add(n)),
            process_crash_at: plan.process_crash_at.map(|n| c.writes.saturating_add(n)),
            stale: plan.stale_read_at.map(|_| st.current.clone()),
        };
    }

    /// Operation counters since creation.
    pub fn counters(&self) -> SimCounters {
        self.state().counters
    }

    /// Number of sectors holding unflushed data.
    pub fn unflushed_sectors(&self) -> usize {
        self.state().pending.len()
    }

    /// A copy of the durable (media) image.
    pub fn durable_image(&self) -> Vec<u8> {
        self.state().durable.clone()
    }

    /// The device as it would be after a power loss now, with the
    /// configured random policy. See [`SimStorage::crash_with`].
    pub fn crash(&self) -> SimStorage {
        self.crash_with(CrashPolicy::Random)
    }

    /// The device as it would be after a power loss now: a new, healthy
    /// `SimStorage` (no latch, no faults, zeroed counters) whose media is
    /// the durable image plus whatever `policy` keeps of the unflushed
    /// sectors. Its seed derives from this device's PRNG, so a sequence of
    /// crashes is reproducible. `self` is left unchanged except that its
    /// PRNG advances.
    pub fn crash_with(&self, policy: CrashPolicy) -> SimStorage {
        let sector = self.sector_bytes() as usize;
        let unit = self.config.torn_unit_bytes as usize;
        let units = sector / unit;
        let mut st = self.state();
        let SimState {
            durable,
            pending,
            rng,
            ..
        } = &mut *st;
        let mut image = durable.clone();
        for (&index, versions) in pending.iter() {
            let start = index as usize * sector;
            let target = &mut image[start..start + sector];
            let Some(latest) = versions.last() else {
                continue;
            };
            match policy {
                CrashPolicy::LoseAll => {}
                CrashPolicy::KeepAll => target.copy_from_slice(latest),
                CrashPolicy::Random => {
                    let pick = rng.gen_range(0..=versions.len());
                    if pick == 0 {
                        continue;
                    }
                    let new = &versions[pick - 1];
                    if units > 1 && rng.gen_bool(self.config.torn_probability) {
                        // Prefix of the new version over the content it
                        // replaced (the previous version, or the media).
                        let cut = unit * rng.gen_range(1..units);
                        if pick >= 2 {
                            target.copy_from_slice(&versions[pick - 2]);
                        }
                        target[..cut].copy_from_slice(&new[..cut]);
                    } else {
                        target.copy_from_slice(new);
                    }
                }
            }
        }
        let seed = rng.gen::<u64>();
        drop(st);
        let config = SimConfig {
            seed,
            ..self.config.clone()
        };
        let state = SimState {
            current: image.clone(),
            durable: image,
            pending: BTreeMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            faults: FaultTargets::none(),
            counters: SimCounters::default(),
            in_flight: Vec::new(),
            landing: Vec::new(),
            calls: 0,
        };
        SimStorage {
            config,
            state: Mutex::new(state),
            latch: FailureLatch::new(),
        }
    }

    /// The device as the next process sees it after this one died (a
    /// `SIGKILL`, not a power loss): a new, healthy `SimStorage` with the
    /// same media and the same volatile cache (the device kept power; a
    /// later [`SimStorage::crash`] may still lose what is unflushed), plus
    /// the writes in flight when the process died
    /// ([`FaultPlan::process_crash_at`]). Each of them, by the seeded PRNG:
    /// never lands (1 in 4), or lands in the volatile cache, whole or (with
    /// [`SimConfig::torn_probability`]) only its first sectors, just before
    /// a seeded one of the next process's first [`IN_FLIGHT_LAND_OPS_MAX`]
    /// calls, and at the latest before its first write or flush takes
    /// effect. Without a process crash fault, nothing is in flight. `self`
    /// is unchanged except that its PRNG advances.
    pub fn process_crash(&self) -> SimStorage {
        let sector = self.sector_bytes() as usize;
        let mut st = self.state();
        let mut landing = Vec::new();
        for (offset, data) in st.in_flight.clone() {
            if st.rng.gen_ratio(1, 4) {
                continue;
            }
            let sectors = data.len() / sector;
            let keep = if sectors > 1 && st.rng.gen_bool(self.config.torn_probability) {
                sector * st.rng.gen_range(1..sectors)
            } else {
                data.len()
            };
            landing.push(Landing {
                offset,
                data: data[..keep].into(),
                before_op: st.rng.gen_range(1..=IN_FLIGHT_LAND_OPS_MAX),
            });
        }
        let seed = st.rng.gen::<u64>();
        let state = SimState {
            durable: st.durable.clone(),
            current: st.current.clone(),
            pending: st.pending.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            faults: FaultTargets::none(),
            counters: SimCounters::default(),
            in_flight: Vec::new(),
            landing,
            calls: 0,
        };
        drop(st);
        SimStorage {
            config: SimConfig {
                seed,
                ..self.config.clone()
            },
            state: Mutex::new(state),
            latch: FailureLatch::new(),
        }
    }

    /// Writes of a dead process not landed yet (nor dropped).
    pub fn in_flight_writes(&self) -> usize {
        self.state().landing.len()
    }

    /// Counts a call and lands the dead process's writes due before it
    /// (all of them before a write or flush, `mutating`).
    fn land_due(&self, st: &mut SimState, mutating: bool) {
        st.calls += 1;
        if st.landing.is_empty() {
            return;
        }
        let calls = st.calls;
        let (due, later): (Vec<Landing>, Vec<Landing>) = std::mem::take(&mut st.landing)
            .into_iter()
            .partition(|l| mutating || l.before_op <= calls);
        st.landing = later;
        for l in due {
            self.cache_write(st, l.offset, &l.data);
        }
    }

    /// If the process dies at this write (`FaultPlan::process_crash_at`):
    /// keeps `writes` in flight and latches; the error to return.
    fn process_dies(&self, st: &mut SimState, writes: &[(u64, &[u8])]) -> Option<StorageError> {
        let first = st.counters.writes + 1;
        let last = st.counters.writes + writes.len() as u64;
        let at = st
            .faults
            .process_crash_at
            .filter(|n| (first..=last).contains(n))?;
        st.faults.process_crash_at = None;
        st.counters.writes = last;
        st.in_flight = writes
            .iter()
            .map(|(offset, data)| (*offset, Box::<[u8]>::from(*data)))
            .collect();
        let (offset, len) = writes
            .get((at - first) as usize)
            .map_or((0, 0), |(o, d)| (*o, d.len() as u64));
        let failure = IoFailure {
            device: self.config.name.clone(),
            op: IoOp::Write,
            offset,
            len_bytes: len,
            cause: Arc::new(io::Error::other(
                "simulated process crash (SIGKILL) with I/O in flight",
            )),
        };
        Some(self.latch.trip(failure))
    }

    /// Flips bit `bit` (0..8) of the byte at `offset`, on the media and in
    /// what reads return (pending versions are not touched: if one reaches
    /// the media later it overwrites the corruption).
    pub fn flip_bit(&self, offset: u64, bit: u8) -> Result<(), SimError> {
        if bit >= 8 {
            return Err(SimError::BadBit { bit });
        }
        let size_bytes = self.config.geometry.size_bytes;
        if offset >= size_bytes {
            return Err(SimError::OutOfBounds {
                start: offset,
                end: offset.saturating_add(1),
                size_bytes,
            });
        }
        let mut st = self.state();
        let i = offset as usize;
        st.durable[i] ^= 1 << bit;
        st.current[i] ^= 1 << bit;
        Ok(())
    }

    /// Flips one seeded-random bit inside `range`; returns its byte offset
    /// and bit index.
    pub fn flip_random_bit(&self, range: Range<u64>) -> Result<(u64, u8), SimError> {
        let size_bytes = self.config.geometry.size_bytes;
        if range.start >= range.end || range.end > size_bytes {
            return Err(SimError::OutOfBounds {
                start: range.start,
                end: range.end,
                size_bytes,
            });
        }
        let (offset, bit) = {
            let mut st = self.state();
            let offset = st.rng.gen_range(range);
            (offset, st.rng.gen_range(0..8u8))
        };
        self.flip_bit(offset, bit)?;
        Ok((offset, bit))
    }

    fn eio_failure(&self, op: IoOp, offset: u64, len_bytes: u64) -> IoFailure {
        IoFailure {
            device: self.config.name.clone(),
            op,
            offset,
            len_bytes,
            cause: eio(),
        }
    }

    /// Where the write being counted lands: `None` for a lost write, another
    /// address for a misdirected one, else its own `offset`.
    fn silent_fault(&self, st: &SimState, offset: u64, len: usize) -> Option<u64> {
        let n = st.counters.writes;
        if st.faults.lost_write_at == Some(n) {
            return None;
        }
        match st.faults.misdirected_write_at {
            Some((at, to)) if at == n => {
                let size = self.config.geometry.size_bytes;
                let sector = self.sector_bytes();
                let to = to.min(size.saturating_sub(len as u64)) / sector * sector;
                Some(to)
            }
            _ => Some(offset),
        }
    }

    /// Applies one write to the volatile cache.
    fn cache_write(&self, st: &mut SimState, offset: u64, data: &[u8]) {
        let start = offset as usize;
        st.current[start..start + data.len()].copy_from_slice(data);
        let sector = self.sector_bytes() as usize;
        for (i, chunk) in data.chunks(sector).enumerate() {
            let index = offset / sector as u64 + i as u64;
            let versions = st.pending.entry(index).or_default();
            if versions.len() == PENDING_VERSIONS_MAX {
                versions.remove(0);
            }
            versions.push(chunk.to_vec().into_boxed_slice());
        }
    }
}

impl Storage for SimStorage {
    fn device_name(&self) -> &str {
        &self.config.name
    }

    fn geometry(&self) -> Geometry {
        self.config.geometry
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        self.latch.check()?;
        check_write_batch(
            &self.config.name,
            &self.config.geometry,
            IoOp::Write,
            writes,
        )?;
        let mut st = self.state();
        self.land_due(&mut st, true);
        let nonempty: Vec<(u64, &[u8])> = writes
            .iter()
            .copied()
            .filter(|(_, d)| !d.is_empty())
            .collect();
        if let Some(e) = self.process_dies(&mut st, &nonempty) {
            return Err(e);
        }
        let mut failed: Option<IoFailure> = None;
        for (offset, data) in writes {
            if data.is_empty() {
                continue;
            }
            st.counters.writes += 1;
            if failed.is_none() && st.faults.write_at == Some(st.counters.writes) {
                failed = Some(self.eio_failure(IoOp::Write, *offset, data.len() as u64));
            } else {
                st.counters.bytes_written += data.len() as u64;
            }
            let Some(at) = self.silent_fault(&st, *offset, data.len()) else {
                continue;
            };
            self.cache_write(&mut st, at, data);
        }
        match failed {
            Some(f) => Err(self.latch.trip(f)),
            None => Ok(()),
        }
    }

    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.latch.check()?;
        check_range(
            &self.config.name,
            &self.config.geometry,
            IoOp::WriteDurable,
            offset,
            data.len(),
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.state();
        self.land_due(&mut st, true);
        if let Some(e) = self.process_dies(&mut st, &[(offset, data)]) {
            return Err(e);
        }
        st.counters.writes += 1;
        st.counters.durable_writes += 1;
        if st.faults.write_at == Some(st.counters.writes) {
            self.cache_write(&mut st, offset, data);
            return Err(self.latch.trip(self.eio_failure(
                IoOp::WriteDurable,
                offset,
                data.len() as u64,
            )));
        }
        st.counters.bytes_written += data.len() as u64;
        let Some(offset) = self.silent_fault(&st, offset, data.len()) else {
            return Ok(());
        };
        let start = offset as usize;
        st.current[start..start + data.len()].copy_from_slice(data);
        st.durable[start..start + data.len()].copy_from_slice(data);
        let sector = self.sector_bytes();
        let first = offset / sector;
        let count = data.len() as u64 / sector;
        for index in first..first + count {
            // Older cached versions can no longer reach the media.
            st.pending.remove(&index);
        }
        Ok(())
    }

    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), StorageError> {
        self.latch.check()?;
        check_read_batch(&self.config.name, &self.config.geometry, reads)?;
        let mut st = self.state();
        self.land_due(&mut st, false);
        for (offset, buf) in reads.iter_mut() {
            if buf.is_empty() {
                continue;
            }
            st.counters.reads += 1;
            let end = *offset + buf.len() as u64;
            let media_error = st
                .faults
                .unreadable
                .is_some_and(|(from, to)| *offset < to && from < end);
            if media_error || st.faults.read_at == Some(st.counters.reads) {
                return Err(StorageError::Io {
                    device: self.config.name.clone(),
                    op: IoOp::Read,
                    offset: *offset,
                    len_bytes: buf.len() as u64,
                    source: eio(),
                });
            }
            let start = *offset as usize;
            let source = match &st.faults.stale {
                Some(old) if st.faults.stale_read_at == Some(st.counters.reads) => old,
                _ => &st.current,
            };
            buf.copy_from_slice(&source[start..start + buf.len()]);
            st.counters.bytes_read += buf.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.latch.check()?;
        let mut st = self.state();
        self.land_due(&mut st, true);
        st.counters.flushes += 1;
        if st.faults.flush_at == Some(st.counters.flushes) {
            return Err(self.latch.trip(self.eio_failure(IoOp::Flush, 0, 0)));
        }
        if st.faults.flush_clean_at == Some(st.counters.flushes) {
            // The unflushed writes are gone and their pages clean: the
            // device forgets them and does not latch.
            let sector = self.sector_bytes() as usize;
            let pending = std::mem::take(&mut st.pending);
            for index in pending.keys() {
                let start = *index as usize * sector;
                let old = st.durable[start..start + sector].to_vec();
                st.current[start..start + sector].copy_from_slice(&old);
            }
            let f = self.eio_failure(IoOp::Flush, 0, 0);
            return Err(StorageError::Io {
                device: f.device,
                op: IoOp::Flush,
                offset: 0,
                len_bytes: 0,
                source: f.cause,
            });
        }
        let sector = self.sector_bytes() as usize;
        let pending = std::mem::take(&mut st.pending);
        for (index, versions) in pending {
            if let Some(latest) = versions.last() {
                let start = index as usize * sector;
                st.durable[start..start + sector].copy_from_slice(latest);
            }
        }
        Ok(())
    }

    fn failure(&self) -> Option<IoFailure> {
        self.latch.failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_bytes;

    const SIZE: u64 = 1 << 20;

    fn sim(seed: u64) -> SimStorage {
        SimStorage::new(SimConfig::new(SIZE, seed)).expect("sim")
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; 4096]
    }

    #[test]
    fn config_validation() {
        assert!(SimStorage::new(SimConfig::new(SIZE, 1)).is_ok());
        let mut c = SimConfig::new(SIZE, 1);
        c.torn_probability = 1.5;
        assert!(matches!(
            SimStorage::new(c),
            Err(SimError::InvalidConfig { .. })
        ));
        let mut c = SimConfig::new(SIZE, 1);
        c.torn_unit_bytes = 3000;
        assert!(matches!(
            SimStorage::new(c),
            Err(SimError::InvalidConfig { .. })
        ));
        let c = SimConfig::new(SIZE + 100, 1);
        assert!(matches!(SimStorage::new(c), Err(SimError::Geometry(_))));
        let c = SimConfig::new(SIM_BYTES_MAX * 2, 1);
        assert!(matches!(
            SimStorage::new(c),
            Err(SimError::InvalidConfig { .. })
        ));
        assert!(matches!(
            SimStorage::from_image(SimConfig::new(SIZE, 1), vec![0; 10]),
            Err(SimError::ImageSize { .. })
        ));
    }

    #[test]
    fn reads_see_completed_writes_and_flush_makes_durable() {
        let s = sim(1);
        s.write_batch(&[(0, &block(1)), (8192, &block(2))])
            .expect("write");
        let mut out = vec![0u8; 12288];
        s.read(0, &mut out).expect("read");
        assert!(out[..4096].iter().all(|&b| b == 1));
        assert!(out[4096..8192].iter().all(|&b| b == 0));
        assert!(out[8192..].iter().all(|&b| b == 2));
        assert_eq!(s.unflushed_sectors(), 2);
        assert!(s.durable_image()[..4096].iter().all(|&b| b == 0));

        let lost = s.crash_with(CrashPolicy::LoseAll);
        assert!(lost.durable_image().iter().all(|&b| b == 0));
        let kept = s.crash_with(CrashPolicy::KeepAll);
        assert!(kept.durable_image()[..4096].iter().all(|&b| b == 1));

        s.flush().expect("flush");
        assert_eq!(s.unflushed_sectors(), 0);
        let after = s.crash_with(CrashPolicy::LoseAll);
        let mut back = vec![0u8; 4096];
        after.read(8192, &mut back).expect("read");
        assert!(back.iter().all(|&b| b == 2));
        let c = s.counters();
        assert_eq!(
            (c.writes, c.flushes, c.reads, c.bytes_written, c.bytes_read),
            (2, 1, 1, 8192, 12288)
        );
    }

    #[test]
    fn durable_write_survives_and_supersedes_older_pending() {
        let s = sim(2);
        s.write(0, &block(1)).expect("write");
        s.write_durable(0, &block(2)).expect("durable");
        s.write(4096, &block(3)).expect("write");
        for seed_round in 0..20 {
            let c = s.crash();
            let img = c.durable_image();
            assert!(img[..4096].iter().all(|&b| b == 2), "round {seed_round}");
        }
        let c = s.crash_with(CrashPolicy::LoseAll);
        assert!(c.durable_image()[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(s.counters().durable_writes, 1);
    }

    /// Every sector after a random crash is the durable content, one of its
    /// pending versions, or a tear of a version over its predecessor.
    #[test]
    fn random_crash_outcomes_are_allowed_states() {
        let mut config = SimConfig::new(SIZE, 77);
        config.torn_probability = 0.5;
        let s = SimStorage::new(config).expect("sim");
        s.write(0, &block(9)).expect("w");
        s.flush().expect("flush");
        s.write_batch(&[(0, &block(1)), (4096, &[5u8; 8192])])
            .expect("w");
        s.write(0, &block(2)).expect("w");
        let mut seen_states = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let img = s.crash().durable_image();
            let sector0 = &img[..4096];
            let state = if sector0.iter().all(|&b| b == 9) {
                "durable"
            } else if sector0.iter().all(|&b| b == 1) {
                "v1"
            } else if sector0.iter().all(|&b| b == 2) {
                "v2"
            } else {
                // Torn: a prefix of v1 over durable, or of v2 over v1, at a
                // 512-byte boundary.
                let cut = sector0
                    .iter()
                    .position(|&b| b != sector0[0])
                    .expect("mixed");
                assert_eq!(cut % 512, 0);
                let (new, old) = (sector0[0], sector0[4095]);
                assert!(matches!((new, old), (1, 9) | (2, 1)), "{new} over {old}");
                assert!(sector0[cut..].iter().all(|&b| b == old));
                "torn"
            };
            seen_states.insert(state);
            // Sectors 1 and 2 had one pending version (5s over zeros): each
            // is all old, all new, or a 512-granular prefix of new over old.
            for sector in [&img[4096..8192], &img[8192..12288]] {
                let cut = sector.iter().position(|&b| b != 5).unwrap_or(4096);
                assert_eq!(cut % 512, 0, "tear not on a 512-byte boundary");
                assert!(
                    sector[cut..].iter().all(|&b| b == 0),
                    "unexpected sector content"
                );
            }
        }
        assert_eq!(seen_states.len(), 4, "{seen_states:?}");
    }

    #[test]
    fn crashes_are_reproducible_from_the_seed() {
        let run = |seed: u64| {
            let s = sim(seed);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for i in 0..64u64 {
                let data = random_bytes(&mut rng, 4096);
                s.write(i * 4096, &data).expect("w");
                if i == 20 {
                    s.flush().expect("f");
                }
            }
            let first = s.crash();
            let second = first.crash_with(CrashPolicy::KeepAll);
            (
                first.durable_image(),
                second.durable_image(),
                first.config().seed,
            )
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).0, run(6).0);
    }

    #[test]
    fn injected_write_failure_latches() {
        let s = sim(3);
        s.write(0, &block(1)).expect("w");
        s.set_fault_plan(FaultPlan {
            write_eio_at: Some(2),
            ..FaultPlan::default()
        });
        s.write(4096, &block(2))
            .expect("first write after the plan succeeds");
        let err = s
            .write_batch(&[(8192, &block(3)), (12288, &block(4))])
            .expect_err("second write fails");
        match &err {
            StorageError::Failed {
                op,
                offset,
                len_bytes,
                cause,
                device,
            } => {
                assert_eq!((*op, *offset, *len_bytes), (IoOp::Write, 8192, 4096));
                assert_eq!(cause.raw_os_error(), Some(libc::EIO));
                assert_eq!(device, "sim-0x3");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        let mut out = block(0);
        for r in [
            s.write(0, &out.clone()),
            s.flush(),
            s.read(0, &mut out),
            s.write_durable(0, &block(0)),
        ] {
            match r {
                Err(StorageError::Failed { offset: 8192, .. }) => {}
                other => panic!("expected latched failure, got {other:?}"),
            }
        }
        assert_eq!(s.failure().map(|f| f.offset), Some(8192));
        // The failed batch may or may not have reached the media.
        let kept = s.crash_with(CrashPolicy::KeepAll);
        assert!(kept.durable_image()[8192..12288].iter().all(|&b| b == 3));
        let lost = s.crash_with(CrashPolicy::LoseAll);
        assert!(lost.durable_image()[8192..12288].iter().all(|&b| b == 0));
        // The crashed device is healthy again.
        assert!(lost.failure().is_none());
        lost.write(0, &block(7)).expect("healthy after crash");
    }

    #[test]
    fn injected_flush_and_durable_write_failures_latch() {
        let s = sim(4);
        s.write(0, &block(1)).expect("w");
        s.set_fault_plan(FaultPlan {
            flush_eio_at: Some(1),
            ..FaultPlan::default()
        });
        match s.flush() {
            Err(StorageError::Failed {
                op: IoOp::Flush, ..
            }) => {}
            other => panic!("expected flush failure, got {other:?}"),
        }
        // Pending data stayed pending: a crash may still lose it.
        assert_eq!(s.unflushed_sectors(), 1);
        assert!(s.crash_with(CrashPolicy::LoseAll).durable_image()[..4096]
            .iter()
            .all(|&b| b == 0));

        let s = sim(5);
        s.set_fault_plan(FaultPlan {
            write_eio_at: Some(1),
            ..FaultPlan::default()
        });
        match s.write_durable(4096, &block(1)) {
            Err(StorageError::Failed {
                op: IoOp::WriteDurable,
                offset: 4096,
                ..
            }) => {}
            other => panic!("expected durable write failure, got {other:?}"),
        }
        assert!(s.durable_image()[4096..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn injected_read_failure_does_not_latch() {
        let s = sim(6);
        s.set_fault_plan(FaultPlan {
            read_eio_at: Some(2),
            ..FaultPlan::default()
        });
        let mut a = block(0);
        let mut b = block(0);
        match s.read_batch(&mut [(0, &mut a[..]), (4096, &mut b[..])]) {
            Err(StorageError::Io {
                op: IoOp::Read,
                offset: 4096,
                ..
            }) => {}
            other => panic!("expected read Io error, got {other:?}"),
        }
        assert!(s.failure().is_none());
        s.read(4096, &mut b).expect("next read succeeds");
        s.write(0, &block(1)).expect("writes still work");
    }

    #[test]
    fn argument_errors() {
        let s = sim(7);
        assert!(matches!(
            s.write(100, &block(0)),
            Err(StorageError::Misaligned { .. })
        ));
        assert!(matches!(
            s.write(SIZE, &block(0)),
            Err(StorageError::OutOfBounds { .. })
        ));
        assert!(matches!(
            s.write_batch(&[(0, &[0u8; 8192]), (4096, &block(0))]),
            Err(StorageError::Overlap { .. })
        ));
        let mut out = [0u8; 10];
        assert!(matches!(
            s.read(0, &mut out),
            Err(StorageError::Misaligned { .. })
        ));
        assert!(s.failure().is_none());
        assert_eq!(s.counters(), SimCounters::default());
    }

    #[test]
    fn bit_flips() {
        let s = sim(8);
        s.write(0, &block(0xF0)).expect("w");
        s.flush().expect("f");
        s.flip_bit(10, 0).expect("flip");
        let mut out = block(0);
        s.read(0, &mut out).expect("r");
        assert_eq!(out[10], 0xF1);
        assert_eq!(s.crash().durable_image()[10], 0xF1);
        assert!(matches!(
            s.flip_bit(SIZE, 0),
            Err(SimError::OutOfBounds { .. })
        ));
        assert!(matches!(s.flip_bit(0, 8), Err(SimError::BadBit { bit: 8 })));
        let (offset, bit) = s.flip_random_bit(4096..8192).expect("random flip");
        assert!((4096..8192).contains(&offset) && bit < 8);
        s.read(4096, &mut out).expect("r");
        assert_eq!(out[(offset - 4096) as usize], 1 << bit);
        assert!(s.flip_random_bit(10..10).is_err());
    }

    #[test]
    fn pending_versions_are_bounded() {
        let s = sim(9);
        for i in 0..(PENDING_VERSIONS_MAX as u8 + 3) {
            s.write(0, &block(i + 1)).expect("w");
        }
        let st = s.state();
        assert_eq!(st.pending.get(&0).map(Vec::len), Some(PENDING_VERSIONS_MAX));
    }

    #[test]
    fn usable_from_threads() {
        let s = Arc::new(sim(10));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..16u64 {
                        s.write((t * 16 + i) * 4096, &[t as u8 + 1; 4096])
                            .expect("w");
                    }
                    s.flush().expect("f");
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        let img = s.crash_with(CrashPolicy::LoseAll).durable_image();
        for t in 0..4usize {
            assert!(img[t * 16 * 4096..(t + 1) * 16 * 4096]
                .iter()
                .all(|&b| b == t as u8 + 1));
        }
    }

    /// A process crash keeps the cache and holds the call's writes in
    /// flight; on the next process each lands before its first write or
    /// flush, or never, as the seed decides, and only in the cache.
    #[test]
    fn process_crash_keeps_the_cache_and_lands_in_flight_writes_late_or_never() {
        let mut outcomes = [0u32; 3];
        for seed in 0..64 {
            let s = sim(seed);
            s.write(0, &block(1)).expect("completed, unflushed");
            s.set_fault_plan(FaultPlan {
                process_crash_at: Some(2),
                ..FaultPlan::default()
            });
            s.write_durable(4096, &block(2)).expect("before the crash");
            let err = s.write(8192, &block(3)).expect_err("the process dies");
            assert!(err.to_string().contains("process crash"), "{err}");
            assert!(
                s.read(0, &mut [0u8; 4096]).is_err(),
                "a dead process reads nothing"
            );
            let next = s.process_crash();
            assert_eq!(
                next.unflushed_sectors(),
                1,
                "the cache survives a process crash"
            );
            let waiting = next.in_flight_writes();
            let mut first = vec![0u8; 4096];
            next.read(8192, &mut first).expect("read");
            next.flush().expect("flush");
            assert_eq!(next.in_flight_writes(), 0, "all landed before the flush");
            let mut after = vec![0u8; 4096];
            next.read(8192, &mut after).expect("read");
            let landed = after == block(3);
            assert!(landed || after == block(0));
            assert!(waiting == 1 || !landed);
            // Landed before or after the first read.
            outcomes[usize::from(landed) + usize::from(landed && first == block(0))] += 1;
            let mut zero = vec![0u8; 4096];
            next.read(0, &mut zero).expect("read");
            assert_eq!(zero, block(1));
            // Durable only through the flush: a power loss keeps it now.
            let after_loss = next.crash_with(CrashPolicy::LoseAll);
            let mut b = vec![0u8; 4096];
            after_loss.read(8192, &mut b).expect("read");
            assert_eq!(b == block(3), landed);
        }
        assert!(
            outcomes.iter().all(|&n| n > 0),
            "never, early, late: {outcomes:?}"
        );
    }
}
