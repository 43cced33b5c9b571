#!/usr/bin/env python3
"""mixed: paths the six standard workloads touch little: nodatacow files
overwritten before and after a snapshot, compressed files, preallocated
extents split by partial writes, defragment of a snapshotted subvolume (breaks
sharing), send | receive (receive clones), fsync'd appends (log tree),
deletion of a deep subvolume, and a filtered balance plus a shrink.
"""
import os
import sys

sys.path.insert(0, os.environ.get("CAPTURE_WORKLOADS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../../shared/capture/workloads")))
from wl_common import BLK, args, block_bytes, log, run, sync  # noqa: E402

mnt, seed, scale, rng = args()
n = max(20, int(400 * scale))
vol = os.path.join(mnt, "vol")
run("btrfs", "subvolume", "create", vol)

# nodatacow directory (attribute inherited by new files)
nocow = os.path.join(vol, "nocow")
os.makedirs(nocow)
run("chattr", "+C", nocow)
comp = os.path.join(vol, "comp")
os.makedirs(comp)
run("btrfs", "property", "set", comp, "compression", "zstd")
plain = os.path.join(vol, "plain")
os.makedirs(plain)

for i in range(n):
    with open(os.path.join(nocow, "f%d" % i), "wb") as f:
        f.write(block_bytes("n%d:%d" % (seed, i), rng.randint(1, 8) * BLK))
    with open(os.path.join(comp, "c%d" % i), "wb") as f:
        f.write((b"refd %d " % i) * rng.randint(500, 20000))
    with open(os.path.join(plain, "p%d" % i), "wb") as f:
        f.write(block_bytes("p%d:%d" % (seed, i), rng.randint(1, 48) * BLK))
sync()
log("populated %d x 3 files" % n)

# preallocated extents, then partial writes that split them
for i in range(max(4, n // 20)):
    p = os.path.join(plain, "pre%d" % i)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, 64 * BLK)
    for _ in range(rng.randint(1, 6)):
        off = rng.randrange(0, 64) * BLK
        os.pwrite(fd, block_bytes("pre%d:%d" % (i, off), BLK * rng.randint(1, 3)), off)
    os.fsync(fd)
    os.close(fd)
sync()

# nocow overwrites in place, then a snapshot, then overwrites again (COW once)
def overwrite_nocow(tag):
    for i in rng.sample(range(n), max(1, n // 4)):
        p = os.path.join(nocow, "f%d" % i)
        size = os.path.getsize(p)
        fd = os.open(p, os.O_WRONLY)
        os.pwrite(fd, block_bytes("o%s:%d" % (tag, i), BLK), rng.randrange(0, max(1, size // BLK)) * BLK)
        os.close(fd)
    sync()

overwrite_nocow("a")
snap = os.path.join(mnt, "snap1")
run("btrfs", "subvolume", "snapshot", "-r", vol, snap)
overwrite_nocow("b")

# fsync'd appends: log tree
for i in range(max(10, n // 4)):
    p = os.path.join(plain, "log%d" % (i % 7))
    with open(p, "ab") as f:
        f.write(block_bytes("l%d" % i, rng.randint(1, 3) * BLK))
        f.flush()
        os.fsync(f.fileno())

# reflinks inside the subvolume and a clone range
for i in rng.sample(range(n), max(1, n // 10)):
    src = os.path.join(plain, "p%d" % i)
    run("cp", "--reflink=always", src, src + ".ref", quiet=True)
sync()

# send | receive: receive re-creates the snapshot with clones
recv = os.path.join(mnt, "recv")
os.makedirs(recv)
r = os.system("btrfs send -q %s | btrfs receive -q %s" % (snap, recv))
log("send|receive rc=%d" % r)
sync()

# defragment the writable subvolume: breaks sharing with the snapshot
run("btrfs", "filesystem", "defragment", "-r", "-czstd", comp, check=False)
run("btrfs", "filesystem", "defragment", "-r", plain, check=False)
sync()

# a deep subvolume, snapshotted, then both deleted
deep = os.path.join(mnt, "deep")
run("btrfs", "subvolume", "create", deep)
for i in range(int(2000 * scale) + 50):
    d = os.path.join(deep, "d%d" % (i % 50))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "x%d" % i), "wb") as f:
        f.write(b"x" * rng.randint(1, 3000))
    os.setxattr(os.path.join(d, "x%d" % i), "user.k", b"v" * rng.randint(100, 2000))
sync()
run("btrfs", "subvolume", "snapshot", deep, os.path.join(mnt, "deep2"))
run("btrfs", "subvolume", "delete", deep)
run("btrfs", "subvolume", "sync", mnt)
run("btrfs", "subvolume", "delete", snap)
run("btrfs", "subvolume", "sync", mnt)

# deletes, then a filtered balance and a shrink (relocation)
for i in rng.sample(range(n), n // 3):
    os.unlink(os.path.join(plain, "p%d" % i))
sync()
run("btrfs", "balance", "start", "-dusage=60", "-musage=60", mnt, check=False)
run("btrfs", "filesystem", "resize", "-300M", mnt, check=False)
sync()
log("done")
