#!/usr/bin/env python3
"""admin: whole-filesystem operations: defragment with compression
(`-czstd`, `-clzo`) of shared files, balance converting profiles
(metadata dup -> single -> dup, data single -> dup -> single), resize shrink
and grow, scrub, `btrfs send --proto 2 --compressed-data | btrfs receive`
(encoded writes of compressed extents), a device add and remove
(relocation of every chunk), and snapshot deletion.

Scale 1.0: 1200 files.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.environ.get("CAPTURE_WORKLOADS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../../shared/capture/workloads")))
from wl_common import BLK, DirectWriter, args, block_bytes, log, run, sync  # noqa: E402

mnt, seed, scale, rng = args()
n = max(50, int(1200 * scale))
vol = os.path.join(mnt, "vol")
run("btrfs", "subvolume", "create", vol)
comp = os.path.join(vol, "comp")
os.makedirs(comp)
run("btrfs", "property", "set", comp, "compression", "zstd")
plain = os.path.join(vol, "plain")
os.makedirs(plain)
for i in range(n):
    with open(os.path.join(comp, "c%d" % i), "wb") as f:
        f.write((b"refd %d %d " % (seed, i)) * rng.randint(100, 30000))
    with open(os.path.join(plain, "p%d" % i), "wb") as f:
        for k in range(rng.randint(1, 6)):
            f.write(block_bytes("p%d:%d:%d" % (seed, i, k), rng.randint(1, 16) * BLK))
            if rng.random() < 0.5:
                f.flush()
                os.fsync(f.fileno())
    if rng.random() < 0.3:
        os.setxattr(os.path.join(plain, "p%d" % i), "user.k", b"v" * rng.randint(100, 3000))
# fragmented text file, compressible
frag = os.path.join(plain, "frag")
w = DirectWriter(frag)
for k in rng.sample(range(800), 800):
    w.write(k * BLK, ((b"frag %d " % k) * 1000)[:BLK])
w.close()
sync()
snap = os.path.join(mnt, "snap")
run("btrfs", "subvolume", "snapshot", "-r", vol, snap)
log("populated")

# send --compressed-data | receive (encoded writes)
recv = os.path.join(mnt, "recv")
os.makedirs(recv)
r = os.system("btrfs send -q --proto 2 --compressed-data %s | btrfs receive -q %s" % (snap, recv))
log("send --compressed-data | receive rc=%d" % r)
sync()

# defragment with compression: breaks sharing with snap
run("btrfs", "filesystem", "defragment", "-r", "-czstd", plain, check=False)
sync()
run("btrfs", "filesystem", "defragment", "-r", "-clzo", comp, check=False)
sync()
# overwrite some, unlink some
for i in rng.sample(range(n), n // 5):
    p = os.path.join(plain, "p%d" % i)
    with open(p, "r+b") as f:
        f.write(block_bytes("o%d" % i, BLK))
for i in rng.sample(range(n), n // 5):
    os.unlink(os.path.join(comp, "c%d" % i))
sync()

run("btrfs", "scrub", "start", "-B", mnt, check=False)
run("btrfs", "balance", "start", "-f", "-mconvert=single", "-sconvert=single", mnt, check=False)
sync()
run("btrfs", "balance", "start", "-dconvert=dup", mnt, check=False)
sync()
run("btrfs", "filesystem", "resize", "-400M", mnt, check=False)
run("btrfs", "filesystem", "resize", "max", mnt, check=False)
run("btrfs", "balance", "start", "-dconvert=single", "-mconvert=dup", "-sconvert=dup", "-f", mnt, check=False)
sync()

# a second device, added then removed: relocates everything on it
img2 = os.path.join(os.environ.get("TMPDIR", "/tmp"), "capA-admin-dev2-%d.img" % os.getpid())
with open(img2, "wb") as f:
    f.truncate(1 << 30)
dev2 = subprocess.run(["losetup", "-f", "--show", img2], stdout=subprocess.PIPE, text=True).stdout.strip()
try:
    run("btrfs", "device", "add", "-f", dev2, mnt, check=False)
    run("btrfs", "balance", "start", "-dlimit=3", "-mlimit=2", mnt, check=False)
    for i in rng.sample(range(n), n // 5):
        with open(os.path.join(plain, "q%d" % i), "wb") as f:
            f.write(block_bytes("q%d" % i, rng.randint(1, 8) * BLK))
    sync()
    run("btrfs", "device", "remove", dev2, mnt, check=False)
finally:
    sync()
    subprocess.run(["losetup", "-d", dev2])
    os.unlink(img2)
run("btrfs", "subvolume", "delete", snap)
run("btrfs", "subvolume", "sync", mnt)
sync()
log("done")
