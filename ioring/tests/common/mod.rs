//! Helpers shared by the log integration tests: a seeded generator, test
//! records that carry a unique id and can be verified, a superblock
//! builder, and [`CrashAt`], a storage wrapper that loses power at its Nth
//! mutating operation.

#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex};

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use refd_ioring::format::{
    pick_newest, FsId, Layout, Superblock, NODE_BYTES, SUPERBLOCK_BYTES, SUPERBLOCK_SLOT_ADDRS,
};
use refd_ioring::log::Lsn;
use refd_ioring::{
    Geometry, IoFailure, IoOp, LogBounds, Replay, SimStorage, Storage, StorageError,
};

pub const FS: FsId = FsId([0x3C; 16]);
pub const LOG_START: u64 = 8192;

/// The test's own seeded choices: `rand_chacha`'s [`ChaCha8Rng`]
/// (value-stable across platforms and releases) with the two helpers the
/// tests use everywhere.
#[derive(Debug, Clone)]
pub struct Gen(ChaCha8Rng);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }
    /// True with probability `percent / 100` (`percent <= 100`).
    pub fn percent(&mut self, percent: u32) -> bool {
        self.0.gen_ratio(percent, 100)
    }
}

/// A test record: the id (8 bytes LE) followed by bytes derived from the id,
/// `len >= 8` in total.
pub fn record(id: u64, len: usize) -> Vec<u8> {
    let len = len.max(8);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&id.to_le_bytes());
    let mut x = id.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

/// The id of a record if its content is exactly what [`record`] generates
/// for that id and length; `None` for anything never submitted.
pub fn parse_record(data: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    (record(id, data.len()) == data).then_some(id)
}

/// A valid superblock for a device with the log at [`LOG_START`] and one
/// node after it.
pub fn superblock(geometry: Geometry, log_bytes: u64, generation: u64, b: LogBounds) -> Superblock {
    let node_region_start = LOG_START + log_bytes;
    let mut sb = Superblock {
        generation,
        last_txn_id: generation,
        ..Superblock::empty(
            FS,
            geometry,
            Layout {
                log_start: LOG_START,
                log_bytes,
                node_region_start,
                node_region_bytes: NODE_BYTES as u64,
            },
        )
    };
    b.apply_to(&mut sb);
    sb
}

/// Device size for a log of `log_bytes`.
pub fn device_bytes(log_bytes: u64) -> u64 {
    LOG_START + log_bytes + NODE_BYTES as u64
}

/// The newest valid superblock on `dev`.
pub fn read_superblock<S: Storage + ?Sized>(dev: &S) -> Result<Superblock, String> {
    let mut a = vec![0u8; SUPERBLOCK_BYTES];
    let mut b = vec![0u8; SUPERBLOCK_BYTES];
    dev.read(SUPERBLOCK_SLOT_ADDRS[0], &mut a)
        .map_err(|e| e.to_string())?;
    dev.read(SUPERBLOCK_SLOT_ADDRS[1], &mut b)
        .map_err(|e| e.to_string())?;
    pick_newest(&a, &b)
        .map(|c| c.superblock)
        .map_err(|e| e.to_string())
}

/// Writes `sb` durably at its slot.
pub fn write_superblock<S: Storage + ?Sized>(dev: &S, sb: &Superblock) -> Result<(), StorageError> {
    let block = sb.encode().expect("encode superblock");
    dev.write_durable(sb.addr(), &block)
}

#[derive(Debug)]
struct CrashState {
    ops: u64,
    crash_at: u64,
    crashed: bool,
    image: Option<SimStorage>,
}

/// A [`SimStorage`] that loses power during its `crash_at`-th mutating
/// operation (write, durable write or flush, counted from 1): the data of
/// that operation reaches the volatile cache only (so it may survive, be
/// lost or be torn), the crash image is taken with the simulator's seeded
/// random policy, and that call and every later call fail as on a latched
/// device. Calls are serialized, so an operation that returned `Ok` before
/// the crash is entirely in the image.
#[derive(Debug)]
pub struct CrashAt {
    inner: SimStorage,
    state: Mutex<CrashState>,
    name: String,
}

fn power_loss(device: &str, op: IoOp, offset: u64, len_bytes: u64) -> IoFailure {
    IoFailure {
        device: device.to_string(),
        op,
        offset,
        len_bytes,
        cause: Arc::new(io::Error::other("simulated power loss")),
    }
}

fn failed(f: &IoFailure) -> StorageError {
    StorageError::Failed {
        device: f.device.clone(),
        op: f.op,
        offset: f.offset,
        len_bytes: f.len_bytes,
        cause: Arc::clone(&f.cause),
    }
}

impl CrashAt {
    pub fn new(inner: SimStorage, crash_at: u64) -> Self {
        let name = inner.device_name().to_string();
        Self {
            inner,
            state: Mutex::new(CrashState {
                ops: 0,
                crash_at,
                crashed: false,
                image: None,
            }),
            name,
        }
    }

    /// True once the crash happened.
    pub fn crashed(&self) -> bool {
        self.state.lock().expect("crash state").crashed
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().expect("crash state").ops
    }

    /// The device after the power loss: the crash image if the crash
    /// happened, else the device crashes now. Every later call fails.
    pub fn take_image(&self) -> SimStorage {
        let mut st = self.state.lock().expect("crash state");
        st.crashed = true;
        match st.image.take() {
            Some(image) => image,
            None => self.inner.crash(),
        }
    }

    fn mutate(
        &self,
        op: IoOp,
        offset: u64,
        len_bytes: u64,
        to_cache: impl FnOnce(&SimStorage),
        normal: impl FnOnce(&SimStorage) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut st = self.state.lock().expect("crash state");
        if st.crashed {
            return Err(failed(&power_loss(&self.name, op, offset, len_bytes)));
        }
        st.ops += 1;
        if st.ops == st.crash_at {
            to_cache(&self.inner);
            st.crashed = true;
            st.image = Some(self.inner.crash());
            return Err(failed(&power_loss(&self.name, op, offset, len_bytes)));
        }
        normal(&self.inner)
    }
}

impl Storage for CrashAt {
    fn device_name(&self) -> &str {
        &self.name
    }
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        let (offset, len) = writes.first().map_or((0, 0), |(o, d)| (*o, d.len() as u64));
        self.mutate(
            IoOp::Write,
            offset,
            len,
            |s| {
                let _ = s.write_batch(writes);
            },
            |s| s.write_batch(writes),
        )
    }
    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.mutate(
            IoOp::WriteDurable,
            offset,
            data.len() as u64,
            |s| {
                // In flight when power fails: in the cache, maybe torn.
                let _ = s.write(offset, data);
            },
            |s| s.write_durable(offset, data),
        )
    }
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), StorageError> {
        let st = self.state.lock().expect("crash state");
        if st.crashed {
            return Err(failed(&power_loss(&self.name, IoOp::Read, 0, 0)));
        }
        self.inner.read_batch(reads)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.mutate(IoOp::Flush, 0, 0, |_| {}, |s| s.flush())
    }
    fn failure(&self) -> Option<IoFailure> {
        let st = self.state.lock().expect("crash state");
        if st.crashed {
            return Some(power_loss(&self.name, IoOp::Write, 0, 0));
        }
        self.inner.failure()
    }
}

/// One replayed record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub lsn: Lsn,
    pub txn_id: u64,
    pub data: Vec<u8>,
}

/// Every record of `r`, read from `storage` with [`Replay::stream`].
pub fn records<S: Storage + ?Sized>(r: &Replay, storage: &S) -> Vec<Rec> {
    let mut out = Vec::with_capacity(r.record_count());
    let mut stream = r.stream(storage);
    while let Some(x) = stream.next_record().expect("read the replayed records") {
        out.push(Rec {
            lsn: x.lsn,
            txn_id: x.txn_id,
            data: x.data.to_vec(),
        });
    }
    out
}
