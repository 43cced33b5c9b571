#!/usr/bin/env python3
"""fileops: file-level paths the shared workloads touch little: fallocate,
punch hole, zero range (xfs_io falloc/fpunch/fzero, keep-size too), many
small inline files grown past max_inline, hard links and xattrs, O_DIRECT
writes, truncate of reflinked files, partial-range dedupe (xfs_io dedupe),
a file with thousands of extents, renameat2 RENAME_EXCHANGE, copy_file_range,
and fsync storms over many files (log tree writes).

Scale 1.0: 3000 small files, a 4000-extent file.
"""
import ctypes
import os
import sys

sys.path.insert(0, os.environ.get("CAPTURE_WORKLOADS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../../shared/capture/workloads")))
from wl_common import BLK, DirectWriter, args, block_bytes, clone_range, log, run, sync  # noqa: E402

mnt, seed, scale, rng = args()
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2
d = os.path.join(mnt, "d")
os.makedirs(d)


def xio(path, *cmds):
    a = ["xfs_io", "-f"]
    for c in cmds:
        a += ["-c", c]
    a.append(path)
    return run(*a, check=False, quiet=True)


# many small inline files, xattrs, hard links
nsmall = max(50, int(3000 * scale))
small = os.path.join(d, "small")
os.makedirs(small)
for i in range(nsmall):
    p = os.path.join(small, "s%05d" % i)
    with open(p, "wb") as f:
        f.write(block_bytes("i%d:%d" % (seed, i), rng.randint(1, 2000)))
    if rng.random() < 0.3:
        os.setxattr(p, "user.a", block_bytes("xa%d" % i, rng.randint(10, 3000)))
    if rng.random() < 0.1:
        os.link(p, p + ".l")
sync()
# grow some past inline, shrink some back
for i in rng.sample(range(nsmall), nsmall // 3):
    p = os.path.join(small, "s%05d" % i)
    with open(p, "ab") as f:
        f.write(block_bytes("g%d" % i, rng.randint(2000, 20000)))
sync()
for i in rng.sample(range(nsmall), nsmall // 5):
    p = os.path.join(small, "s%05d" % i)
    os.truncate(p, rng.randint(0, 1500))
sync()
log("small files done")

# fallocate / punch / zero range on preallocated and written files
nfa = max(10, int(120 * scale))
for i in range(nfa):
    p = os.path.join(d, "fa%d" % i)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, block_bytes("fa%d" % i, rng.randint(4, 64) * BLK), 0)
    os.close(fd)
    cmds = []
    for _ in range(rng.randint(2, 8)):
        off = rng.randrange(0, 96) * BLK
        ln = rng.randint(1, 16) * BLK
        c = rng.choice(["falloc", "falloc -k", "fpunch", "fzero", "fzero -k", "pwrite -S 0x61", "truncate"])
        if c == "truncate":
            cmds.append("truncate %d" % off)
        else:
            cmds.append("%s %d %d" % (c, off, ln))
    if rng.random() < 0.5:
        cmds.append("fsync")
    xio(p, *cmds)
sync()
log("fallocate/punch/zero done")

# a file with thousands of extents (O_DIRECT, shuffled), reflinked, truncated
nx = max(200, int(4000 * scale))
many = os.path.join(d, "many")
w = DirectWriter(many)
order = list(range(nx))
rng.shuffle(order)
for k in order:
    w.write(2 * k * BLK, block_bytes("m%d:%d" % (seed, k), BLK))
w.close()
sync()
run("cp", "--reflink=always", many, many + ".r1")
clone_range(many, many + ".r2", 0, nx * BLK, 0)
sync()
os.truncate(many + ".r1", nx * BLK // 3)
os.truncate(many, nx * BLK)
os.truncate(many + ".r2", 0)
sync()
# O_DIRECT overwrites of the reflinked copy, partial-range dedupe into it
w = DirectWriter(many + ".r1", create=False)
for k in rng.sample(range(nx // 6), nx // 30):
    w.write(2 * k * BLK, block_bytes("m%d:%d" % (seed, k), BLK))  # same content
w.close()
sync()
dd = os.path.join(d, "dd")
w = DirectWriter(dd)
for k in range(64):
    w.write(k * 4 * BLK, block_bytes("m%d:%d" % (seed, k), BLK))
w.close()
sync()
for k in range(0, 64, 3):
    xio(dd, "dedupe %s %d %d %d" % (many, 2 * k * BLK, k * 4 * BLK, BLK))
# partial range of a larger extent
big = os.path.join(d, "big")
with open(big, "wb") as f:
    f.write(block_bytes("big%d" % seed, 256 * BLK))
sync()
big2 = os.path.join(d, "big2")
with open(big2, "wb") as f:
    f.write(block_bytes("big%d" % seed, 256 * BLK))
sync()
for k in range(0, 256, 32):
    xio(big2, "dedupe %s %d %d %d" % (big, k * BLK, k * BLK, rng.randint(1, 16) * BLK))
sync()
log("many-extents / dedupe done")

# rename exchange, copy_file_range
names = sorted(os.listdir(small))
for k in range(min(500, len(names) // 2)):
    a = os.path.join(small, names[rng.randrange(len(names))])
    b = os.path.join(small, names[rng.randrange(len(names))])
    if a != b and os.path.exists(a) and os.path.exists(b):
        libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE)
for k in range(max(10, int(100 * scale))):
    a = os.path.join(d, "fa%d" % rng.randrange(nfa))
    xio(os.path.join(d, "cfr%d" % k), "copy_range -s 0 -d %d -l %d %s" % (rng.randint(0, 8) * BLK, rng.randint(1, 8) * BLK, a))
sync()

# fsync storm: many files written and fsync'd, interleaved with renames and unlinks
storm = os.path.join(d, "storm")
os.makedirs(storm)
for r in range(max(3, int(10 * scale))):
    fds = []
    for i in range(60):
        p = os.path.join(storm, "t%d" % i)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, block_bytes("st%d:%d" % (r, i), rng.choice([100, 3000, BLK, 3 * BLK])))
        fds.append(fd)
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    for i in rng.sample(range(60), 10):
        p = os.path.join(storm, "t%d" % i)
        if rng.random() < 0.5:
            os.rename(p, p + ".x%d" % r)
        else:
            os.unlink(p)
    fd = os.open(storm, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
sync()
# unlink half of everything
for p in rng.sample(sorted(os.listdir(small)), len(os.listdir(small)) // 2):
    os.unlink(os.path.join(small, p))
os.unlink(many)
sync()
log("done")
