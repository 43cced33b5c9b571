/*
 * A second client of the refd protocol written from docs/protocol.md
 * alone, in C with POSIX sockets and its own CRC32C: no refd code. The
 * Python doc client (../doc_client) checks every request and reply; this
 * one checks the edges that document answers and a client author trips
 * on: request ids 0 and reused ids, error frames before HELLO, a refused
 * HELLO that does not count, requests pipelined behind a refused HELLO,
 * a half-closed connection, DURABLE under
 * NO_WAIT, STAMP_SEQ without a barrier, barriers renewed and released
 * from another connection, BACKREFS after a key that does not exist, a
 * FREED cursor in the future, COMMIT with nothing pending, the order of
 * an error behind a durable SUBMIT, the idle timer, BUSY whatever the
 * first frame, and the token's trimmed bytes.
 *
 *   refd_c_client --examples
 *       prints the worked example's HELLO and SUBMIT requests in hex (one
 *       frame a line), for comparison with docs/protocol.md;
 *   refd_c_client --unix PATH --tcp HOST:PORT --token TOKEN --idle-s N
 *       runs the checks against a fresh daemon (no barrier acquired yet,
 *       no other client) started with --idle-timeout-s N and a token
 *       file holding TOKEN followed by "\r\n"; exits 0 only if all pass.
 *
 * Every wait is bounded by a socket timeout (SO_RCVTIMEO).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------ CRC32C */

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1; /* 0x1EDC6F41 reflected */
        crc_table[i] = c;
    }
}

static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------ bytes */

static void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint16_t get16(const uint8_t *p) { return p[0] | p[1] << 8; }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

enum {
    OP_HELLO = 1, OP_REGISTER, OP_SUBMIT, OP_LOOKUP, OP_BACKREFS, OP_BARRIER_ACQUIRE,
    OP_BARRIER_RENEW, OP_BARRIER_RELEASE, OP_COMMIT, OP_FREED_SUBSCRIBE, OP_FREED,
    OP_FREED_ACK, OP_STATS, OP_PING, OP_FREED_UNSUBSCRIBE, OP_ERROR = 0x7F
};
enum { BAD_FRAME = 1, UNSUPPORTED_VERSION = 4, BAD_REQUEST = 6, HELLO_REQUIRED = 7, AUTH_FAILED = 8,
       BUSY = 16, BARRIER_UNKNOWN = 18 };
#define HDR 32
#define BODY_MAX (1u << 20)

/* A frame: header fields and its body. */
struct frame {
    uint16_t version;
    uint8_t opcode, flags;
    uint64_t request_id;
    uint32_t body_bytes;
    uint8_t *body;
};

/* Encodes a request frame into out (HDR + n bytes). */
static size_t encode(uint8_t *out, uint8_t opcode, uint64_t rid, const uint8_t *body, uint32_t n,
                     uint16_t version) {
    memcpy(out, "RFDP", 4);
    put16(out + 4, version);
    out[6] = opcode;
    out[7] = 0;
    put64(out + 8, rid);
    put32(out + 16, n);
    put32(out + 20, crc32c(body, n));
    put32(out + 24, 0);
    put32(out + 28, crc32c(out, 28));
    if (n) memcpy(out + HDR, body, n);
    return HDR + n;
}

static size_t hello_body(uint8_t *b, const char *token, const char *name) {
    size_t t = strlen(token), n = strlen(name);
    put16(b, 1); put16(b + 2, 1); put16(b + 4, t); put16(b + 6, n);
    memcpy(b + 8, token, t);
    memcpy(b + 8 + t, name, n);
    return 8 + t + n;
}

/* One 56-byte op. */
static void put_op(uint8_t *p, uint64_t bytenr, uint64_t num_bytes, uint64_t seq, uint64_t k1,
                   uint64_t k2, uint64_t k3, uint8_t action, uint8_t ref_type, uint8_t kind) {
    memset(p, 0, 56);
    put64(p, bytenr); put64(p + 8, num_bytes); put64(p + 16, seq);
    put64(p + 24, k1); put64(p + 32, k2); put64(p + 40, k3);
    p[48] = action; p[49] = ref_type; p[50] = kind;
}

/* SUBMIT of one data ADD_EXTENT (root 5, inode 257, offset 0). */
static size_t submit_body(uint8_t *b, uint64_t session, uint64_t number, uint32_t flags,
                          uint64_t bytenr) {
    put64(b, session); put64(b + 8, number); put32(b + 16, 1); put32(b + 20, flags);
    put_op(b + 24, bytenr, 4096, 0, 5, 257, 0, 3, 178, 1);
    return 24 + 56;
}

/* ------------------------------------------------------------ checks */

static int failures, checks;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    va_list ap;
    checks++;
    if (!ok) failures++;
    printf("%s ", ok ? "ok  " : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

/* ------------------------------------------------------------ sockets */

static const char *unix_path;
static char tcp_host[256];
static const char *tcp_port;
static const char *token;
static int idle_s;

static void set_timeout(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int dial_unix(void) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", unix_path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("connect unix");
        exit(2);
    }
    set_timeout(fd, 5000);
    return fd;
}

static int dial_tcp(void) {
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(tcp_host, tcp_port, &hints, &ai) != 0) {
        fprintf(stderr, "bad --tcp address\n");
        exit(2);
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, 0);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        perror("connect tcp");
        exit(2);
    }
    freeaddrinfo(ai);
    set_timeout(fd, 5000);
    return fd;
}

static int send_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) {
            if (w < 0 && errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

static int send_req(int fd, uint8_t opcode, uint64_t rid, const uint8_t *body, uint32_t n) {
    static uint8_t buf[HDR + 4096];
    return send_all(fd, buf, encode(buf, opcode, rid, body, n, 1));
}

/* 1: got n bytes; 0: orderly close before any byte; -1: error, timeout or
 * a close in the middle. */
static int read_exact(int fd, uint8_t *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r == 0) return got == 0 ? 0 : -1;
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        got += r;
    }
    return 1;
}

/* Reads one server frame, checking it as the document asks a client to:
 * magic, version 1, header CRC, REPLY set and no other flag, reserved 0,
 * size, body CRC. Returns 1, 0 on a clean close, -1 on anything else. */
static int recv_frame(int fd, struct frame *f) {
    static uint8_t body[BODY_MAX];
    uint8_t h[HDR];
    int r = read_exact(fd, h, HDR);
    if (r <= 0) return r;
    if (memcmp(h, "RFDP", 4) || get32(h + 28) != crc32c(h, 28) || h[7] != 1 || get32(h + 24) ||
        get16(h + 4) != 1 || get32(h + 16) > BODY_MAX) {
        fprintf(stderr, "a server frame fails the header checks\n");
        return -1;
    }
    f->version = get16(h + 4);
    f->opcode = h[6];
    f->flags = h[7];
    f->request_id = get64(h + 8);
    f->body_bytes = get32(h + 16);
    f->body = body;
    if (read_exact(fd, body, f->body_bytes) != 1 && f->body_bytes) return -1;
    if (crc32c(body, f->body_bytes) != get32(h + 20)) {
        fprintf(stderr, "a server frame fails its body checksum\n");
        return -1;
    }
    return 1;
}

static uint16_t err_code(const struct frame *f) {
    return f->opcode == OP_ERROR && f->body_bytes >= 18 ? get16(f->body) : 0;
}

/* Closed by the server (EOF or reset) within the socket timeout, with no
 * frame before it. */
static int closed_without_frame(int fd) {
    uint8_t b;
    ssize_t r = recv(fd, &b, 1, 0);
    return r == 0 || (r < 0 && errno == ECONNRESET);
}

/* The next frame must be an error `code` with request id `rid`, then EOF. */
static void expect_error_then_close(int fd, uint16_t code, uint64_t rid, const char *what) {
    struct frame f;
    int r = recv_frame(fd, &f);
    check(r == 1 && err_code(&f) == code && f.request_id == rid,
          "%s: error %u with request_id %llu (got r=%d opcode 0x%02x code %u id %llu)", what,
          code, (unsigned long long)rid, r, r == 1 ? f.opcode : 0, r == 1 ? err_code(&f) : 0,
          r == 1 ? (unsigned long long)f.request_id : 0ull);
    check(closed_without_frame(fd), "%s: then the server closes", what);
}

/* Request, reply; returns the reply's opcode (0 on failure). */
static uint8_t call(int fd, uint8_t opcode, uint64_t rid, const uint8_t *body, uint32_t n,
                    struct frame *f) {
    if (send_req(fd, opcode, rid, body, n) != 0 || recv_frame(fd, f) != 1) return 0;
    if (f->request_id != rid) {
        fprintf(stderr, "reply to %llu carries id %llu\n", (unsigned long long)rid,
                (unsigned long long)f->request_id);
        return 0;
    }
    return f->opcode;
}

static int hello(int fd, const char *tok) {
    uint8_t b[400];
    struct frame f;
    size_t n = hello_body(b, tok, "c-client");
    return call(fd, OP_HELLO, 1, b, n, &f) == OP_HELLO && f.body_bytes == 64;
}

static int connect_hello(void) {
    int fd = dial_unix();
    if (!hello(fd, "")) {
        fprintf(stderr, "HELLO failed\n");
        exit(2);
    }
    return fd;
}

static uint64_t register_session(int fd) {
    struct frame f;
    if (call(fd, OP_REGISTER, 2, NULL, 0, &f) != OP_REGISTER || f.body_bytes != 16) {
        fprintf(stderr, "REGISTER failed\n");
        exit(2);
    }
    return get64(f.body);
}

/* COMMIT's reply fields: [0] generation ... [5] held. */
static int commit(int fd, uint64_t out[8]) {
    struct frame f;
    if (call(fd, OP_COMMIT, 3, NULL, 0, &f) != OP_COMMIT || f.body_bytes != 64) return 0;
    for (int i = 0; i < 8; i++) out[i] = get64(f.body + 8 * i);
    return 1;
}

/* LOOKUP of one bytenr: committed_refs (or UINT64_MAX on failure). */
static uint64_t committed_refs(int fd, uint64_t bytenr) {
    uint8_t b[16] = {0};
    struct frame f;
    put32(b, 1);
    put64(b + 8, bytenr);
    if (call(fd, OP_LOOKUP, 4, b, 16, &f) != OP_LOOKUP || f.body_bytes != 56) return UINT64_MAX;
    return get64(f.body + 8 + 16);
}

/* ------------------------------------------------------------ the checks */

static void t_hello_edges(void) {
    struct frame f;
    uint8_t b[400];
    /* HELLO and PING with request id 0 are answered like any other. */
    int fd = dial_unix();
    size_t n = hello_body(b, "", "");
    check(call(fd, OP_HELLO, 0, b, n, &f) == OP_HELLO, "HELLO with request_id 0 and an empty name");
    uint32_t bmax = get32(f.body + 4), ops = get32(f.body + 8), inflight = get32(f.body + 12);
    check(get16(f.body) == 1 && get16(f.body + 2) == 0 && bmax >= BODY_MAX && ops >= 1 &&
              ops <= (bmax - 24) / 56 && inflight >= 1 && get32(f.body + 52) >= 1 &&
              get64(f.body + 56) == 0,
          "HELLO reply: version 1, limits in range, reserved zero");
    check(call(fd, OP_PING, 0, (const uint8_t *)"zero", 4, &f) == OP_PING && f.body_bytes == 4 &&
              !memcmp(f.body, "zero", 4),
          "PING with request_id 0");
    /* Two requests with one id in flight: one reply each. */
    uint8_t two[2 * (HDR + 1)];
    encode(two, OP_PING, 5, (const uint8_t *)"x", 1, 1);
    encode(two + HDR + 1, OP_PING, 5, (const uint8_t *)"y", 1, 1);
    send_all(fd, two, sizeof two);
    int seen_x = 0, seen_y = 0;
    for (int i = 0; i < 2; i++)
        if (recv_frame(fd, &f) == 1 && f.opcode == OP_PING && f.request_id == 5 && f.body_bytes == 1)
            seen_x |= f.body[0] == 'x', seen_y |= f.body[0] == 'y';
    check(seen_x && seen_y, "two PINGs with one request_id in flight: two replies with that id");
    /* A second HELLO is BAD_REQUEST and the connection stays. */
    n = hello_body(b, "", "again");
    check(call(fd, OP_HELLO, 6, b, n, &f) == OP_ERROR && err_code(&f) == BAD_REQUEST,
          "a second HELLO gets BAD_REQUEST");
    check(call(fd, OP_PING, 7, NULL, 0, &f) == OP_PING, "and the connection stays open");
    close(fd);

    /* A refused HELLO does not count: the next one succeeds. */
    fd = dial_unix();
    check(call(fd, OP_HELLO, 8, b, 2, &f) == OP_ERROR && err_code(&f) == BAD_REQUEST,
          "a HELLO body of 2 bytes gets BAD_REQUEST");
    check(hello(fd, ""), "a HELLO after a refused one succeeds on the same connection");
    /* Reserved bytes of a body: BAD_REQUEST, the connection stays. */
    uint8_t lk[16] = {0};
    put32(lk, 1);
    put32(lk + 4, 1);
    check(call(fd, OP_LOOKUP, 9, lk, 16, &f) == OP_ERROR && err_code(&f) == BAD_REQUEST,
          "non-zero reserved bytes of a LOOKUP body get BAD_REQUEST");
    check(call(fd, OP_PING, 10, NULL, 0, &f) == OP_PING, "and the connection stays open");
    close(fd);

    /* Before HELLO, frame errors: version 1 error frames with id 0, then close. */
    /* Requests pipelined behind a refused HELLO: after BAD_REQUEST the
     * next one gets HELLO_REQUIRED, which closes. */
    fd = dial_unix();
    uint8_t pipe[3 * HDR + 2];
    size_t at = encode(pipe, OP_HELLO, 12, b, 2, 1);
    at += encode(pipe + at, OP_PING, 13, NULL, 0, 1);
    at += encode(pipe + at, OP_PING, 14, NULL, 0, 1);
    send_all(fd, pipe, at);
    check(recv_frame(fd, &f) == 1 && err_code(&f) == BAD_REQUEST && f.request_id == 12,
          "a pipelined HELLO of 2 bytes: BAD_REQUEST");
    expect_error_then_close(fd, HELLO_REQUIRED, 13, "the PING behind it");
    close(fd);

    fd = dial_unix();
    uint8_t fr[HDR + 8];
    n = hello_body(b, "", "");
    encode(fr, OP_HELLO, 11, b, n, 0); /* frame version 0 */
    send_all(fd, fr, HDR + n);
    if (recv_frame(fd, &f) == 1)
        check(err_code(&f) == UNSUPPORTED_VERSION && f.request_id == 0 && get64(f.body + 8) == 1 &&
                  get32(f.body + 4) == 1,
              "a frame of version 0: UNSUPPORTED_VERSION, id 0, detail 1, index 1 (code %u)",
              err_code(&f));
    else
        check(0, "a frame of version 0 is answered");
    check(closed_without_frame(fd), "then the server closes");
    close(fd);
    fd = dial_unix();
    /* At least 32 bytes: a whole header's worth. */
    const char *http = "GET /metrics HTTP/1.1\r\nHost: refd.example\r\n\r\n";
    send_all(fd, (const uint8_t *)http, strlen(http));
    expect_error_then_close(fd, BAD_FRAME, 0, "an HTTP request");
    close(fd);
}

static void t_submit_edges(void) {
    struct frame f;
    uint8_t b[128];
    uint64_t c[8] = {0};
    int fd = connect_hello();
    uint64_t s = register_session(fd);
    /* STAMP_SEQ before any barrier was acquired stamps 0: nothing held. */
    size_t n = submit_body(b, s, 1, 2, 0x7000000);
    check(call(fd, OP_SUBMIT, 20, b, n, &f) == OP_SUBMIT && get32(f.body + 12) == 1,
          "SUBMIT with STAMP_SEQ and no barrier ever acquired: DURABLE");
    int committed = commit(fd, c);
    check(committed && c[5] == 0 && committed_refs(fd, 0x7000000) == 1,
          "COMMIT holds nothing and commits it (held %llu)", committed ? (unsigned long long)c[5] : 0ull);
    uint64_t gen = c[0];
    committed = commit(fd, c);
    check(committed && c[0] == gen + 1 && c[1] == 0 && c[2] == 0,
          "a COMMIT with nothing pending writes generation %llu with counts 0",
          (unsigned long long)gen + 1);
    /* NO_WAIT: DURABLE clear; its retries: DUPLICATE, DURABLE as asked. */
    n = submit_body(b, s, 2, 1, 0x7100000);
    check(call(fd, OP_SUBMIT, 21, b, n, &f) == OP_SUBMIT && get32(f.body + 12) == 0,
          "a NO_WAIT SUBMIT's reply has no flag (flags %u)", get32(f.body + 12));
    uint64_t lsn = get64(f.body);
    check(call(fd, OP_SUBMIT, 22, b, n, &f) == OP_SUBMIT && get32(f.body + 12) == 2 &&
              get64(f.body) == lsn,
          "its NO_WAIT retry: DUPLICATE only, the same lsn");
    put32(b + 20, 0);
    check(call(fd, OP_SUBMIT, 23, b, n, &f) == OP_SUBMIT && get32(f.body + 12) == 3 &&
              get64(f.body) == lsn && get64(f.body + 16) == 2,
          "its retry without NO_WAIT: DUPLICATE and DURABLE, the same lsn");
    /* An error read after a durable SUBMIT is sent after its reply. */
    uint8_t two[2 * HDR + 80 + 8];
    n = submit_body(b, s, 3, 0, 0x7200000);
    size_t at = encode(two, OP_SUBMIT, 24, b, n, 1);
    uint8_t bad_lookup[8] = {0}; /* count 0 */
    at += encode(two + at, OP_LOOKUP, 25, bad_lookup, 8, 1);
    send_all(fd, two, at);
    uint64_t order[2] = {0, 0};
    for (int i = 0; i < 2; i++)
        if (recv_frame(fd, &f) == 1) order[i] = f.request_id;
    check(order[0] == 24 && order[1] == 25,
          "an error read after a durable SUBMIT comes after its reply (%llu, %llu)",
          (unsigned long long)order[0], (unsigned long long)order[1]);
    /* Half-close: what was read is answered, a durable SUBMIT included. */
    n = submit_body(b, s, 4, 0, 0x7300000);
    at = encode(two, OP_SUBMIT, 26, b, n, 1);
    at += encode(two + at, OP_PING, 27, NULL, 0, 1);
    send_all(fd, two, at);
    shutdown(fd, SHUT_WR);
    int sub = 0, ping = 0;
    for (int i = 0; i < 2; i++)
        if (recv_frame(fd, &f) == 1)
            sub |= f.request_id == 26 && f.opcode == OP_SUBMIT && get32(f.body + 12) == 1,
                ping |= f.request_id == 27 && f.opcode == OP_PING;
    check(sub && ping, "after a half-close the SUBMIT (durable) and the PING are answered");
    check(closed_without_frame(fd), "then the server closes");
    close(fd);
}

static void t_barriers_reads(void) {
    struct frame f;
    uint8_t b[128];
    uint64_t c[8] = {0};
    int fd = connect_hello(), other = connect_hello();
    uint64_t s = register_session(fd);
    uint8_t sb[8];
    put64(sb, s);
    check(call(fd, OP_BARRIER_ACQUIRE, 30, sb, 8, &f) == OP_BARRIER_ACQUIRE && f.body_bytes == 24,
          "BARRIER_ACQUIRE");
    uint64_t id = get64(f.body), seq = get64(f.body + 8);
    check(id != 0 && seq >= 1, "barrier id %#llx, seq %llu", (unsigned long long)id,
          (unsigned long long)seq);
    size_t n = submit_body(b, s, 1, 2, 0x7400000);
    check(call(fd, OP_SUBMIT, 31, b, n, &f) == OP_SUBMIT, "SUBMIT with STAMP_SEQ under the barrier");
    int committed = commit(fd, c);
    check(committed && c[5] == 1, "COMMIT holds its head (held %llu)",
          committed ? (unsigned long long)c[5] : 0ull);
    uint8_t ib[8];
    put64(ib, id);
    check(call(other, OP_BARRIER_RENEW, 32, ib, 8, &f) == OP_BARRIER_RENEW,
          "BARRIER_RENEW from another connection");
    check(call(other, OP_BARRIER_RELEASE, 33, ib, 8, &f) == OP_BARRIER_RELEASE && f.body_bytes == 8,
          "BARRIER_RELEASE from another connection");
    check(call(fd, OP_BARRIER_RENEW, 34, ib, 8, &f) == OP_ERROR && err_code(&f) == BARRIER_UNKNOWN,
          "then the barrier is unknown");
    check(commit(fd, c) && c[5] == 0 && committed_refs(fd, 0x7400000) == 1,
          "released: the next COMMIT runs the held head");
    /* BACKREFS after a key that does not exist, and after type 255. */
    n = 0;
    uint8_t sub[24 + 2 * 56];
    put64(sub, s); put64(sub + 8, 2); put32(sub + 16, 2); put32(sub + 20, 0);
    put_op(sub + 24, 0x7500000, 4096, 0, 5, 100, 0, 3, 178, 1);
    put_op(sub + 80, 0x7500000, 4096, 0, 5, 200, 0, 1, 178, 1);
    check(call(fd, OP_SUBMIT, 35, sub, sizeof sub, &f) == OP_SUBMIT, "two data refs");
    uint8_t br[40] = {0};
    put64(br, 0x7500000); put32(br + 8, 10); br[12] = 1; br[13] = 178;
    put64(br + 16, 5); put64(br + 24, 150);
    check(call(fd, OP_BACKREFS, 36, br, 40, &f) == OP_BACKREFS && get32(f.body + 36) == 1 &&
              f.body[34] == 0 && get64(f.body + 40 + 24) == 200,
          "BACKREFS after (178, 5, 150, 0), which does not exist: the backref of inode 200");
    br[13] = 255;
    memset(br + 16, 0, 24);
    check(call(fd, OP_BACKREFS, 37, br, 40, &f) == OP_BACKREFS && get32(f.body + 36) == 0 &&
              f.body[34] == 0,
          "BACKREFS after ref_type 255: an empty last page");
    put64(br, 0x7f00000); br[12] = 0; br[13] = 0;
    int zero = 1;
    if (call(fd, OP_BACKREFS, 38, br, 40, &f) == OP_BACKREFS && f.body_bytes == 40)
        for (int i = 8; i < 40; i++) zero &= f.body[i] == (i == 32 ? 255 : 0);
    else
        zero = 0;
    check(zero && get64(f.body) == 0x7f00000,
          "BACKREFS of an unknown extent: its bytenr, kind 255, every other field 0");
    /* A FREED cursor in the future comes back as it is, on an empty page. */
    uint8_t fb[16];
    put64(fb, 1ull << 40); put32(fb + 8, 5); put32(fb + 12, 10);
    check(call(fd, OP_FREED, 39, fb, 16, &f) == OP_FREED && f.body_bytes == 32 &&
              get32(f.body) == 0 && f.body[4] == 0 && get64(f.body + 8) == 1ull << 40 &&
              get32(f.body + 16) == 5,
          "a FREED cursor above the last generation: empty page, the cursor itself");
    close(other);
    close(fd);
}

static void t_idle(void) {
    struct timespec t0, t1;
    int fd = dial_unix();
    set_timeout(fd, (idle_s + 5) * 1000);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int closed = closed_without_frame(fd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    check(closed && s >= idle_s - 0.5, "no HELLO for %d s: closed without a frame after %.1f s",
          idle_s, s);
    close(fd);
    fd = connect_hello();
    set_timeout(fd, (idle_s + 5) * 1000);
    check(closed_without_frame(fd), "no request for %d s after HELLO: closed without a frame",
          idle_s);
    close(fd);
}

static void t_token(void) {
    const char *bad[3] = {"", NULL, NULL};
    char with_crlf[300], with_lf[300];
    snprintf(with_crlf, sizeof with_crlf, "%s\r\n", token);
    snprintf(with_lf, sizeof with_lf, "%s\n", token);
    bad[1] = with_crlf;
    bad[2] = with_lf;
    int fd = dial_tcp();
    check(hello(fd, token), "TCP HELLO with the token file's bytes less its trailing \\r\\n");
    close(fd);
    /* A PING pipelined behind a HELLO refused AUTH_FAILED gets no reply. */
    {
        uint8_t b[400], pipe[2 * HDR + 400];
        fd = dial_tcp();
        size_t n = hello_body(b, "wrong", "c-client");
        size_t at = encode(pipe, OP_HELLO, 43, b, n, 1);
        at += encode(pipe + at, OP_PING, 44, NULL, 0, 1);
        send_all(fd, pipe, at);
        expect_error_then_close(fd, AUTH_FAILED, 43, "a HELLO with a wrong token and a PING behind it");
        close(fd);
    }
    for (int i = 0; i < 3; i++) {
        uint8_t b[400];
        fd = dial_tcp();
        size_t n = hello_body(b, bad[i], "c-client");
        send_req(fd, OP_HELLO, 40 + i, b, n);
        expect_error_then_close(fd, AUTH_FAILED, 40 + i,
                                i == 0 ? "TCP HELLO without a token" : "TCP HELLO with a newline");
        close(fd);
    }
}

/* A PING on each of the connections that fill the daemon, so that its
 * idle timer (a few seconds in the test) does not free a slot. */
static void keep_alive(const int *fds, int n) {
    struct frame f;
    for (int i = 0; i < n; i++)
        if (call(fds[i], OP_PING, 52, NULL, 0, &f) != OP_PING) fprintf(stderr, "filler %d is gone\n", i);
}

static void t_busy(void) {
    enum { MAX_OPEN = 64 };
    int open_fds[MAX_OPEN], n_open = 0, full = 0;
    struct frame f;
    uint8_t b[400];
    /* Fill the daemon up to --connections-max. */
    while (n_open < MAX_OPEN) {
        int fd = dial_unix();
        size_t n = hello_body(b, "", "filler");
        send_req(fd, OP_HELLO, 50, b, n);
        if (recv_frame(fd, &f) != 1) break;
        if (err_code(&f) == BUSY) {
            full = 1;
            close(fd);
            break;
        }
        open_fds[n_open++] = fd;
    }
    check(full, "BUSY once %d connections are open", n_open);
    if (full) {
        keep_alive(open_fds, n_open);
        int fd = dial_unix();
        send_req(fd, OP_PING, 51, NULL, 0);
        expect_error_then_close(fd, BUSY, 51, "a PING as the first frame when full");
        close(fd);
        keep_alive(open_fds, n_open);
        fd = dial_unix();
        send_all(fd, (const uint8_t *)"garbage garbage garbage garbage!", 32);
        expect_error_then_close(fd, BUSY, 0, "bad magic as the first frame when full");
        close(fd);
        keep_alive(open_fds, n_open);
        fd = dial_unix();
        expect_error_then_close(fd, BUSY, 0, "a silent connection when full (after 1 s)");
        close(fd);
    }
    for (int i = 0; i < n_open; i++) close(open_fds[i]);
    /* The server frees a slot once it has seen the close: wait for that
     * before the next check, which needs a connection that is not BUSY. */
    int freed = 0;
    for (int attempt = 0; attempt < 100 && !freed; attempt++) {
        int fd = dial_unix();
        size_t n = hello_body(b, "", "after-busy");
        freed = call(fd, OP_HELLO, 52, b, n, &f) == OP_HELLO;
        close(fd);
        if (!freed) usleep(50 * 1000);
    }
    check(freed, "a HELLO is accepted again within 5 s of closing the connections");
}

/* ------------------------------------------------------------ main */

static void print_hex(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x%s", p[i], i + 1 < n ? " " : "\n");
}

int main(int argc, char **argv) {
    crc_init();
    if (crc32c((const uint8_t *)"", 0) != 0 || crc32c((const uint8_t *)"123456789", 9) != 0xE3069283u) {
        fprintf(stderr, "CRC32C check values of docs/protocol.md do not hold\n");
        return 2;
    }
    if (argc == 2 && !strcmp(argv[1], "--examples")) {
        uint8_t b[128], fr[HDR + 128];
        size_t n = hello_body(b, "", "example");
        print_hex(fr, encode(fr, OP_HELLO, 1, b, n, 1));
        n = submit_body(b, 1, 1, 0, 0x100000);
        print_hex(fr, encode(fr, OP_SUBMIT, 2, b, n, 1));
        return 0;
    }
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--unix")) unix_path = argv[i + 1];
        else if (!strcmp(argv[i], "--token")) token = argv[i + 1];
        else if (!strcmp(argv[i], "--idle-s")) idle_s = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--tcp")) {
            snprintf(tcp_host, sizeof tcp_host, "%s", argv[i + 1]);
            char *colon = strrchr(tcp_host, ':');
            if (!colon) return 2;
            *colon = 0;
            tcp_port = colon + 1;
        }
    }
    if (!unix_path || !tcp_port || !token || idle_s <= 0) {
        fprintf(stderr, "usage: %s --examples | --unix PATH --tcp HOST:PORT --token T --idle-s N\n",
                argv[0]);
        return 2;
    }
    t_hello_edges();
    t_submit_edges();
    t_barriers_reads();
    t_token();
    t_busy();
    t_idle();
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
