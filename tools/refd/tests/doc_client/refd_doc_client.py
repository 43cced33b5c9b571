#!/usr/bin/env python3
"""A refd client written from docs/protocol.md alone, run as a test.

It implements every frame, the handshake and every request of the wire
protocol as the document describes them (nothing here comes from the Rust
codec) and checks a live daemon against the document: every reply is
decoded strictly (sizes, reserved bytes, flag bits, counts), and every
documented behaviour that a client can observe is asserted.

    refd_doc_client.py --connect unix:PATH [--tcp tcp:127.0.0.1:PORT
                       --token-file F] [--fill-consumers]
                       [--save-state F | --check-state F] [--stop-pid PID]
                       [--verbose]

`--tcp` names a listener that requires the token in `--token-file`; the
token checks run only when it is given. `--save-state F` leaves a session,
a barrier and a consumer behind and writes them to F; after the daemon is
restarted (or killed and restarted), `--check-state F` checks what the
document says survives a restart, and only that. With `--stop-pid` the
client ends by stopping the daemon (SIGTERM) and checks what each
connection gets. Checks that need a small server bound (sessions,
connections, barrier lease, freed extents kept) read the bound from HELLO
or STATS and run only when it is small enough to reach in seconds; each
one skipped says so. Exit status 0: every check passed; 1: a check failed
(each failure is printed); 2: bad usage.

Python 3 standard library only.
"""

import argparse
import json
import os
import random
import signal
import socket
import struct
import sys
import time

# ---------------------------------------------------------------- CRC32C

def _crc32c_table():
    poly = 0x82F63B78  # 0x1EDC6F41 reflected
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"") == 0
assert crc32c(b"123456789") == 0xE3069283

# ---------------------------------------------------------------- constants

MAGIC = b"RFDP"
HEADER = struct.Struct("<4sHBBQIIII")  # 32 bytes
assert HEADER.size == 32
FLAG_REPLY = 1
CLIENT_LIMIT = 1 << 20  # our own reply limit: at least 1 MiB

HELLO, REGISTER, SUBMIT, LOOKUP, BACKREFS = 0x01, 0x02, 0x03, 0x04, 0x05
BARRIER_ACQUIRE, BARRIER_RENEW, BARRIER_RELEASE = 0x06, 0x07, 0x08
COMMIT, FREED_SUBSCRIBE, FREED, FREED_ACK = 0x09, 0x0A, 0x0B, 0x0C
STATS, PING, FREED_UNSUBSCRIBE, ERROR = 0x0D, 0x0E, 0x0F, 0x7F

ERR_NAMES = {
    1: "BAD_FRAME", 2: "BAD_CHECKSUM", 3: "FRAME_TOO_LARGE",
    4: "UNSUPPORTED_VERSION", 5: "UNKNOWN_OPCODE", 6: "BAD_REQUEST",
    7: "HELLO_REQUIRED", 8: "AUTH_FAILED", 9: "INVALID_OP", 10: "REFUSED",
    11: "SESSION_UNKNOWN", 12: "SESSION_EVICTED", 13: "REQUEST_TOO_OLD",
    14: "TOO_MANY_OPS", 15: "FAILED", 16: "BUSY", 17: "SHUTTING_DOWN",
    18: "BARRIER_UNKNOWN", 19: "BARRIER_LIMIT", 20: "FREED_EXPIRED",
    21: "CONSUMER_UNKNOWN", 22: "INTERNAL",
}
# The codes whose error frame closes the connection ("Errors", "closes").
CLOSES = {"BAD_FRAME", "BAD_CHECKSUM", "FRAME_TOO_LARGE",
          "UNSUPPORTED_VERSION", "HELLO_REQUIRED", "AUTH_FAILED", "BUSY",
          "SHUTTING_DOWN"}

SUB = {
    "ZERO_NUM_BYTES": 1, "RANGE_OVERFLOW": 2, "LEVEL_OUT_OF_RANGE": 3,
    "SEQ_OUT_OF_RANGE": 4, "UNKNOWN_ACTION": 5, "UNKNOWN_REF_TYPE": 6,
    "KIND_MISMATCH": 7, "MISSING_ROOT": 8, "MISSING_PARENT": 9,
    "UPDATE_HEAD_WITH_KEY": 10, "MISSING_EXTENT_OP": 11,
    "UNEXPECTED_EXTENT_OP": 12, "BAD_EXTENT_OP_FLAGS": 13,
    "KEY_ON_DATA": 14, "STRAY_FIELDS": 15, "BAD_KIND": 16,
    "RESERVED_NONZERO": 17,
}

ADD_REF, DROP_REF, ADD_EXTENT, UPDATE_HEAD = 1, 2, 3, 4
TREE_BLOCK_REF, EXTENT_DATA_REF = 176, 178
SHARED_BLOCK_REF, SHARED_DATA_REF = 182, 184
KIND_TREE, KIND_DATA = 0, 1

SUBMIT_NO_WAIT, SUBMIT_STAMP_SEQ = 1, 2
REPLY_DURABLE, REPLY_DUPLICATE = 1, 2

LK_COMMITTED, LK_PENDING, LK_ALLOC_PENDING = 1, 2, 4
LK_DATA, LK_FULL_BACKREF = 8, 16

ITEM_DATA, ITEM_TREE_BLOCK, ITEM_FULL_BACKREF = 1, 2, 0x100

REGISTERED = set()  # every session id this run was given
CONSUMERS_MAX = 1024  # freed-list consumers subscribed at once ("FREED_SUBSCRIBE")

OP = struct.Struct("<QQQQQQBBBBBBH")
assert OP.size == 56

# ---------------------------------------------------------------- errors


class ProtocolViolation(Exception):
    """The server sent something the document does not allow."""


class Closed(Exception):
    """The server closed the connection."""


class ServerError(Exception):
    """An error frame (opcode 0x7F)."""

    def __init__(self, request_id, code, subcode, index, detail, message):
        self.request_id = request_id
        self.code = code
        self.name = ERR_NAMES.get(code, "code %d" % code)
        self.subcode = subcode
        self.index = index
        self.detail = detail
        self.message = message
        super().__init__("%s (subcode %d, index %#x, detail %d): %s" % (
            self.name, subcode, index, detail, message))


def parse_error(request_id, body):
    if len(body) < 18:
        raise ProtocolViolation("error body of %d bytes" % len(body))
    code, subcode, index, detail, mlen = struct.unpack_from("<HHIQH", body)
    if mlen > 1024 or len(body) != 18 + mlen:
        raise ProtocolViolation("error body %d bytes, message_bytes %d"
                                % (len(body), mlen))
    try:
        message = body[18:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("error message is not UTF-8")
    if code not in ERR_NAMES:
        raise ProtocolViolation("unknown error code %d" % code)
    if ERR_NAMES[code] != "INVALID_OP" and subcode != 0:
        raise ProtocolViolation("subcode %d on %s" % (subcode, ERR_NAMES[code]))
    if ERR_NAMES[code] not in ("INVALID_OP", "REFUSED", "UNSUPPORTED_VERSION") \
            and index != 0xFFFFFFFF:
        raise ProtocolViolation("index %#x on %s" % (index, ERR_NAMES[code]))
    return ServerError(request_id, code, subcode, index, detail, message)


def need_zero(data, what):
    if any(data):
        raise ProtocolViolation("%s not zero: %s" % (what, data.hex()))


def need_bool(value, what):
    if value not in (0, 1):
        raise ProtocolViolation("%s is %d, not 0 or 1" % (what, value))

# ---------------------------------------------------------------- frames


def header(opcode, request_id, body, version=1, flags=0, reserved=0,
           body_bytes=None, body_crc=None, magic=MAGIC, header_crc=None):
    """A request header; every field can be overridden to make bad frames."""
    if body_bytes is None:
        body_bytes = len(body)
    if body_crc is None:
        body_crc = crc32c(body)
    head = struct.pack("<4sHBBQIII", magic, version, opcode, flags,
                       request_id, body_bytes, body_crc, reserved)
    if header_crc is None:
        header_crc = crc32c(head)
    return head + struct.pack("<I", header_crc)


class Conn:
    """One connection: frames out, frames in, strictly checked."""

    def __init__(self, addr, timeout_s=20.0):
        self.addr = addr
        if addr.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = addr[len("unix:"):]
        elif addr.startswith("tcp:"):
            host, port = addr[len("tcp:"):].rsplit(":", 1)
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
        else:
            raise ValueError("address must be unix:PATH or tcp:HOST:PORT")
        self.sock.settimeout(timeout_s)
        self.sock.connect(target)
        self.version = 1
        self.next_id = 1
        self.hello_reply = None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def rid(self):
        rid = self.next_id
        self.next_id += 1
        return rid

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, opcode, body=b"", request_id=None, **overrides):
        if request_id is None:
            request_id = self.rid()
        overrides.setdefault("version", self.version)
        self.send_raw(header(opcode, request_id, body, **overrides) + body)
        return request_id

    def _read_exact(self, n):
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except ConnectionResetError:
                raise Closed("connection reset")
            if not chunk:
                if out:
                    raise ProtocolViolation("stream ended inside a frame")
                raise Closed("connection closed")
            out += chunk
        return bytes(out)

    def recv_frame(self):
        """(opcode, request_id, body) of the next frame, checked in the
        document's order."""
        head = self._read_exact(32)
        magic, version, opcode, flags, rid, blen, bcrc, reserved, hcrc = \
            HEADER.unpack(head)
        if magic != MAGIC:
            raise ProtocolViolation("bad magic %r" % magic)
        expect_version = 1 if opcode in (HELLO,) or self.hello_reply is None \
            else self.version
        if version != expect_version and not (opcode == ERROR and version == 1):
            raise ProtocolViolation("frame version %d" % version)
        if crc32c(head[:28]) != hcrc:
            raise ProtocolViolation("bad header checksum")
        if flags != FLAG_REPLY:
            raise ProtocolViolation("server frame flags %#x" % flags)
        if reserved != 0:
            raise ProtocolViolation("header reserved %#x" % reserved)
        if blen > CLIENT_LIMIT:
            raise ProtocolViolation("body of %d bytes" % blen)
        body = self._read_exact(blen) if blen else b""
        if crc32c(body) != bcrc:
            raise ProtocolViolation("bad body checksum")
        return opcode, rid, body

    def recv(self):
        """(request_id, opcode, body) of a reply, or a ServerError."""
        opcode, rid, body = self.recv_frame()
        if opcode == ERROR:
            return parse_error(rid, body)
        return rid, opcode, body

    def call(self, opcode, body=b"", **kw):
        """Send one request and wait for its reply; raise ServerError."""
        rid = self.send(opcode, body, **kw)
        reply = self.recv()
        if isinstance(reply, ServerError):
            if reply.request_id != rid:
                raise ProtocolViolation("error for id %d, expected %d"
                                        % (reply.request_id, rid))
            raise reply
        got_rid, got_op, got_body = reply
        if got_rid != rid or got_op != opcode:
            raise ProtocolViolation("reply id %d opcode %#x to id %d opcode %#x"
                                    % (got_rid, got_op, rid, opcode))
        return got_body

    def closed_by_server(self, wait_s=5.0):
        """True if the server closes the connection (EOF) within wait_s."""
        self.sock.settimeout(wait_s)
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

# ---------------------------------------------------------------- bodies


def hello_body(vmin=1, vmax=1, token=b"", name=b"doc-client",
               token_bytes=None, name_bytes=None):
    if token_bytes is None:
        token_bytes = len(token)
    if name_bytes is None:
        name_bytes = len(name)
    return struct.pack("<HHHH", vmin, vmax, token_bytes, name_bytes) + token + name


def parse_hello_reply(body, vmin=1, vmax=1):
    if len(body) != 64:
        raise ProtocolViolation("HELLO reply of %d bytes" % len(body))
    (version, res0, body_max, ops_max, in_flight, fs_id, generation,
     server_id, lease_ms, kept) = struct.unpack_from("<HHIII16sQQII", body)
    need_zero(struct.pack("<H", res0), "HELLO reply reserved 2..4")
    need_zero(body[56:64], "HELLO reply reserved 56..64")
    if not vmin <= version <= vmax:
        raise ProtocolViolation("version %d outside %d..%d" % (version, vmin, vmax))
    if body_max < 1048576:
        raise ProtocolViolation("body_bytes_max %d" % body_max)
    if not 1 <= ops_max <= (body_max - 24) // 56:
        raise ProtocolViolation("submit_ops_max %d" % ops_max)
    if in_flight < 1 or kept < 1:
        raise ProtocolViolation("in_flight_max %d, session_replies_kept %d"
                                % (in_flight, kept))
    return dict(version=version, body_bytes_max=body_max,
                submit_ops_max=ops_max, in_flight_max=in_flight, fs_id=fs_id,
                generation=generation, server_id=server_id,
                barrier_lease_ms=lease_ms, session_replies_kept=kept)


def connect(addr, token=b"", name=b"doc-client"):
    conn = Conn(addr)
    body = conn.call(HELLO, hello_body(1, 1, token, name))
    conn.hello_reply = parse_hello_reply(body)
    conn.version = conn.hello_reply["version"]
    return conn


def op(bytenr, num_bytes, action, ref_type, kind, k1=0, k2=0, k3=0, seq=0,
       level=0, eop_flags=0, key_type=0, reserved=0):
    return OP.pack(bytenr, num_bytes, seq, k1, k2, k3, action, ref_type,
                   kind, level, eop_flags, key_type, reserved)


def submit_body(session, number, ops, flags=0, op_count=None):
    if op_count is None:
        op_count = len(ops)
    return struct.pack("<QQII", session, number, op_count, flags) + b"".join(ops)


def parse_submit_reply(body, op_count, number):
    if len(body) != 24:
        raise ProtocolViolation("SUBMIT reply of %d bytes" % len(body))
    lsn, count, flags, rn = struct.unpack("<QIIQ", body)
    if flags & ~3:
        raise ProtocolViolation("SUBMIT reply flags %#x" % flags)
    if count != op_count or rn != number:
        raise ProtocolViolation("SUBMIT reply op_count %d number %d, sent %d %d"
                                % (count, rn, op_count, number))
    return dict(lsn=lsn, flags=flags)


def lookup_body(bytenrs, count=None):
    if count is None:
        count = len(bytenrs)
    return struct.pack("<II", count, 0) + b"".join(struct.pack("<Q", b) for b in bytenrs)


def parse_lookup_reply(body, bytenrs):
    if len(body) < 8:
        raise ProtocolViolation("LOOKUP reply of %d bytes" % len(body))
    count, res = struct.unpack_from("<II", body)
    need_zero(body[4:8], "LOOKUP reply reserved")
    if count != len(bytenrs) or len(body) != 8 + 48 * count:
        raise ProtocolViolation("LOOKUP reply count %d, %d bytes" % (count, len(body)))
    out = []
    for i in range(count):
        e = body[8 + 48 * i: 8 + 48 * (i + 1)]
        bytenr, refs, committed, pending, num_bytes, flags, level = \
            struct.unpack_from("<QqQqQBB", e)
        need_zero(e[42:48], "LOOKUP entry reserved")
        if flags & ~0x1F:
            raise ProtocolViolation("LOOKUP entry flags %#x" % flags)
        if bytenr != bytenrs[i]:
            raise ProtocolViolation("LOOKUP entry %d bytenr %d, asked %d"
                                    % (i, bytenr, bytenrs[i]))
        out.append(dict(bytenr=bytenr, refs=refs, committed_refs=committed,
                        pending_ref_mod=pending, num_bytes=num_bytes,
                        flags=flags, level=level))
    return out


def backrefs_body(bytenr, max_entries, after=None, after_present=None):
    if after is None:
        after = (0, 0, 0, 0)
        present = 0
    else:
        present = 1
    if after_present is not None:
        present = after_present
    t, k1, k2, k3 = after
    return struct.pack("<QIBBHQQQ", bytenr, max_entries, present, t, 0, k1, k2, k3)


def parse_backrefs_reply(body, bytenr, max_entries):
    if len(body) < 40:
        raise ProtocolViolation("BACKREFS reply of %d bytes" % len(body))
    b, num_bytes, refs, item_flags, kind, level, more, res, count = \
        struct.unpack_from("<QQqQBBBBI", body)
    if b != bytenr:
        raise ProtocolViolation("BACKREFS reply bytenr %d" % b)
    if item_flags & ~(ITEM_DATA | ITEM_TREE_BLOCK | ITEM_FULL_BACKREF):
        raise ProtocolViolation("item_flags %#x" % item_flags)
    need_bool(more, "BACKREFS more")
    if res:
        raise ProtocolViolation("BACKREFS reply reserved %d" % res)
    if kind not in (0, 1, 255):
        raise ProtocolViolation("BACKREFS kind %d" % kind)
    if count > max_entries or len(body) != 40 + 40 * count:
        raise ProtocolViolation("BACKREFS count %d, %d bytes" % (count, len(body)))
    entries = []
    for i in range(count):
        e = body[40 + 40 * i: 80 + 40 * i]
        ref_type = e[0]
        need_zero(e[1:8], "BACKREFS entry reserved")
        cnt, k1, k2, k3 = struct.unpack_from("<qQQQ", e, 8)
        entries.append((ref_type, k1, k2, k3, cnt))
    return dict(num_bytes=num_bytes, refs=refs, item_flags=item_flags,
                kind=kind, level=level, more=more, entries=entries)


def parse_commit_reply(body):
    if len(body) != 64:
        raise ProtocolViolation("COMMIT reply of %d bytes" % len(body))
    names = ("generation", "ops", "heads", "applied", "freed", "held",
             "quarantined", "took_us")
    return dict(zip(names, struct.unpack("<8Q", body)))


def parse_freed_reply(body, max_extents):
    if len(body) < 32:
        raise ProtocolViolation("FREED reply of %d bytes" % len(body))
    count, more = struct.unpack_from("<IB", body)
    need_zero(body[5:8], "FREED reply reserved 5..8")
    next_gen, next_index = struct.unpack_from("<QI", body, 8)
    need_zero(body[20:24], "FREED reply reserved 20..24")
    (oldest_kept,) = struct.unpack_from("<Q", body, 24)
    need_bool(more, "FREED more")
    if count > max_extents or len(body) != 32 + 32 * count:
        raise ProtocolViolation("FREED count %d, %d bytes" % (count, len(body)))
    extents = []
    for i in range(count):
        e = body[32 + 32 * i: 64 + 32 * i]
        gen, bytenr, num_bytes, kind, level = struct.unpack_from("<QQQBB", e)
        need_zero(e[26:32], "FREED entry reserved")
        if kind not in (0, 1):
            raise ProtocolViolation("FREED entry kind %d" % kind)
        extents.append(dict(generation=gen, bytenr=bytenr,
                            num_bytes=num_bytes, kind=kind, level=level))
    return dict(more=more, next_generation=next_gen, next_index=next_index,
                oldest_kept=oldest_kept, extents=extents)

# ---------------------------------------------------------------- the client


class Client:
    """Typed requests over one connection (raises ServerError)."""

    def __init__(self, addr, token=b""):
        self.addr = addr
        self.token = token
        self.conn = connect(addr, token)
        self.hello = self.conn.hello_reply

    def close(self):
        self.conn.close()

    def register(self):
        body = self.conn.call(REGISTER)
        if len(body) != 16:
            raise ProtocolViolation("REGISTER reply of %d bytes" % len(body))
        (session,) = struct.unpack_from("<Q", body)
        need_zero(body[8:16], "REGISTER reply reserved")
        if session == 0:
            raise ProtocolViolation("session id 0")
        REGISTERED.add(session)
        return session

    def submit(self, session, number, ops, flags=0):
        body = self.conn.call(SUBMIT, submit_body(session, number, ops, flags))
        return parse_submit_reply(body, len(ops), number)

    def lookup(self, bytenrs):
        return parse_lookup_reply(self.conn.call(LOOKUP, lookup_body(bytenrs)),
                                  bytenrs)

    def lookup1(self, bytenr):
        return self.lookup([bytenr])[0]

    def backrefs_page(self, bytenr, max_entries, after=None):
        body = self.conn.call(BACKREFS, backrefs_body(bytenr, max_entries, after))
        return parse_backrefs_reply(body, bytenr, max_entries)

    def backrefs(self, bytenr, page=16384):
        """Every backref, page by page; (first page, all entries, pages)."""
        first = self.backrefs_page(bytenr, page)
        entries, page_reply, pages = list(first["entries"]), first, 1
        while page_reply["more"]:
            if not page_reply["entries"]:
                raise ProtocolViolation("BACKREFS more=1 on an empty page")
            t, k1, k2, k3, _ = page_reply["entries"][-1]
            page_reply = self.backrefs_page(bytenr, page, (t, k1, k2, k3))
            entries += page_reply["entries"]
            pages += 1
        return first, entries, pages

    def barrier_acquire(self, session):
        body = self.conn.call(BARRIER_ACQUIRE, struct.pack("<Q", session))
        if len(body) != 24:
            raise ProtocolViolation("BARRIER_ACQUIRE reply of %d bytes" % len(body))
        bid, seq, lease = struct.unpack_from("<QQI", body)
        need_zero(body[20:24], "BARRIER_ACQUIRE reply reserved")
        return dict(barrier_id=bid, seq=seq, lease_ms=lease)

    def barrier_renew(self, bid):
        body = self.conn.call(BARRIER_RENEW, struct.pack("<Q", bid))
        if len(body) != 8:
            raise ProtocolViolation("BARRIER_RENEW reply of %d bytes" % len(body))
        need_zero(body[4:8], "BARRIER_RENEW reply reserved")
        return struct.unpack_from("<I", body)[0]

    def barrier_release(self, bid):
        body = self.conn.call(BARRIER_RELEASE, struct.pack("<Q", bid))
        if len(body) != 8:
            raise ProtocolViolation("BARRIER_RELEASE reply of %d bytes" % len(body))
        need_zero(body, "BARRIER_RELEASE reply")

    def commit(self):
        return parse_commit_reply(self.conn.call(COMMIT))

    def freed_subscribe(self, name):
        name = name.encode() if isinstance(name, str) else name
        body = self.conn.call(FREED_SUBSCRIBE,
                              struct.pack("<HH", len(name), 0) + name)
        if len(body) != 24:
            raise ProtocolViolation("FREED_SUBSCRIBE reply of %d bytes" % len(body))
        cid, acked, oldest = struct.unpack("<QQQ", body)
        return dict(consumer_id=cid, acked_generation=acked, oldest_kept=oldest)

    def freed(self, generation, index, max_extents):
        body = self.conn.call(FREED, struct.pack("<QII", generation, index,
                                                 max_extents))
        return parse_freed_reply(body, max_extents)

    def freed_ack(self, cid, generation):
        body = self.conn.call(FREED_ACK, struct.pack("<QQ", cid, generation))
        if len(body) != 8:
            raise ProtocolViolation("FREED_ACK reply of %d bytes" % len(body))
        return struct.unpack("<Q", body)[0]

    def freed_unsubscribe(self, cid):
        body = self.conn.call(FREED_UNSUBSCRIBE, struct.pack("<Q", cid))
        if len(body) != 8:
            raise ProtocolViolation("FREED_UNSUBSCRIBE reply of %d bytes" % len(body))
        return struct.unpack("<Q", body)[0]

    def stats(self):
        body = self.conn.call(STATS)
        if len(body) > 1 << 20:
            raise ProtocolViolation("STATS reply over 1 MiB")
        value = json.loads(body.decode("utf-8"))
        if not isinstance(value, dict):
            raise ProtocolViolation("STATS reply is not a JSON object")
        return value

    def ping(self, data):
        return self.conn.call(PING, data)

# ---------------------------------------------------------------- checks


class Checks:
    def __init__(self, verbose):
        self.verbose = verbose
        self.failed = []
        self.passed = 0
        self.skipped = []
        self.notes = []
        self.section = ""

    def ok(self, cond, what):
        if cond:
            self.passed += 1
            if self.verbose:
                print("  ok   %s: %s" % (self.section, what))
        else:
            self.failed.append("%s: %s" % (self.section, what))
            print("  FAIL %s: %s" % (self.section, what))
        return cond

    def eq(self, got, want, what):
        return self.ok(got == want, "%s (got %r, want %r)" % (what, got, want))

    def error(self, fn, name, what, **fields):
        """fn() must raise ServerError `name` with the given fields."""
        try:
            result = fn()
        except ServerError as err:
            good = err.name == name
            for key, want in fields.items():
                good = good and getattr(err, key) == want
            got = {key: getattr(err, key) for key in fields}
            self.ok(good, "%s -> %s %s (got %s %s: %s)" % (
                what, name, fields, err.name, got, err.message))
            return err
        self.ok(False, "%s -> %s (got a reply: %r)" % (what, name, result))
        return None

    def skip(self, what):
        self.skipped.append("%s: %s" % (self.section, what))
        print("  skip %s: %s" % (self.section, what))

    def note(self, what):
        self.notes.append("%s: %s" % (self.section, what))
        if self.verbose:
            print("  note %s: %s" % (self.section, what))


def raw_error(conn, rid_expected, name, what, checks, closes, **fields):
    """Read the next frame from a raw connection: the error `name` for
    `rid_expected`, then (if `closes`) the server closes the stream, or
    (if not, and `closes` is not None) the connection still answers."""
    try:
        reply = conn.recv()
    except Closed:
        checks.ok(False, "%s -> %s (connection closed with no error frame)"
                  % (what, name))
        return
    if not isinstance(reply, ServerError):
        checks.ok(False, "%s -> %s (got reply opcode %#x)" % (what, name, reply[1]))
        return
    good = reply.name == name and reply.request_id == rid_expected
    for key, want in fields.items():
        good = good and getattr(reply, key) == want
    got = {key: getattr(reply, key) for key in fields}
    checks.ok(good, "%s -> %s id %d %s (got %s id %d %s: %s)" % (
        what, name, rid_expected, fields, reply.name, reply.request_id, got,
        reply.message))
    if closes is None:
        return
    assert closes == (name in CLOSES), "the 'closes' column of %s" % name
    if closes:
        checks.ok(conn.closed_by_server(), "%s: the server closes the connection" % what)
    else:
        conn.sock.settimeout(20)
        try:
            conn.call(PING, b"still open")
            checks.ok(True, "%s: the connection stays open" % what)
        except (Closed, ServerError, ProtocolViolation) as err:
            checks.ok(False, "%s: the connection stays open (%s)" % (what, err))


class Run:
    def __init__(self, args):
        self.args = args
        self.addr = args.connect
        self.c = Checks(args.verbose)
        self.rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        # Extents of this run live in a random 2^40-byte window, so that
        # runs against the same daemon do not meet.
        self.base = self.rng.randrange(1, 1 << 18) << 40
        self.next_extent = self.base

    def extent(self, num_bytes=4096):
        bytenr = self.next_extent
        self.next_extent += 1 << 20
        return bytenr, num_bytes

    def client(self):
        return Client(self.addr)

    def hello_conn(self):
        return connect(self.addr)

    # ------------------------------------------------------------ HELLO

    def t_hello(self):
        c = self.c
        c.section = "HELLO"
        if self.addr.startswith("unix:"):
            mode = os.stat(self.addr[len("unix:"):]).st_mode & 0o777
            c.eq(oct(mode), oct(0o660), "the unix socket's mode")
        conn = Conn(self.addr)
        body = conn.call(HELLO, hello_body(1, 9, b"", "é-client".encode()))
        h = parse_hello_reply(body, 1, 9)
        c.eq(h["version"], 1, "range 1..9 picks version 1")
        if h["body_bytes_max"] == 1048576:
            c.eq(h["submit_ops_max"], 18724, "submit_ops_max with the default frame")
        else:
            c.note("body_bytes_max %d, submit_ops_max %d"
                   % (h["body_bytes_max"], h["submit_ops_max"]))
        c.ok(h["in_flight_max"] >= 1, "in_flight_max >= 1")
        c.ok(any(h["fs_id"]), "fs_id is not all zero")
        c.ok(h["server_id"] != 0, "server_id set")
        c.eq(h["session_replies_kept"], 64, "session_replies_kept default")
        self.hello = h
        conn.hello_reply = h
        # A second HELLO after a successful one: BAD_REQUEST, stays open.
        c.error(lambda: conn.call(HELLO, hello_body()), "BAD_REQUEST",
                "second HELLO")
        c.eq(conn.call(PING, b"x"), b"x", "connection open after second HELLO")
        conn.close()
        h2 = connect(self.addr).hello_reply
        c.eq(h2["fs_id"], h["fs_id"], "same fs_id on a new connection")
        c.eq(h2["server_id"], h["server_id"], "same server_id on a new connection")

        # Versions not spoken: UNSUPPORTED_VERSION detail=1 index=1, closes.
        conn = Conn(self.addr)
        c.eq(parse_hello_reply(conn.call(HELLO, hello_body(0, 1)), 0, 1)["version"], 1,
             "range 0..1 picks version 1")
        conn.close()
        for vmin, vmax, what in ((2, 5, "range 2..5"), (1, 0, "empty range 1..0"),
                                 (0, 0, "range 0..0")):
            conn = Conn(self.addr)
            rid = conn.send(HELLO, hello_body(vmin, vmax))
            raw_error(conn, rid, "UNSUPPORTED_VERSION", "HELLO " + what, c, True,
                      detail=1, index=1)
            conn.close()

        # Refused HELLOs that do not count: the connection waits for a HELLO.
        refusals = (
            (hello_body()[:7], "HELLO body of 7 bytes"),
            (hello_body(name=b"abc", name_bytes=4), "HELLO name_bytes past the body"),
            (hello_body(name=b"abc") + b"z", "HELLO body one byte long"),
            (hello_body(token=b"t" * 257), "HELLO token_bytes 257"),
            (hello_body(name=b"n" * 65), "HELLO name_bytes 65"),
            (hello_body(name=b"\xff\xfe"), "HELLO name not UTF-8"),
        )
        for body, what in refusals:
            conn = Conn(self.addr)
            rid = conn.send(HELLO, body)
            reply = conn.recv()
            c.ok(isinstance(reply, ServerError) and reply.name == "BAD_REQUEST"
                 and reply.request_id == rid, "%s -> BAD_REQUEST (got %s)" % (what, reply))
            try:
                h3 = parse_hello_reply(conn.call(HELLO, hello_body()))
                c.eq(h3["version"], 1, "%s does not count: a HELLO after it succeeds" % what)
            except (ServerError, Closed, ProtocolViolation) as err:
                c.ok(False, "%s does not count: a HELLO after it succeeds (%s)" % (what, err))
            conn.close()
        # The order of HELLO's checks: the body, then the version range,
        # then the token (on a listener that requires one).
        order = [(hello_body(2, 3, name=b"n" * 65), "BAD_REQUEST",
                  "bad range and a name of 65 bytes")]
        if self.args.tcp:
            order += [(hello_body(2, 3, token=b"bad"), "UNSUPPORTED_VERSION",
                       "bad range and a bad token"),
                      (hello_body(1, 1, token=b"bad", name=b"\xff"), "BAD_REQUEST",
                       "bad token and a name not UTF-8")]
        for body, name, what in order:
            conn = Conn(self.args.tcp if "token" in what else self.addr)
            rid = conn.send(HELLO, body)
            raw_error(conn, rid, name, "HELLO with " + what, c,
                      None if name == "BAD_REQUEST" else True)
            conn.close()
        # A name and a token of the largest allowed size.
        conn = Conn(self.addr)
        body = conn.call(HELLO, hello_body(token=b"t" * 256, name=b"n" * 64))
        c.eq(parse_hello_reply(body)["version"], 1,
             "token of 256 bytes ignored, name of 64 bytes accepted")
        conn.close()

    def t_hello_required(self):
        c = self.c
        c.section = "HELLO_REQUIRED"
        # Frame checks come before the HELLO rule.
        conn = Conn(self.addr)
        conn.send(HELLO, hello_body(), request_id=5, header_crc=1)
        raw_error(conn, 0, "BAD_CHECKSUM", "HELLO with a bad header checksum", c, True)
        conn.close()
        conn = Conn(self.addr)
        conn.send(HELLO, hello_body(2, 2), request_id=6, version=2)
        raw_error(conn, 0, "UNSUPPORTED_VERSION", "HELLO in a version-2 frame", c, True,
                  detail=1, index=1)
        conn.close()
        conn = Conn(self.addr)
        conn.send(HELLO, hello_body(), request_id=7, body_crc=3)
        raw_error(conn, 7, "BAD_CHECKSUM", "HELLO with a bad body checksum", c, True)
        conn.close()
        for opcode, what in ((PING, "PING"), (REGISTER, "REGISTER"),
                             (0x55, "unknown opcode 0x55"), (ERROR, "opcode 0x7F")):
            conn = Conn(self.addr)
            rid = conn.send(opcode, b"")
            raw_error(conn, rid, "HELLO_REQUIRED", what + " before HELLO", c, True)
            conn.close()

    # ------------------------------------------------------------ frames

    def t_frames(self):
        c = self.c
        c.section = "frames"
        limit = self.hello["body_bytes_max"]

        def fresh():
            return self.hello_conn()

        conn = fresh()
        conn.send(PING, b"abc", request_id=77, magic=b"RFDQ")
        raw_error(conn, 0, "BAD_FRAME", "bad magic", c, True)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=78, version=2)
        raw_error(conn, 0, "UNSUPPORTED_VERSION", "frame version 2 after HELLO",
                  c, True, detail=1, index=1)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=79, version=2, header_crc=0x1234)
        raw_error(conn, 0, "UNSUPPORTED_VERSION",
                  "frame version 2 with a bad header checksum (version first)",
                  c, True, detail=1, index=1)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=80, header_crc=0x1234)
        raw_error(conn, 0, "BAD_CHECKSUM", "bad header checksum", c, True)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=81, flags=FLAG_REPLY)
        raw_error(conn, 81, "BAD_FRAME", "REPLY flag on a request", c, True)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=82, flags=0x04)
        raw_error(conn, 82, "BAD_FRAME", "undefined flag bit 2", c, True)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=83, reserved=1)
        raw_error(conn, 83, "BAD_FRAME", "reserved header bytes not zero", c, True)
        conn.close()

        conn = fresh()
        # Header only: the server must refuse before it reads the body.
        conn.send_raw(header(PING, 84, b"", body_bytes=limit + 1))
        raw_error(conn, 84, "FRAME_TOO_LARGE", "body_bytes = limit + 1", c, True,
                  detail=limit)
        conn.close()

        conn = fresh()
        conn.send_raw(header(PING, 85, b"", body_bytes=0xFFFFFFFF))
        raw_error(conn, 85, "FRAME_TOO_LARGE", "body_bytes = 2^32 - 1", c, True,
                  detail=limit)
        conn.close()

        conn = fresh()
        conn.send(PING, b"abc", request_id=86, body_crc=crc32c(b"abd"))
        raw_error(conn, 86, "BAD_CHECKSUM", "bad body checksum", c, True)
        conn.close()

        # A frame of exactly the limit is read (and refused on its body:
        # a PING body is at most 64 bytes), the connection stays open.
        conn = fresh()
        rid = conn.send(PING, bytes(limit))
        raw_error(conn, rid, "BAD_REQUEST", "PING of body_bytes_max bytes", c, False)
        conn.close()

        conn = fresh()
        for opcode in (0x10, 0x40, 0x7E, 0x80, 0xFF, 0x00):
            rid = conn.send(opcode, b"")
            raw_error(conn, rid, "UNKNOWN_OPCODE", "opcode %#x after HELLO" % opcode,
                      c, False)
        rid = conn.send(ERROR, bytes(18))
        raw_error(conn, rid, "UNKNOWN_OPCODE", "opcode 0x7F as a request", c, False)
        conn.close()

        # Request bodies of the wrong size: BAD_REQUEST, the connection stays open.
        conn = fresh()
        sizes = ((REGISTER, b"\0"), (LOOKUP, b"\0" * 7), (BACKREFS, b"\0" * 39),
                 (BACKREFS, b"\0" * 41), (BARRIER_ACQUIRE, b"\0" * 7),
                 (BARRIER_RENEW, b"\0" * 9), (BARRIER_RELEASE, b""),
                 (COMMIT, b"\0"), (FREED, b"\0" * 15), (FREED_ACK, b"\0" * 17),
                 (STATS, b"\0"), (PING, b"\0" * 65), (SUBMIT, b"\0" * 23),
                 (FREED_SUBSCRIBE, b"\0" * 3), (FREED_UNSUBSCRIBE, b"\0" * 7),
                 (FREED_UNSUBSCRIBE, b"\0" * 9))
        for opcode, body in sizes:
            rid = conn.send(opcode, body)
            raw_error(conn, rid, "BAD_REQUEST", "opcode %#x with a %d-byte body"
                      % (opcode, len(body)), c, False)
        conn.close()

    # ------------------------------------------------------------ SUBMIT

    def t_submit(self):
        c = self.c
        c.section = "SUBMIT"
        cl = self.client()
        s = cl.register()
        s2 = cl.register()
        c.ok(s != s2, "two REGISTERs give two sessions")
        self.session = s
        rn = 1
        # The four backref kinds: a data extent with 178 and 184, a tree
        # block with 176 and 182.
        data, dlen = self.extent(8192)
        tree, tlen = self.extent(16384)
        ops = [
            op(data, dlen, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 257, 0),
            op(data, dlen, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 258, 4096),
            op(data, dlen, ADD_REF, SHARED_DATA_REF, KIND_DATA, 1 << 30),
            op(tree, tlen, ADD_EXTENT, TREE_BLOCK_REF, KIND_TREE, 5, level=1),
            op(tree, tlen, ADD_REF, SHARED_BLOCK_REF, KIND_TREE, 1 << 31, level=1),
        ]
        r = cl.submit(s, rn, ops)
        c.ok(r["flags"] & REPLY_DURABLE, "durable SUBMIT reply has DURABLE")
        c.ok(not r["flags"] & REPLY_DUPLICATE, "first SUBMIT is not DUPLICATE")
        lsn1 = r["lsn"]
        d, t = cl.lookup([data, tree])
        c.eq(d["refs"], 3, "data extent refs after ADD_EXTENT + 2 ADD_REF")
        c.eq(d["pending_ref_mod"], 3, "data pending_ref_mod")
        c.eq(d["committed_refs"], 0, "data committed_refs before commit")
        c.eq(d["num_bytes"], dlen, "data num_bytes")
        c.eq(d["flags"] & (LK_PENDING | LK_ALLOC_PENDING | LK_DATA | LK_COMMITTED),
             LK_PENDING | LK_ALLOC_PENDING | LK_DATA, "data flags PENDING|ALLOC_PENDING|DATA")
        c.eq(t["refs"], 2, "tree block refs")
        c.eq(t["level"], 1, "tree block level")
        c.eq(t["flags"] & (LK_DATA | LK_ALLOC_PENDING), LK_ALLOC_PENDING,
             "tree block flags ALLOC_PENDING, not DATA")
        # Backrefs of the four kinds, pending.
        first, entries, _ = cl.backrefs(data)
        c.eq(first["kind"], KIND_DATA, "data BACKREFS kind")
        c.eq(first["item_flags"], 0, "item_flags 0 before the item is committed")
        c.eq(first["num_bytes"], dlen, "BACKREFS num_bytes of a pending allocation")
        c.eq(first["refs"], 3, "data BACKREFS refs")
        c.eq(entries, [(EXTENT_DATA_REF, 5, 257, 0, 1),
                       (EXTENT_DATA_REF, 5, 258, 4096, 1),
                       (SHARED_DATA_REF, 1 << 30, 0, 0, 1)],
             "data backrefs 178, 178, 184 in key order")
        first, entries, _ = cl.backrefs(tree)
        c.eq(first["kind"], KIND_TREE, "tree BACKREFS kind")
        c.eq(first["level"], 1, "tree BACKREFS level")
        c.eq(entries, [(TREE_BLOCK_REF, 5, 0, 0, 1),
                       (SHARED_BLOCK_REF, 1 << 31, 0, 0, 1)],
             "tree backrefs 176, 182 in key order")

        # Commit: the refs become committed.
        gen0 = cl.stats()["engine"]["generation"]
        cm = cl.commit()
        c.ok(cm["generation"] > gen0, "COMMIT generation %d above %d" % (cm["generation"], gen0))
        c.ok(cm["ops"] >= len(ops), "COMMIT committed at least our %d ops" % len(ops))
        d, t = cl.lookup([data, tree])
        c.eq((d["refs"], d["committed_refs"], d["pending_ref_mod"]), (3, 3, 0),
             "data refs committed")
        c.eq(d["flags"], LK_COMMITTED | LK_DATA, "data flags COMMITTED|DATA after commit")
        c.eq((t["refs"], t["committed_refs"]), (2, 2), "tree refs committed")
        c.eq(t["flags"], LK_COMMITTED, "tree flags COMMITTED after commit")
        first, entries, _ = cl.backrefs(data)
        c.eq(first["item_flags"], ITEM_DATA, "data item_flags DATA")
        c.eq(len(entries), 3, "data backrefs after commit")
        first, _, _ = cl.backrefs(tree)
        c.eq(first["item_flags"], ITEM_TREE_BLOCK, "tree item_flags TREE_BLOCK")

        # Drops, queued (NO_WAIT): visible to LOOKUP when the reply comes.
        rn += 1
        r = cl.submit(s, rn, [
            op(data, dlen, DROP_REF, EXTENT_DATA_REF, KIND_DATA, 5, 258, 4096),
        ], SUBMIT_NO_WAIT)
        c.ok(r["lsn"] > lsn1, "LSN rises (%d > %d)" % (r["lsn"], lsn1))
        d = cl.lookup1(data)
        c.eq((d["refs"], d["committed_refs"], d["pending_ref_mod"]), (2, 3, -1),
             "NO_WAIT drop visible to LOOKUP at once")
        c.note("NO_WAIT reply flags %#x" % r["flags"])

        # UPDATE_HEAD: FULL_BACKREF on the tree block.
        rn += 1
        cl.submit(s, rn, [op(tree, tlen, UPDATE_HEAD, 0, KIND_TREE, level=1,
                             eop_flags=1)])
        rn += 1
        cl.submit(s, rn, [op(tree, tlen, UPDATE_HEAD, 0, KIND_TREE, level=1,
                             eop_flags=2, k2=256, key_type=1, k3=0)])
        cl.commit()
        t = cl.lookup1(tree)
        c.eq(t["flags"], LK_COMMITTED | LK_FULL_BACKREF,
             "UPDATE_HEAD set FULL_BACKREF (LOOKUP flags)")
        first, _, _ = cl.backrefs(tree)
        c.eq(first["item_flags"], ITEM_TREE_BLOCK | ITEM_FULL_BACKREF,
             "UPDATE_HEAD set FULL_BACKREF (item_flags)")
        d = cl.lookup1(data)
        c.eq((d["refs"], d["committed_refs"]), (2, 2), "data drop committed")

        # An unknown extent.
        nobody, _ = self.extent()
        u = cl.lookup1(nobody)
        c.eq((u["refs"], u["committed_refs"], u["pending_ref_mod"], u["num_bytes"],
              u["flags"]), (0, 0, 0, 0, 0), "LOOKUP of an unknown bytenr")
        first, entries, _ = cl.backrefs(nobody)
        c.eq((first["kind"], first["refs"], first["num_bytes"], first["more"], entries),
             (255, 0, 0, 0, []), "BACKREFS of an unknown bytenr")
        # Repeated bytenrs in one LOOKUP.
        rep = cl.lookup([data, nobody, data])
        c.eq([e["refs"] for e in rep], [2, 0, 2], "LOOKUP with a repeated bytenr")
        self.rn = rn
        self.data, self.dlen, self.tree, self.tlen = data, dlen, tree, tlen
        self.cl = cl

    def t_invalid(self):
        c = self.c
        c.section = "INVALID_OP"
        cl, s = self.cl, self.session
        b, n = self.extent()
        good = op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 300, 0)
        cases = [
            ("ZERO_NUM_BYTES", op(b, 0, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)),
            ("RANGE_OVERFLOW", op((1 << 64) - 4096, 8192, ADD_REF, EXTENT_DATA_REF,
                                  KIND_DATA, 5, 1, 0)),
            ("LEVEL_OUT_OF_RANGE", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_TREE, 5, level=8)),
            ("SEQ_OUT_OF_RANGE", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0,
                                    seq=1 << 56)),
            ("UNKNOWN_ACTION", op(b, n, 0, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)),
            ("UNKNOWN_ACTION", op(b, n, 5, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)),
            ("UNKNOWN_REF_TYPE", op(b, n, ADD_REF, 177, KIND_DATA, 5)),
            ("UNKNOWN_REF_TYPE", op(b, n, ADD_REF, 0, KIND_DATA, 5)),
            ("UNKNOWN_REF_TYPE", op(b, n, ADD_EXTENT, 0, KIND_TREE, 5)),
            ("UPDATE_HEAD_WITH_KEY", op(b, n, UPDATE_HEAD, 177, KIND_TREE, eop_flags=1)),
            ("UPDATE_HEAD_WITH_KEY", op(b, n, UPDATE_HEAD, 0, KIND_TREE, 5, eop_flags=1)),
            ("KIND_MISMATCH", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_TREE, 5, 1, 0)),
            ("KIND_MISMATCH", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_DATA, 5)),
            ("MISSING_ROOT", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 0, 1, 0)),
            ("MISSING_ROOT", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_TREE, 0)),
            ("MISSING_PARENT", op(b, n, ADD_REF, SHARED_DATA_REF, KIND_DATA, 0)),
            ("MISSING_PARENT", op(b, n, ADD_REF, SHARED_BLOCK_REF, KIND_TREE, 0)),
            ("UPDATE_HEAD_WITH_KEY", op(b, n, UPDATE_HEAD, TREE_BLOCK_REF, KIND_TREE, 5,
                                        eop_flags=1)),
            ("MISSING_EXTENT_OP", op(b, n, UPDATE_HEAD, 0, KIND_TREE)),
            ("UNEXPECTED_EXTENT_OP", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_TREE, 5,
                                        eop_flags=1)),
            ("UNEXPECTED_EXTENT_OP", op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5,
                                        1, 0, eop_flags=1)),
            ("BAD_EXTENT_OP_FLAGS", op(b, n, UPDATE_HEAD, 0, KIND_TREE, eop_flags=4)),
            ("KEY_ON_DATA", op(b, n, UPDATE_HEAD, 0, KIND_DATA, k2=1, key_type=1,
                               eop_flags=2)),
            ("STRAY_FIELDS", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_TREE, 5, k2=1)),
            ("STRAY_FIELDS", op(b, n, ADD_REF, SHARED_DATA_REF, KIND_DATA, 7, k3=1)),
            ("STRAY_FIELDS", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0,
                                level=1)),
            ("STRAY_FIELDS", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_TREE, 5,
                                key_type=1)),
            ("BAD_KIND", op(b, n, ADD_REF, EXTENT_DATA_REF, 2, 5, 1, 0)),
            ("RESERVED_NONZERO", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0,
                                    reserved=1)),
            # An op that breaks several rules gets the first subcode in the
            # documented order.
            ("RESERVED_NONZERO", op(b, 0, 9, 177, 3, reserved=1)),
            ("BAD_KIND", op(b, 0, 9, 177, 3, eop_flags=8)),
            ("BAD_EXTENT_OP_FLAGS", op(b, 0, 9, 177, KIND_DATA, eop_flags=8, level=1)),
            ("KEY_ON_DATA", op(b, 0, 9, 177, KIND_DATA, eop_flags=2, level=1)),
            ("STRAY_FIELDS", op(b, 0, 9, 177, KIND_DATA, level=1)),
            ("STRAY_FIELDS", op(b, 0, 9, 177, KIND_TREE, k2=1)),
            ("UNKNOWN_ACTION", op(b, 0, 9, 177, KIND_TREE, level=9)),
            ("UNKNOWN_REF_TYPE", op(b, 0, ADD_REF, 177, KIND_TREE, level=9)),
            ("UPDATE_HEAD_WITH_KEY", op(b, 0, UPDATE_HEAD, 177, KIND_TREE, level=9)),
            ("ZERO_NUM_BYTES", op((1 << 64) - 1, 0, ADD_REF, EXTENT_DATA_REF, KIND_TREE,
                                  seq=1 << 60)),
            ("RANGE_OVERFLOW", op((1 << 64) - 1, 2, ADD_REF, EXTENT_DATA_REF, KIND_TREE,
                                  seq=1 << 60)),
            ("SEQ_OUT_OF_RANGE", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_TREE, level=9,
                                    seq=1 << 60)),
            ("LEVEL_OUT_OF_RANGE", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_TREE, level=9)),
            ("LEVEL_OUT_OF_RANGE", op(b, n, UPDATE_HEAD, 0, KIND_TREE, level=9)),
            ("MISSING_EXTENT_OP", op(b, n, UPDATE_HEAD, 0, KIND_TREE, level=1)),
            ("KIND_MISMATCH", op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_TREE, eop_flags=1)),
            ("MISSING_ROOT", op(b, n, ADD_REF, TREE_BLOCK_REF, KIND_TREE, eop_flags=1)),
            ("MISSING_PARENT", op(b, n, ADD_REF, SHARED_DATA_REF, KIND_DATA, eop_flags=1)),
        ]
        for name, bad in cases:
            self.rn += 1
            rn = self.rn
            fields = struct.unpack("<QQQQQQBBBBBBH", bad)
            c.error(lambda: cl.submit(s, rn, [good, good, bad]), "INVALID_OP",
                    "%s %s" % (name, fields), subcode=SUB[name], index=2,
                    detail=fields[0])
        # Nothing of a refused batch is applied: the good ops are not there.
        e = cl.lookup1(b)
        c.eq((e["refs"], e["flags"]), (0, 0), "refused batches changed nothing")
        first, entries, _ = cl.backrefs(b)
        c.eq(entries, [], "refused batches left no backref")
        # A refused number was never logged: sent again with good ops, it
        # is applied ("new, or refused earlier").
        rn = self.rn
        r = cl.submit(s, rn, [good])
        c.ok(not r["flags"] & REPLY_DUPLICATE, "a refused number sent again is applied")
        c.eq(cl.lookup1(b)["refs"], 1, "refs after the refused number was reused")
        self.rn += 1
        cl.submit(s, self.rn, [op(b, n, DROP_REF, EXTENT_DATA_REF, KIND_DATA, 5, 300, 0)])

    def t_submit_errors(self):
        c = self.c
        c.section = "SUBMIT errors"
        cl, s = self.cl, self.session
        b, n = self.extent()
        one = op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)
        conn = cl.conn
        self.rn += 1
        rn = self.rn
        c.error(lambda: conn.call(SUBMIT, submit_body(s, rn, [one], op_count=2)),
                "BAD_REQUEST", "op_count 2 with one op")
        c.error(lambda: conn.call(SUBMIT, submit_body(s, rn, [one, one], op_count=1)),
                "BAD_REQUEST", "op_count 1 with two ops")
        c.error(lambda: conn.call(SUBMIT, submit_body(s, rn, [one])[:-1]),
                "BAD_REQUEST", "body one byte short")
        c.error(lambda: conn.call(SUBMIT, submit_body(s, rn, [])), "TOO_MANY_OPS",
                "op_count 0", detail=self.hello["submit_ops_max"])
        c.error(lambda: conn.call(SUBMIT, submit_body(s, 0, [one])), "BAD_REQUEST",
                "request_number 0")
        c.error(lambda: conn.call(SUBMIT, submit_body(s, rn, [one], flags=4)),
                "BAD_REQUEST", "SUBMIT flags bit 2")
        c.error(lambda: conn.call(SUBMIT, submit_body(s, rn, [one], flags=1 << 31)),
                "BAD_REQUEST", "SUBMIT flags bit 31")
        c.error(lambda: conn.call(SUBMIT, submit_body(0, rn, [one])), "SESSION_UNKNOWN",
                "session 0")
        c.error(lambda: conn.call(SUBMIT, submit_body((1 << 64) - 2, rn, [one])),
                "SESSION_UNKNOWN", "session never registered")
        bad = op(b, 0, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)
        c.error(lambda: conn.call(SUBMIT, submit_body((1 << 64) - 2, rn, [bad])),
                "SESSION_UNKNOWN", "the session is checked before the ops")
        # Order of checks: size before op_count before request number
        # before flags before session.
        c.error(lambda: conn.call(SUBMIT, submit_body(0, 0, [one], op_count=2, flags=4)),
                "BAD_REQUEST", "bad size first")
        c.error(lambda: conn.call(SUBMIT, submit_body(0, 0, [], flags=4)),
                "TOO_MANY_OPS", "op_count before request_number")
        c.error(lambda: conn.call(SUBMIT, submit_body(0, 1, [one], flags=4)),
                "BAD_REQUEST", "flags before session")
        # Largest batch: submit_ops_max ops in one SUBMIT.
        ops_max = self.hello["submit_ops_max"]
        if (self.hello["body_bytes_max"] - 24) // 56 > ops_max:
            # The log record, not the frame, bounds a batch: one op more
            # fits in a frame and is refused.
            over = [one] * (ops_max + 1)
            self.rn += 1
            rn = self.rn
            c.error(lambda: cl.submit(s, rn, over), "TOO_MANY_OPS",
                    "op_count submit_ops_max + 1 = %d" % (ops_max + 1), detail=ops_max)
            c.eq(cl.lookup1(b)["refs"], 0, "nothing of it applied")
        else:
            c.skip("op_count above submit_ops_max: it does not fit in a frame")
        big, _ = self.extent()
        ops = [op(big, 4096, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)]
        ops += [op(big, 4096, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 2 + i, 0)
                for i in range(ops_max - 1)]
        self.rn += 1
        r = cl.submit(s, self.rn, ops)
        c.ok(r["flags"] & REPLY_DURABLE, "a SUBMIT of submit_ops_max ops is durable")
        c.eq(cl.lookup1(big)["refs"], ops_max, "refs after the largest SUBMIT")
        first, entries, pages = cl.backrefs(big, 7000)
        c.eq((len(entries), pages), (ops_max, -(-ops_max // 7000)),
             "BACKREFS pages of 7000 over %d refs"
             % ops_max)
        c.ok(entries == sorted(entries), "BACKREFS entries in key order across pages")
        self.big = big

    def t_exactly_once(self):
        c = self.c
        c.section = "exactly once"
        cl = self.client()
        s = cl.register()
        kept = self.hello["session_replies_kept"]
        b, n = self.extent()
        add = op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)
        r1 = cl.submit(s, 1, [add])
        again = cl.submit(s, 1, [add])
        c.ok(again["flags"] & REPLY_DUPLICATE, "same number again: DUPLICATE")
        c.ok(again["flags"] & REPLY_DURABLE, "the stored reply is DURABLE")
        c.eq(again["lsn"], r1["lsn"], "the stored reply's LSN")
        c.eq(cl.lookup1(b)["refs"], 1, "a duplicate applies nothing")
        # A duplicate is answered from the kept reply without looking at ops.
        other = op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 2, 0)
        dup = cl.submit(s, 1, [other])
        c.ok(dup["flags"] & REPLY_DUPLICATE, "same number, other ops: DUPLICATE")
        # A duplicate is answered as its retry asks: with NO_WAIT at once
        # (DURABLE clear), else once the batch is durable (DURABLE set).
        ref3 = op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 3, 0)
        nw = cl.submit(s, 3, [ref3], SUBMIT_NO_WAIT)
        dup = cl.submit(s, 3, [ref3], SUBMIT_NO_WAIT)
        c.eq((dup["lsn"], dup["flags"]), (nw["lsn"], REPLY_DUPLICATE),
             "a NO_WAIT retry of a NO_WAIT SUBMIT: same LSN, DUPLICATE")
        dup = cl.submit(s, 3, [ref3])
        c.eq((dup["lsn"], dup["flags"]), (nw["lsn"], REPLY_DURABLE | REPLY_DUPLICATE),
             "a durable retry of a NO_WAIT SUBMIT: same LSN, DURABLE|DUPLICATE")
        cl.submit(s, 4, [op(b, n, DROP_REF, EXTENT_DATA_REF, KIND_DATA, 5, 3, 0)])
        # On another connection, as after a reconnect.
        cl2 = self.client()
        dup = cl2.submit(s, 1, [add])
        c.ok(dup["flags"] & REPLY_DUPLICATE, "resent on a new connection: DUPLICATE")
        cl2.close()
        c.eq(cl.lookup1(b)["refs"], 1, "still applied once")
        # Out of order: a higher number first, then a lower never-logged one.
        ref = lambda i: op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1000 + i, 0)
        cl.submit(s, 10, [ref(10)])
        r5 = cl.submit(s, 5, [ref(5)])
        c.ok(not r5["flags"] & REPLY_DUPLICATE, "number 5 after 10 is new and applied")
        c.eq(cl.lookup1(b)["refs"], 3, "refs after 1, 10, 5")
        dup = cl.submit(s, 5, [ref(5)])
        c.ok(dup["flags"] & REPLY_DUPLICATE, "number 5 again: DUPLICATE")
        # Survives a commit.
        cl.commit()
        dup = cl.submit(s, 10, [ref(10)])
        c.ok(dup["flags"] & REPLY_DUPLICATE, "kept replies survive a commit")
        c.eq(cl.lookup1(b)["refs"], 3, "refs after duplicates and a commit")
        # The window: highest = 1 + kept drops number 1.
        top = 1 + kept
        cl.submit(s, top, [ref(top)])
        c.error(lambda: cl.submit(s, 1, [add]), "REQUEST_TOO_OLD",
                "number 1 once %d is logged" % top, detail=top - kept + 1)
        bad = op(b, 0, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)
        c.error(lambda: cl.submit(s, 1, [bad]), "REQUEST_TOO_OLD",
                "the window is checked before the ops", detail=top - kept + 1)
        dup = cl.submit(s, 5, [bad])
        c.ok(dup["flags"] & REPLY_DUPLICATE, "a kept number is answered before its ops "
             "are looked at (even invalid ones)")
        dup = cl.submit(s, 10, [ref(10)])
        c.ok(dup["flags"] & REPLY_DUPLICATE, "number 10 is still kept (10 > %d - %d)"
             % (top, kept))
        r2 = cl.submit(s, 2, [ref(2)])
        c.ok(not r2["flags"] & REPLY_DUPLICATE, "number 2 never logged: applied")
        c.eq(cl.lookup1(b)["refs"], 5, "refs after the window checks")
        cl.close()

    # ------------------------------------------------------------ reads

    def t_lookup_backrefs(self):
        c = self.c
        c.section = "LOOKUP/BACKREFS"
        cl = self.cl
        conn = cl.conn
        c.error(lambda: conn.call(LOOKUP, lookup_body([])), "BAD_REQUEST", "LOOKUP count 0")
        c.error(lambda: conn.call(LOOKUP, lookup_body([1, 2], count=3)), "BAD_REQUEST",
                "LOOKUP count 3 with 2 bytenrs")
        c.error(lambda: conn.call(LOOKUP, struct.pack("<II", 1, 1) + bytes(8)),
                "BAD_REQUEST", "LOOKUP reserved not zero")
        many = [self.data] * 16384
        c.eq(len(cl.lookup(many)), 16384, "LOOKUP of 16384 bytenrs")
        c.error(lambda: conn.call(LOOKUP, lookup_body([self.data] * 16385)),
                "BAD_REQUEST", "LOOKUP count 16385")

        b = self.data
        c.error(lambda: conn.call(BACKREFS, backrefs_body(b, 0)), "BAD_REQUEST",
                "BACKREFS max_entries 0")
        c.error(lambda: conn.call(BACKREFS, backrefs_body(b, 16385)), "BAD_REQUEST",
                "BACKREFS max_entries 16385")
        c.error(lambda: conn.call(BACKREFS, backrefs_body(b, 4, (178, 5, 0, 0),
                                                          after_present=0)),
                "BAD_REQUEST", "BACKREFS after_present 0 with after_ fields")
        c.error(lambda: conn.call(BACKREFS, backrefs_body(b, 4, (0, 0, 0, 0),
                                                          after_present=2)),
                "BAD_REQUEST", "BACKREFS after_present 2")
        bad_reserved = bytearray(backrefs_body(b, 4))
        bad_reserved[14] = 1
        c.error(lambda: conn.call(BACKREFS, bytes(bad_reserved)), "BAD_REQUEST",
                "BACKREFS reserved not zero")

        # Paging one at a time over an extent with 9 backrefs of 2 types.
        s = self.session
        x, n = self.extent()
        ops = [op(x, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 7, 100, 0)]
        ops += [op(x, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 7, 100, 4096 * i)
                for i in range(1, 5)]
        ops += [op(x, n, ADD_REF, SHARED_DATA_REF, KIND_DATA, 4096 * i)
                for i in range(4, 0, -1)]
        self.rn += 1
        cl.submit(s, self.rn, ops)
        want = sorted([(EXTENT_DATA_REF, 7, 100, 4096 * i, 1) for i in range(5)] +
                      [(SHARED_DATA_REF, 4096 * i, 0, 0, 1) for i in range(1, 5)])
        for page in (1, 2, 4, 9, 10):
            first, entries, pages = cl.backrefs(x, page)
            c.eq(entries, want, "BACKREFS in pages of %d" % page)
            c.eq(pages, max(1, -(-9 // page)), "pages of %d" % page)
        # `after_` names a backref that is not there: the page starts at
        # the next one in key order.
        page = cl.backrefs_page(x, 2, (EXTENT_DATA_REF, 7, 100, 1))
        c.eq(page["entries"], want[1:3], "BACKREFS after a key between two backrefs")
        page = cl.backrefs_page(x, 2, (EXTENT_DATA_REF, 7, 99, 0))
        c.eq(page["entries"], want[0:2], "BACKREFS after a key before the first")
        page = cl.backrefs_page(x, 2, (255, 0, 0, 0))
        c.eq((page["entries"], page["more"]), ([], 0), "BACKREFS after a key past the last")
        # The same backref twice: counts add up; a drop to 0 leaves it out.
        self.rn += 1
        cl.submit(s, self.rn, [op(x, n, ADD_REF, SHARED_DATA_REF, KIND_DATA, 4096),
                               op(x, n, DROP_REF, SHARED_DATA_REF, KIND_DATA, 8192)])
        _, entries, _ = cl.backrefs(x)
        c.ok((SHARED_DATA_REF, 4096, 0, 0, 2) in entries, "two adds of one backref count 2")
        c.ok(all(e[1] != 8192 or e[0] != SHARED_DATA_REF for e in entries),
             "a backref dropped to 0 is left out")
        c.eq(cl.lookup1(x)["refs"], 9, "refs after +1 -1")
        self.paged = x

    # ------------------------------------------------------------ barriers

    def t_barriers(self):
        c = self.c
        c.section = "barriers"
        cl = self.client()
        s = cl.register()
        lease = self.hello["barrier_lease_ms"]
        bar = cl.barrier_acquire(s)
        c.eq(bar["lease_ms"], lease, "ACQUIRE lease_ms is HELLO's barrier_lease_ms")
        c.ok(bar["barrier_id"] != 0, "barrier id")
        c.eq(cl.barrier_renew(bar["barrier_id"]), lease, "RENEW lease_ms")
        # Ops stamped with the barrier's seq stay pending through a commit.
        b, n = self.extent()
        r = cl.submit(s, 1, [op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)],
                      SUBMIT_STAMP_SEQ)
        cm = cl.commit()
        c.ok(cm["held"] >= 1, "COMMIT holds the stamped head (held %d)" % cm["held"])
        e = cl.lookup1(b)
        c.eq((e["refs"], e["committed_refs"], e["flags"] & LK_PENDING), (1, 0, LK_PENDING),
             "stamped op still pending while the barrier is held")
        # An op's own seq decides: below the barrier's it runs, at it it is held.
        below, _ = self.extent()
        at, _ = self.extent()
        cl.submit(s, 10, [op(below, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0,
                             seq=max(bar["seq"], 1) - 1)])
        cl.submit(s, 11, [op(at, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0,
                             seq=bar["seq"])])
        cl.commit()
        c.eq(cl.lookup1(below)["committed_refs"], 1, "an op with seq below the barrier's runs")
        c.eq(cl.lookup1(at)["committed_refs"], 0, "an op with the barrier's seq is held")
        # A second stamped op's backref stays apart by seq but BACKREFS
        # merges them.
        cl.submit(s, 2, [op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)],
                  SUBMIT_STAMP_SEQ)
        _, entries, _ = cl.backrefs(b)
        c.eq(entries, [(EXTENT_DATA_REF, 5, 1, 0, 2)], "BACKREFS merges across seq")
        cl.barrier_release(bar["barrier_id"])
        c.error(lambda: cl.barrier_release(bar["barrier_id"]), "BARRIER_UNKNOWN",
                "RELEASE twice")
        c.error(lambda: cl.barrier_renew(bar["barrier_id"]), "BARRIER_UNKNOWN",
                "RENEW after RELEASE")
        c.error(lambda: cl.barrier_renew((1 << 64) - 3), "BARRIER_UNKNOWN",
                "RENEW of an id never acquired")
        cm = cl.commit()
        e = cl.lookup1(b)
        c.eq((e["refs"], e["committed_refs"], e["flags"]), (2, 2, LK_COMMITTED | LK_DATA),
             "committed once the barrier is released")
        c.error(lambda: cl.barrier_acquire((1 << 64) - 2), "SESSION_UNKNOWN",
                "ACQUIRE for a session never registered")
        c.error(lambda: cl.barrier_acquire(0), "SESSION_UNKNOWN", "ACQUIRE for session 0")
        # 64 per session.
        held = [cl.barrier_acquire(s)["barrier_id"] for _ in range(64)]
        c.eq(len(set(held)), 64, "64 distinct barrier ids")
        c.error(lambda: cl.barrier_acquire(s), "BARRIER_LIMIT", "the 65th barrier")
        s2 = cl.register()
        extra = cl.barrier_acquire(s2)["barrier_id"]
        c.ok(True, "another session acquires while the first holds 64")
        for bid in held + [extra]:
            cl.barrier_release(bid)
        # The lease.
        if lease <= 3000:
            bar = self.renewed_past_the_lease(cl, s, lease)
            time.sleep(lease / 1000 + 1.0)
            c.error(lambda: cl.barrier_renew(bar["barrier_id"]), "BARRIER_UNKNOWN",
                    "RENEW after the lease ran out")
        else:
            c.skip("lease expiry: barrier_lease_ms %d is over 3000" % lease)
        cl.close()

    def renewed_past_the_lease(self, cl, s, lease):
        """A barrier renewed twice, each RENEW 0.6 lease after the request
        before it: past the first lease, within the renewed one. Returns
        the barrier.

        The daemon counts a lease from when it handles a request. A RENEW
        answered less than one lease after the request before it was sent
        was handled within that lease, so it must succeed; a RENEW that
        took longer (a loaded machine: 0.4 lease to spare) tells nothing
        either way, and the round is tried again, at most 5 times."""
        c = self.c
        for _ in range(5):
            sent = time.monotonic()
            bar = cl.barrier_acquire(s)
            refused, timely = None, True
            for _ in range(2):
                time.sleep(lease * 0.6 / 1000)
                before = time.monotonic()
                try:
                    cl.barrier_renew(bar["barrier_id"])
                except ServerError as err:
                    refused = err
                timely = timely and time.monotonic() - sent < lease / 1000
                sent = before
                if refused is not None:
                    break
            if timely:
                c.ok(refused is None, "RENEW within the lease extends it%s"
                     % ("" if refused is None else " (%s)" % refused))
                return bar
            if refused is None:
                cl.barrier_release(bar["barrier_id"])
        c.ok(False, "RENEW within the lease extends it: no RENEW was answered "
             "within the lease in 5 tries")
        return bar

    # ------------------------------------------------------------ freed

    def t_freed(self):
        c = self.c
        c.section = "FREED"
        cl = self.cl
        conn = cl.conn
        s = self.session
        name = "doc-client-%x" % self.base
        sub = cl.freed_subscribe(name)
        c.ok(sub["consumer_id"] != 0, "consumer id")
        again = cl.freed_subscribe(name)
        c.eq((again["consumer_id"], again["acked_generation"]),
             (sub["consumer_id"], sub["acked_generation"]),
             "subscribing an existing name returns its id and acknowledgement")
        c.error(lambda: conn.call(FREED_SUBSCRIBE, struct.pack("<HH", 0, 0)),
                "BAD_REQUEST", "FREED_SUBSCRIBE name of 0 bytes")
        c.error(lambda: conn.call(FREED_SUBSCRIBE, struct.pack("<HH", 65, 0) + b"n" * 65),
                "BAD_REQUEST", "FREED_SUBSCRIBE name of 65 bytes")
        c.error(lambda: conn.call(FREED_SUBSCRIBE, struct.pack("<HH", 2, 0) + b"\xff\xff"),
                "BAD_REQUEST", "FREED_SUBSCRIBE name not UTF-8")
        c.error(lambda: conn.call(FREED_SUBSCRIBE, struct.pack("<HH", 2, 0) + b"abc"),
                "BAD_REQUEST", "FREED_SUBSCRIBE name_bytes short of the body")
        # Free three extents in one commit.
        exts = [self.extent(4096 * (i + 1)) for i in range(3)]
        self.rn += 1
        cl.submit(s, self.rn, [op(b, n, ADD_EXTENT, SHARED_DATA_REF, KIND_DATA, 4096)
                               for b, n in exts[:2]] +
                  [op(exts[2][0], exts[2][1], ADD_EXTENT, TREE_BLOCK_REF, KIND_TREE, 5,
                      level=2)])
        cl.commit()
        self.rn += 1
        cl.submit(s, self.rn, [op(b, n, DROP_REF, SHARED_DATA_REF, KIND_DATA, 4096)
                               for b, n in exts[:2]] +
                  [op(exts[2][0], exts[2][1], DROP_REF, TREE_BLOCK_REF, KIND_TREE, 5,
                      level=2)])
        cm = cl.commit()
        c.ok(cm["freed"] >= 3, "COMMIT freed our 3 extents (freed %d)" % cm["freed"])
        gen = cm["generation"]
        for b, _ in exts:
            e = cl.lookup1(b)
            c.eq((e["refs"], e["flags"]), (0, 0), "freed extent is gone from LOOKUP")
        # A cursor below every kept list: FREED_EXPIRED only if a list was
        # dropped (a new consumer's acked_generation is the newest dropped
        # list's, 0 if none), generation 0 included.
        probe = cl.freed_subscribe("doc-client-probe-%x" % self.base)
        if probe["acked_generation"] == 0:
            try:
                page = cl.freed(0, 0, 16384)
                c.ok(any(e["bytenr"] == exts[0][0] for e in page["extents"])
                     or page["more"], "FREED from (0, 0) with nothing dropped starts at "
                     "the oldest kept list")
            except ServerError as err:
                c.ok(False, "FREED from (0, 0) with nothing dropped (%s)" % err)
        else:
            c.error(lambda: cl.freed(0, 0, 10), "FREED_EXPIRED",
                    "FREED from (0, 0) once lists were dropped")
        cl.freed_ack(probe["consumer_id"], gen)
        # Read from our acknowledgement on, one extent per page.
        cursor = (sub["acked_generation"] + 1, 0)
        got, pages = [], 0
        while True:
            page = cl.freed(cursor[0], cursor[1], 1)
            pages += 1
            got += page["extents"]
            cursor = (page["next_generation"], page["next_index"])
            if not page["more"] or pages > 100000:
                break
        c.eq(cursor[0], gen + 1, "when more is 0 the cursor is past the last commit")
        mine = set(b for b, _ in exts)
        ours = [(e["generation"], e["bytenr"], e["num_bytes"], e["kind"], e["level"])
                for e in got if e["bytenr"] in mine]
        want = [(gen, exts[0][0], exts[0][1], KIND_DATA, 0),
                (gen, exts[1][0], exts[1][1], KIND_DATA, 0),
                (gen, exts[2][0], exts[2][1], KIND_TREE, 2)]
        c.eq(sorted(ours), sorted(want), "FREED lists our extents with the commit's generation")
        gens = [e["generation"] for e in got]
        c.ok(gens == sorted(gens), "FREED in commit order")
        # The same from the generation itself, in one page.
        page = cl.freed(gen, 0, 16384)
        c.eq(sorted((e["bytenr"] for e in page["extents"] if e["bytenr"] in mine)),
             sorted(b for b, _ in exts), "FREED from the commit's generation")
        c.ok(page["oldest_kept"] <= gen, "oldest_kept %d <= %d" % (page["oldest_kept"], gen))
        # Acknowledge.
        cid = sub["consumer_id"]
        c.eq(cl.freed_ack(cid, gen), gen, "FREED_ACK returns the generation")
        c.eq(cl.freed_ack(cid, gen - 1), gen, "an older ACK does not move back")
        c.eq(cl.freed_subscribe(name)["acked_generation"], gen, "subscribe shows the ack")
        c.error(lambda: cl.freed_ack(cid, gen + 1000), "BAD_REQUEST",
                "ACK above the last committed generation")
        c.error(lambda: cl.freed_ack((1 << 64) - 5, 1), "CONSUMER_UNKNOWN",
                "ACK of an unknown consumer")
        c.error(lambda: conn.call(FREED, struct.pack("<QII", gen, 0, 0)), "BAD_REQUEST",
                "FREED max_extents 0")
        c.error(lambda: conn.call(FREED, struct.pack("<QII", gen, 0, 16385)),
                "BAD_REQUEST", "FREED max_extents 16385")
        page = cl.freed(gen + 1000, 0, 10)
        c.eq((page["extents"], page["more"]), ([], 0), "FREED past the last commit is empty")

    # ------------------------------------------------------------ others

    def t_stats_ping(self):
        c = self.c
        c.section = "STATS/PING"
        cl = self.cl
        st = cl.stats()
        for key in ("engine", "log", "commits", "sessions", "freed", "barriers",
                    "connections", "wire"):
            c.ok(key in st, "STATS has %r" % key)
        c.eq(st.get("wire", {}).get("submit_ops_max"), self.hello["submit_ops_max"],
             "STATS wire.submit_ops_max")
        c.eq(st.get("wire", {}).get("frame_bytes_max"), self.hello["body_bytes_max"],
             "STATS wire.frame_bytes_max")
        c.eq(st.get("barriers", {}).get("lease_ms"), self.hello["barrier_lease_ms"],
             "STATS barriers.lease_ms")
        c.ok(st.get("engine", {}).get("generation", -1) >= 1, "STATS engine.generation")
        fresh = self.client()
        c.eq(fresh.hello["generation"], fresh.stats()["engine"]["generation"],
             "HELLO generation is STATS engine.generation")
        fresh.close()
        c.eq(st.get("failed", "absent"), None, "STATS failed is null")
        self.stats = st
        for data in (b"", b"x", bytes(range(64))):
            c.eq(cl.ping(data), data, "PING of %d bytes" % len(data))

    def t_pipeline(self):
        c = self.c
        c.section = "pipelining"
        cl = self.client()
        conn = cl.conn
        s = cl.register()
        infl = cl.hello["in_flight_max"]
        # More requests than in_flight_max, sent before reading any reply:
        # a writer thread sends while we read.
        import threading
        n = infl * 2 + 10
        ids = [1000 + 7 * i for i in range(n)]

        def writer():
            for i, rid in enumerate(ids):
                conn.send(PING, struct.pack("<Q", rid), request_id=rid)

        th = threading.Thread(target=writer)
        th.start()
        seen = {}
        for _ in range(n):
            rid, opcode, body = conn.recv()
            seen[rid] = body
        th.join()
        c.eq(sorted(seen), sorted(ids), "%d pipelined PINGs each answered once" % n)
        c.ok(all(struct.unpack("<Q", body)[0] == rid for rid, body in seen.items()),
             "each PING reply carries its request's id and bytes")

        # Mixed pipeline, replies matched by id.
        b, nb = self.extent()
        rn = 0
        reqs = {}
        for i in range(8):
            rn += 1
            body = submit_body(s, rn, [op(b, nb, ADD_EXTENT if i == 0 else ADD_REF,
                                          EXTENT_DATA_REF, KIND_DATA, 5, 10 + i, 0)],
                               SUBMIT_NO_WAIT if i % 2 else 0)
            reqs[conn.send(SUBMIT, body)] = ("submit", rn)
            reqs[conn.send(LOOKUP, lookup_body([b]))] = ("lookup", None)
            reqs[conn.send(STATS)] = ("stats", None)
        answered = {}
        for _ in range(len(reqs)):
            reply = conn.recv()
            rid = reply.request_id if isinstance(reply, ServerError) else reply[0]
            answered[rid] = reply
        c.eq(sorted(answered), sorted(reqs), "mixed pipeline: every id answered once")
        ok = True
        for rid, (kind, rn_) in reqs.items():
            reply = answered.get(rid)
            if isinstance(reply, ServerError) or reply is None:
                ok = False
                continue
            if kind == "submit":
                parse_submit_reply(reply[2], 1, rn_)
                ok = ok and reply[1] == SUBMIT
            elif kind == "lookup":
                ok = ok and reply[1] == LOOKUP
        c.ok(ok, "mixed pipeline: each reply has its request's opcode")
        c.eq(cl.lookup1(b)["refs"], 8, "refs after 8 pipelined SUBMITs")

        # Order: durable SUBMIT replies and error replies come in the order
        # their requests were read; a LOOKUP may overtake them.
        # The four requests go out in one write, the first a large batch,
        # the LOOKUP right after it, so that the LOOKUP is read while that
        # batch is being logged. The LOOKUP is of an extent with nothing
        # pending, answered at once. (A LOOKUP of `b`, which gains the
        # batch's 2048 refs at every try, took longer at every try, soon
        # longer than the log write: once the first tries missed on a
        # loaded machine, none overtook, 0 of 100 tries. With two CPUs busy
        # beside: 2 of 60 tries against 100 of 100 with an idle extent.)
        # Tries until one overtook, for 100 tries or 30 s, whichever is
        # longer.
        quiet, _ = self.extent()
        overtaken = 0
        order_ok = True
        tries = 0
        deadline = time.monotonic() + 30
        while overtaken < 1 and (tries < 100 or time.monotonic() < deadline):
            tries += 1
            ops = [op(b, nb, ADD_REF, SHARED_DATA_REF, KIND_DATA,
                      4096 * (tries * 4096 + i + 1)) for i in range(2048)]
            first, bad, second, look = (conn.rid() for _ in range(4))
            frames = []
            for rid, opcode, body in (
                    (first, SUBMIT, submit_body(s, rn + 1, ops)),
                    (look, LOOKUP, lookup_body([quiet])),
                    (bad, SUBMIT, submit_body(s, rn + 2, [op(b, 0, ADD_REF,
                                                             SHARED_DATA_REF, KIND_DATA, 1)])),
                    (second, SUBMIT, submit_body(s, rn + 3, [
                        op(b, nb, ADD_REF, SHARED_DATA_REF, KIND_DATA, 1 << 40 | tries)]))):
                frames.append(header(opcode, rid, body) + body)
            rn += 3
            conn.send_raw(b"".join(frames))
            order = []
            for _ in range(4):
                reply = conn.recv()
                order.append(reply.request_id if isinstance(reply, ServerError) else reply[0])
            waiting = [rid for rid in order if rid != look]
            order_ok = order_ok and waiting == [first, bad, second]
            if order.index(look) < order.index(first):
                overtaken += 1
        c.ok(order_ok, "durable SUBMIT and error replies in the order read")
        c.ok(overtaken >= 1, "a LOOKUP overtook a durable SUBMIT sent before it "
             "(%d of %d tries)" % (overtaken, tries))
        c.note("LOOKUP overtook a durable SUBMIT in %d of %d tries" % (overtaken, tries))
        cl.close()

    def t_auth(self):
        c = self.c
        c.section = "token"
        if not self.args.tcp or not self.args.token_file:
            c.skip("no --tcp listener with --token-file given")
            return
        with open(self.args.token_file, "rb") as f:
            token = f.read()
        if token.endswith(b"\n"):
            token = token[:-1]
        # The token binds TCP listeners only: the unix socket (its file
        # mode guards it) takes a HELLO with no token or a wrong one.
        for tok in (b"", b"wrong"):
            unix = Client(self.addr, tok)
            c.eq(unix.ping(b"u"), b"u", "unix HELLO with token %r accepted" % tok)
            unix.close()
        cl = Client(self.args.tcp, token)
        c.eq(cl.hello["fs_id"], self.hello["fs_id"], "TCP with the token: same fs_id")
        c.eq(cl.ping(b"t"), b"t", "TCP with the token: PING")
        cl.close()
        for bad, what in ((b"", "no token"), (token[:-1] + bytes([token[-1] ^ 1]),
                                               "a wrong token"),
                          (token + b"x", "the token and one byte more")):
            conn = Conn(self.args.tcp)
            rid = conn.send(HELLO, hello_body(token=bad))
            raw_error(conn, rid, "AUTH_FAILED", "TCP HELLO with " + what, c, True)
            conn.close()

    def t_busy(self):
        c = self.c
        c.section = "BUSY"
        mx = self.stats.get("connections", {}).get("max", 1 << 30)
        if mx > 16:
            c.skip("connections max %d is over 16" % mx)
            return
        # Connections open now (ours) count; fill up to the max.
        extra = []
        try:
            while True:
                conn = Conn(self.addr)
                rid = conn.send(HELLO, hello_body())
                reply = conn.recv()
                if isinstance(reply, ServerError):
                    c.eq((reply.name, reply.request_id), ("BUSY", rid),
                         "HELLO past --connections-max")
                    c.ok(conn.closed_by_server(), "BUSY closes the connection")
                    conn.close()
                    break
                conn.hello_reply = parse_hello_reply(reply[2])
                extra.append(conn)
                if len(extra) > mx:
                    c.ok(False, "more than %d connections accepted" % mx)
                    break
        finally:
            for conn in extra:
                conn.close()
        time.sleep(0.3)
        # Closing one frees a slot.
        deadline = time.time() + 5
        while True:
            try:
                cl = self.client()
                cl.close()
                c.ok(True, "a connection is accepted again once others closed")
                break
            except ServerError as err:
                if time.time() > deadline:
                    c.ok(False, "accepted again after closing (%s)" % err)
                    break
                time.sleep(0.1)

    def t_evict(self):
        c = self.c
        c.section = "sessions"
        mx = self.stats.get("sessions", {}).get("max", 1 << 30)
        if mx > 64:
            c.skip("sessions max %d is over 64" % mx)
            return
        cl = self.client()
        old = cl.register()
        b, n = self.extent()
        cl.submit(old, 1, [op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)])
        bar = cl.barrier_acquire(old)["barrier_id"]
        for _ in range(mx):
            cl.register()
        # The reaper releases an evicted session's barriers within a second.
        time.sleep(1.5)
        c.error(lambda: cl.barrier_renew(bar), "BARRIER_UNKNOWN",
                "RENEW of a barrier of an evicted session")
        c.error(lambda: cl.submit(old, 2, [op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA,
                                              5, 2, 0)]),
                "SESSION_EVICTED", "SUBMIT on a session evicted by %d newer ones" % mx)
        c.error(lambda: cl.submit(old, 1, [op(b, n, ADD_EXTENT, EXTENT_DATA_REF,
                                              KIND_DATA, 5, 1, 0)]),
                "SESSION_EVICTED", "a retry on an evicted session")
        c.error(lambda: cl.barrier_acquire(old), "SESSION_EVICTED",
                "ACQUIRE on an evicted session")
        c.eq(cl.lookup1(b)["refs"], 1, "nothing applied on an evicted session")
        cl.close()

    def t_refused(self):
        c = self.c
        c.section = "REFUSED"
        if not self.stats.get("verify"):
            c.skip("the daemon runs without --verify")
            return
        cl, s = self.cl, self.session
        b, n = self.extent()
        good = op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)
        missing = op(b, n, DROP_REF, EXTENT_DATA_REF, KIND_DATA, 5, 2, 0)
        self.rn += 1
        rn = self.rn
        err = c.error(lambda: cl.submit(s, rn, [good, missing]), "REFUSED",
                      "drop of a backref that does not exist", index=1, detail=b,
                      subcode=0)
        c.eq(cl.lookup1(b)["refs"], 0, "a REFUSED batch changed nothing")
        r = cl.submit(s, rn, [good])
        c.ok(not r["flags"] & REPLY_DUPLICATE, "the refused number is applied when resent")
        self.rn += 1
        rn = self.rn
        c.error(lambda: cl.submit(s, rn, [op(b, n, ADD_EXTENT, EXTENT_DATA_REF,
                                             KIND_DATA, 5, 3, 0)]),
                "REFUSED", "a second ADD_EXTENT of an allocated extent", index=0, detail=b)
        self.rn += 1
        cl.submit(s, self.rn, [op(b, n, DROP_REF, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0)])

    def t_freed_expired(self):
        c = self.c
        c.section = "FREED_EXPIRED"
        kept_max = self.stats.get("freed", {}).get("kept_max", 1 << 40)
        if kept_max > 64:
            c.skip("freed kept_max %d is over 64" % kept_max)
            return
        cl, s = self.cl, self.session
        sub = cl.freed_subscribe("doc-client-expired-%x" % self.base)
        # Two commits each freeing kept_max extents: the first list is
        # dropped when the second is recorded.
        gens = []
        for _ in range(2):
            exts = [self.extent() for _ in range(kept_max)]
            self.rn += 1
            cl.submit(s, self.rn, [op(b, n, ADD_EXTENT, SHARED_DATA_REF, KIND_DATA, 4096)
                                   for b, n in exts])
            cl.commit()
            self.rn += 1
            cl.submit(s, self.rn, [op(b, n, DROP_REF, SHARED_DATA_REF, KIND_DATA, 4096)
                                   for b, n in exts])
            gens.append(cl.commit()["generation"])
        page = cl.freed(gens[1], 0, 16384)
        c.eq(page["oldest_kept"], gens[1], "only the newest list is kept")
        c.eq(len(page["extents"]), kept_max, "the newest list is whole")
        c.error(lambda: cl.freed(sub["acked_generation"] + 1, 0, 10), "FREED_EXPIRED",
                "a consumer behind the dropped lists", detail=gens[1])
        c.error(lambda: cl.freed(gens[0], 0, 10), "FREED_EXPIRED",
                "a cursor at the dropped generation", detail=gens[1])
        new = cl.freed_subscribe("doc-client-late-%x" % self.base)
        c.eq(new["acked_generation"], gens[0],
             "a new consumer's acked_generation is the newest dropped list's")
        page = cl.freed(gens[0] + 1, 0, 16384)
        c.eq((len(page["extents"]), page["extents"][0]["generation"] if page["extents"]
              else None), (kept_max, gens[1]),
             "a cursor after the dropped list (commits that freed nothing) starts at "
             "oldest_kept")
        c.eq(new["oldest_kept"], gens[1], "FREED_SUBSCRIBE oldest_kept")
        c.eq(cl.freed_ack(sub["consumer_id"], gens[1]), gens[1], "the late consumer catches up")

    def t_freed_unsubscribe(self):
        c = self.c
        c.section = "FREED_UNSUBSCRIBE"
        cl, s = self.cl, self.session
        c.error(lambda: cl.freed_unsubscribe((1 << 64) - 5), "CONSUMER_UNKNOWN",
                "FREED_UNSUBSCRIBE of an id never handed out")
        dead_name = "doc-client-dead-%x" % self.base
        dead = cl.freed_subscribe(dead_name)
        # One extent freed by commit g; every other consumer of this run
        # acknowledges g, the dead one never does.
        b, n = self.extent()
        self.rn += 1
        cl.submit(s, self.rn, [op(b, n, ADD_EXTENT, SHARED_DATA_REF, KIND_DATA, 4096)])
        cl.commit()
        self.rn += 1
        cl.submit(s, self.rn, [op(b, n, DROP_REF, SHARED_DATA_REF, KIND_DATA, 4096)])
        g = cl.commit()["generation"]
        others = [x for x in cl.stats()["freed"]["consumers"]
                  if x["id"] != dead["consumer_id"]]
        for x in others:
            if x["name"].endswith("-%x" % self.base) and x["acked_generation"] < g:
                cl.freed_ack(x["id"], g)
        behind = [x["name"] for x in cl.stats()["freed"]["consumers"]
                  if x["id"] != dead["consumer_id"] and x["acked_generation"] < g]
        cl.commit()

        def holds():
            try:
                page = cl.freed(g, 0, 16)
            except ServerError as err:
                if err.name == "FREED_EXPIRED":
                    return False
                raise
            return any(e["bytenr"] == b and e["generation"] == g for e in page["extents"])
        if behind:
            c.skip("list release: consumers of another run are behind: %s" % behind)
        else:
            c.ok(holds(), "a consumer that never acknowledges holds the list")
        acked = cl.freed_unsubscribe(dead["consumer_id"])
        c.eq(acked, dead["acked_generation"],
             "FREED_UNSUBSCRIBE returns the consumer's acknowledged generation")
        c.ok(all(x["id"] != dead["consumer_id"] for x in cl.stats()["freed"]["consumers"]),
             "STATS no longer lists the removed consumer")
        c.error(lambda: cl.freed_unsubscribe(dead["consumer_id"]), "CONSUMER_UNKNOWN",
                "a retried FREED_UNSUBSCRIBE (the consumer is removed)")
        c.error(lambda: cl.freed_ack(dead["consumer_id"], g), "CONSUMER_UNKNOWN",
                "FREED_ACK of a removed consumer")
        cl.commit()
        if not behind:
            c.ok(not holds(), "the next commit drops what the remaining consumers "
                 "acknowledged")
        again = cl.freed_subscribe(dead_name)
        c.ok(again["consumer_id"] != dead["consumer_id"],
             "the name subscribes again as a new consumer (id %d, was %d)"
             % (again["consumer_id"], dead["consumer_id"]))
        if not behind:
            c.eq(again["acked_generation"], g,
                 "it starts like any new consumer: at the newest dropped list")
        cl.freed_unsubscribe(again["consumer_id"])

    def t_shutdown(self):
        c = self.c
        c.section = "SHUTTING_DOWN"
        if not self.args.stop_pid:
            c.skip("no --stop-pid: the daemon is left running")
            return
        a, b = self.client(), self.client()
        c.eq(a.ping(b"before"), b"before", "PING before the stop")
        os.kill(self.args.stop_pid, signal.SIGTERM)
        for name, cl in (("a", a), ("b", b)):
            try:
                reply = cl.conn.recv()
            except (Closed, ProtocolViolation) as err:
                c.ok(False, "connection %s: SHUTTING_DOWN before the close (%s)" % (name, err))
                continue
            c.ok(isinstance(reply, ServerError) and reply.name == "SHUTTING_DOWN"
                 and reply.request_id == 0,
                 "connection %s: SHUTTING_DOWN with request_id 0 (got %s)" % (name, reply))
            c.ok(cl.conn.closed_by_server(), "connection %s closed after SHUTTING_DOWN" % name)

    def t_consumers_full(self):
        c = self.c
        c.section = "consumers"
        if not self.args.fill_consumers:
            c.skip("no --fill-consumers: the device's consumer table is left as it is")
            return
        cl = self.cl
        have = len(cl.stats()["freed"]["consumers"])
        made = 0
        try:
            for i in range(CONSUMERS_MAX - have):
                cl.freed_subscribe("doc-client-fill-%x-%d" % (self.base, i))
                made += 1
        except ServerError as err:
            c.ok(False, "%d consumers subscribe (%d were: %s)" % (CONSUMERS_MAX, have, err))
            return
        c.error(lambda: cl.freed_subscribe("doc-client-one-too-many-%x" % self.base),
                "BAD_REQUEST", "FREED_SUBSCRIBE of consumer %d" % (CONSUMERS_MAX + 1))
        again = cl.freed_subscribe("doc-client-fill-%x-0" % self.base)
        c.ok(again["consumer_id"] != 0, "an existing name subscribes when the table is full")
        # FREED_UNSUBSCRIBE frees a slot: the one too many now subscribes,
        # and the table is full again.
        cl.freed_unsubscribe(again["consumer_id"])
        late = cl.freed_subscribe("doc-client-one-too-many-%x" % self.base)
        c.ok(late["consumer_id"] != again["consumer_id"],
             "after FREED_UNSUBSCRIBE a new name subscribes with a new id")
        c.error(lambda: cl.freed_subscribe("doc-client-fill-%x-0" % self.base),
                "BAD_REQUEST", "the removed name, with the table full again")

    def t_save_state(self):
        """Before a daemon restart: leave a session with batches (the last
        one durable but not committed), a held barrier and an acknowledged
        consumer, and write down what a client keeps."""
        c = self.c
        c.section = "before restart"
        cl = self.client()
        s = cl.register()
        b, n = self.extent()
        batches = [
            (1, [op(b, n, ADD_EXTENT, EXTENT_DATA_REF, KIND_DATA, 5, 1, 0),
                 op(b, n, ADD_REF, SHARED_DATA_REF, KIND_DATA, 8192)]),
            (2, [op(b, n, ADD_REF, EXTENT_DATA_REF, KIND_DATA, 5, 2, 0)]),
        ]
        replies = []
        for number, ops in batches[:1]:
            replies.append(cl.submit(s, number, ops))
        gen = cl.commit()["generation"]
        sub = cl.freed_subscribe("doc-client-restart-%x" % self.base)
        acked = cl.freed_ack(sub["consumer_id"], gen)
        bar = cl.barrier_acquire(s)["barrier_id"]
        for number, ops in batches[1:]:
            replies.append(cl.submit(s, number, ops))
        c.ok(all(r["flags"] & REPLY_DURABLE for r in replies), "batches durable")
        _, entries, _ = cl.backrefs(b)
        state = dict(
            fs_id=cl.hello["fs_id"].hex(), server_id=cl.hello["server_id"],
            generation=gen, session=s, bytenr=b, refs=cl.lookup1(b)["refs"],
            backrefs=entries, barrier=bar, consumer=sub["consumer_id"],
            consumer_name="doc-client-restart-%x" % self.base, acked=acked,
            sessions=sorted(REGISTERED),
            batches=[dict(number=number, ops=[o.hex() for o in ops], lsn=r["lsn"])
                     for (number, ops), r in zip(batches, replies)])
        c.eq(state["refs"], 3, "refs before the restart")
        with open(self.args.save_state, "w") as f:
            json.dump(state, f)
        cl.close()

    def t_check_state(self):
        """After a daemon restart (kill -9 included): what the document
        promises survives, and what it says does not, does not."""
        c = self.c
        c.section = "after restart"
        with open(self.args.check_state) as f:
            st = json.load(f)
        cl = self.client()
        h = cl.hello
        self.hello = h
        c.eq(h["fs_id"].hex(), st["fs_id"], "fs_id is the device's")
        c.ok(h["server_id"] != st["server_id"], "a new server_id after the restart")
        c.ok(h["generation"] >= st["generation"], "generation %d >= %d"
             % (h["generation"], st["generation"]))
        b, s = st["bytenr"], st["session"]
        c.eq(cl.lookup1(b)["refs"], st["refs"], "acknowledged batches are there")
        _, entries, _ = cl.backrefs(b)
        c.eq([list(e) for e in entries], st["backrefs"], "backrefs as before")
        for batch in st["batches"]:
            ops = [bytes.fromhex(o) for o in batch["ops"]]
            try:
                r = cl.submit(s, batch["number"], ops)
                c.eq((r["lsn"], r["flags"]), (batch["lsn"], REPLY_DURABLE | REPLY_DUPLICATE),
                     "retry of number %d after the restart: DUPLICATE, same LSN"
                     % batch["number"])
            except ServerError as err:
                c.ok(False, "retry of number %d after the restart (%s)"
                     % (batch["number"], err))
        c.eq(cl.lookup1(b)["refs"], st["refs"], "retries applied nothing")
        r = cl.submit(s, 3, [op(b, 4096, DROP_REF, SHARED_DATA_REF, KIND_DATA, 8192)])
        c.ok(not r["flags"] & REPLY_DUPLICATE, "the session goes on after the restart")
        c.eq(cl.lookup1(b)["refs"], st["refs"] - 1, "its new batch is applied")
        c.error(lambda: cl.barrier_renew(st["barrier"]), "BARRIER_UNKNOWN",
                "barriers do not survive a restart")
        sub = cl.freed_subscribe(st["consumer_name"])
        c.eq((sub["consumer_id"], sub["acked_generation"]), (st["consumer"], st["acked"]),
             "the consumer and its acknowledgement survive")
        fresh = cl.register()
        c.ok(fresh not in st["sessions"], "a new session id is never one handed out before")
        self.stats = cl.stats()
        cl.close()

    def run(self):
        tests = [self.t_hello, self.t_hello_required, self.t_frames, self.t_submit,
                 self.t_invalid, self.t_submit_errors, self.t_exactly_once,
                 self.t_lookup_backrefs, self.t_barriers, self.t_freed,
                 self.t_stats_ping, self.t_refused, self.t_freed_expired,
                 self.t_freed_unsubscribe,
                 self.t_pipeline, self.t_auth, self.t_busy,
                 self.t_evict, self.t_consumers_full, self.t_shutdown]
        if self.args.check_state:
            tests = [self.t_check_state, self.t_shutdown]
        elif self.args.save_state:
            # Before the consumer table is filled: it subscribes one.
            tests.insert(tests.index(self.t_consumers_full), self.t_save_state)
        for test in tests:
            start = time.time()
            try:
                test()
            except (ServerError, ProtocolViolation, Closed, OSError) as err:
                self.c.ok(False, "%s stopped: %s: %s" % (test.__name__,
                                                          type(err).__name__, err))
            if self.args.verbose:
                print("%s: %.2f s" % (test.__name__, time.time() - start))
        c = self.c
        print("refd_doc_client: %d checks passed, %d failed, %d skipped"
              % (c.passed, len(c.failed), len(c.skipped)))
        for note in c.notes:
            print("  note " + note)
        for failure in c.failed:
            print("  FAILED " + failure)
        return 1 if c.failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connect", required=True, help="unix:PATH or tcp:HOST:PORT")
    ap.add_argument("--tcp", help="a tcp:127.0.0.1:PORT listener that requires a token")
    ap.add_argument("--token-file", help="the token of --tcp")
    ap.add_argument("--fill-consumers", action="store_true",
                    help="subscribe consumers up to the device's limit (for a "
                    "throwaway test device: they are left subscribed)")
    ap.add_argument("--save-state", metavar="FILE",
                    help="end by leaving state for --check-state and writing it down")
    ap.add_argument("--check-state", metavar="FILE",
                    help="after the daemon restarted: check what --save-state left "
                    "(only these checks, then --stop-pid's)")
    ap.add_argument("--stop-pid", type=int,
                    help="the daemon's pid: end by stopping it (SIGTERM)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if not args.connect.startswith(("unix:", "tcp:")):
        ap.error("--connect must be unix:PATH or tcp:HOST:PORT")
    sys.exit(Run(args).run())


if __name__ == "__main__":
    main()
