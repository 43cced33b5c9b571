#!/usr/bin/env python3
"""racy: things running at the same time: a writer (buffered + O_DIRECT +
reflinks + fsync) in one subvolume, snapshots taken and deleted under it
(the cleaner drops shared trees while the writer COWs them), a balance
(relocation) running meanwhile, and backref walks (tree-mod-log seqs).
Many tasks queue refs on the same extents, so ref events of different tasks
interleave.

Scale 1.0: 2000 files, 6 snapshot rounds (about 30 s of writers: 1.8 M ref
ops, 1.4 GB of trace text; scale 0.3: 160 k ops).
"""
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.environ.get("CAPTURE_WORKLOADS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../../shared/capture/workloads")))
from wl_common import BLK, DirectWriter, args, block_bytes, clone_range, log, run, sync  # noqa: E402

mnt, seed, scale, rng = args()
n = max(100, int(2000 * scale))
vol = os.path.join(mnt, "vol")
run("btrfs", "subvolume", "create", vol)
for i in range(n):
    d = os.path.join(vol, "d%02d" % (i % 24))
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "f%05d" % i)
    with open(p, "wb") as f:
        f.write(block_bytes("r%d:%d" % (seed, i), rng.choice([500, 3000, BLK, 5 * BLK, 17 * BLK])))
    os.setxattr(p, "user.p", block_bytes("x%d" % i, rng.randint(300, 2500)))
sync()
log("populated")

stop = threading.Event()
errors = []


def writer(wseed):
    r = random.Random(wseed)
    k = 0
    while not stop.is_set() and k < 200000:
        k += 1
        i = r.randrange(n)
        p = os.path.join(vol, "d%02d" % (i % 24), "f%05d" % i)
        try:
            c = r.random()
            if c < 0.4:
                with open(p, "r+b") as f:
                    f.seek(r.randrange(0, 8) * BLK)
                    f.write(block_bytes("w%d:%d" % (wseed, k), r.randint(1, 3) * BLK))
                    if r.random() < 0.2:
                        f.flush()
                        os.fsync(f.fileno())
            elif c < 0.55:
                w = DirectWriter(p + ".d")
                w.write(r.randrange(0, 16) * BLK, block_bytes("d%d:%d" % (wseed, k), BLK * r.randint(1, 4)))
                w.close()
            elif c < 0.7:
                j = r.randrange(n)
                q = os.path.join(vol, "d%02d" % (j % 24), "f%05d" % j)
                clone_range(p, q + ".c", 0, 0, r.randrange(0, 4) * BLK)
            elif c < 0.8:
                os.truncate(p, r.randrange(0, 6) * BLK)
            elif c < 0.9:
                os.setxattr(p, "user.q", block_bytes("q%d" % k, r.randint(100, 3000)))
            else:
                for suf in (".d", ".c"):
                    if os.path.exists(p + suf):
                        os.unlink(p + suf)
        except OSError as e:
            errors.append(str(e))
        if k % 500 == 0:
            time.sleep(0.01)


def walker():
    while not stop.is_set():
        subprocess.run(["btrfs", "inspect-internal", "logical-resolve", str(13631488 + BLK * rng.randrange(20000)), mnt],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.02)


threads = [threading.Thread(target=writer, args=(seed * 100 + t,), daemon=True) for t in range(2)]
threads.append(threading.Thread(target=walker, daemon=True))
for t in threads:
    t.start()

rounds = max(2, int(6 * scale))
snaps = []
for r in range(rounds):
    s = os.path.join(mnt, "s%d" % r)
    run("btrfs", "subvolume", "snapshot", vol, s)
    snaps.append(s)
    time.sleep(1.0)
    if r % 2 == 1:
        bal = subprocess.Popen(["btrfs", "balance", "start", "-dusage=50", "-musage=70", mnt],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        bal = None
    if len(snaps) > 1:
        old = snaps.pop(0)
        run("btrfs", "subvolume", "delete", old)
    time.sleep(1.5)
    if bal:
        bal.wait()
    run("btrfs", "subvolume", "sync", mnt)
stop.set()
for t in threads:
    t.join()
log("writer errors: %d %s" % (len(errors), errors[:3]))
for s in snaps:
    run("btrfs", "subvolume", "delete", s)
run("btrfs", "subvolume", "sync", mnt)
sync()
log("done")
