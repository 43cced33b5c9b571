#!/usr/bin/env python3
"""qgclean: quota groups with inheritance (nested qgroups, snapshot -i, -c
copy), then deletion of the SOURCE subvolume while snapshots still share its
tree (the cleaner walks a shared tree: FULL_BACKREF conversions, shared refs
dropped), a large snapshot deleted after divergence, quota rescan, then quota
disable (the quota tree is freed).  Backref walks in the background hold
tree-mod-log seqs.

Scale 1.0: 2500 files with xattrs, a 1500-extent file, 3 snapshots.
"""
import os
import subprocess
import sys
import threading

sys.path.insert(0, os.environ.get("CAPTURE_WORKLOADS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../../shared/capture/workloads")))
from wl_common import BLK, DirectWriter, args, block_bytes, log, run, sync  # noqa: E402

mnt, seed, scale, rng = args()
nfiles = max(100, int(2500 * scale))
run("btrfs", "quota", "enable", mnt)
for q in ("1/1", "1/2", "2/1"):
    run("btrfs", "qgroup", "create", q, mnt)
run("btrfs", "qgroup", "assign", "1/1", "2/1", mnt, check=False)
src = os.path.join(mnt, "src")
run("btrfs", "subvolume", "create", "-i", "1/1", src)
for i in range(nfiles):
    d = os.path.join(src, "d%02d" % (i % 20))
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "f%05d" % i)
    r = rng.random()
    size = rng.randint(1, 3000) if r < 0.4 else rng.randint(1, 24) * BLK
    with open(p, "wb") as f:
        f.write(block_bytes("s%d:%d" % (seed, i), size))
    os.setxattr(p, "user.x", block_bytes("x%d" % i, rng.randint(200, 2000)))
big = os.path.join(src, "big")
w = DirectWriter(big)
nx = max(100, int(1500 * scale))
order = list(range(nx))
rng.shuffle(order)
for k in order:
    w.write(k * BLK, block_bytes("b%d:%d" % (seed, k), BLK))
w.close()
sync()
log("populated %d files, big with %d extents" % (nfiles, nx))

s1 = os.path.join(mnt, "s1")
s2 = os.path.join(mnt, "s2")
s3 = os.path.join(mnt, "s3")
run("btrfs", "subvolume", "snapshot", "-i", "1/1", src, s1)
run("btrfs", "subvolume", "snapshot", "-i", "1/2", s1, s2)
run("btrfs", "subvolume", "snapshot", "-r", src, s3)


def modify(root, tag, n):
    files = []
    for dp, dn, fn in os.walk(root):
        dn.sort()
        files.extend(os.path.join(dp, f) for f in sorted(fn))
    for k in range(n):
        p = files[rng.randrange(len(files))]
        if not os.path.exists(p):
            continue
        r = rng.random()
        if r < 0.2:
            os.unlink(p)
        elif r < 0.3:
            os.truncate(p, os.path.getsize(p) // 2)
        elif r < 0.4:
            os.setxattr(p, "user.y", block_bytes("%s%d" % (tag, k), rng.randint(100, 1500)))
        else:
            size = os.path.getsize(p)
            with open(p, "r+b") as f:
                f.seek(rng.randrange(0, size + 1, BLK) if size else 0)
                f.write(block_bytes("%s%d" % (tag, k), rng.randint(1, 4) * BLK))
    sync()


stop = threading.Event()


def walker():
    n = 0
    while not stop.is_set() and n < 5000:
        for _ in range(3):
            subprocess.run(["btrfs", "inspect-internal", "logical-resolve", str(13631488 + 4096 * (n % 4000)), mnt],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        n += 1


t = threading.Thread(target=walker, daemon=True)
t.start()
m = max(30, nfiles // 6)
modify(src, "a", m)
modify(s1, "b", m)
modify(s2, "c", m // 2)
# big file: overwrite a tenth in the source and in s1
for root in (src, s1):
    w = DirectWriter(os.path.join(root, "big"), create=False)
    for k in rng.sample(range(nx), nx // 10):
        w.write(k * BLK, block_bytes("o%s:%d" % (root, k), BLK))
    w.close()
sync()
stop.set()
t.join()

# delete the source while s1, s2, s3 share its tree: the cleaner
run("btrfs", "subvolume", "delete", src)
run("btrfs", "subvolume", "sync", mnt)
modify(s2, "d", m // 2)
run("btrfs", "subvolume", "delete", s1)
run("btrfs", "subvolume", "sync", mnt)
run("btrfs", "quota", "rescan", "-w", mnt)
run("btrfs", "qgroup", "show", "-pc", mnt, check=False)
run("btrfs", "subvolume", "delete", s3)
run("btrfs", "subvolume", "sync", mnt)
run("btrfs", "quota", "disable", mnt)
sync()
log("done")
