/* modelcloak native enclave: the fixed part of every generated enclave (docs/NATIVE.md).
 *
 * Speaks the framed protocol of modelcloak/enclave/protocol.py on one descriptor, reads its key,
 * decrypts the private section of the one bundle it was built for with AES-256-GCM from libcrypto,
 * keeps the weights resident, and answers INFER under the bundle's output policy and budget.
 *
 *   enclave --fd N (--key-file PATH | --key-env VAR) [--max-frame-bytes B] [--max-memory-mb M]
 *           [--threads T (accepted, one thread is used)] [--seccomp on|off] [--spin-us U]
 *
 * Start: harden, read the key, HELLO. WAITING: LOAD (+LOAD_DATA), PING, SHUTDOWN. After a good
 * LOAD: weights copied out, plaintext and key wiped, warm-up, sandbox (RLIMIT_NOFILE and a seccomp
 * allow list: read/write on held descriptors, clocks, exit), then READY. SERVING: INFER, STATS,
 * PING, SHUTDOWN. Only the two frame buffers are allocated, once, at start.
 *
 * The bundle header is not parsed as JSON: the SHA-256 of the one header this program accepts is
 * compiled in, with the facts read from it at build time. A header that differs in any byte is
 * refused as failed authentication, exactly as the AEAD would refuse it in the Python enclave.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include "mc_model.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tensor data travels little-endian; this runtime copies it as is"
#endif

enum { LOAD = 0x01, LOAD_DATA = 0x02, INFER = 0x03, STATS = 0x04, PING = 0x05, SHUTDOWN = 0x06,
       HELLO = 0x81, READY = 0x82, RESULT = 0x83, STATS_REPLY = 0x84, PONG = 0x85, BYE = 0x86, ERROR = 0xFF };
enum { MALFORMED_FRAME = 1, UNKNOWN_TYPE, FRAME_TOO_LARGE, BAD_STATE, BAD_TENSOR, BAD_INPUT, BAD_HEADER,
       WRONG_KEY, AUTH_FAILED, BAD_MODEL, BAD_POLICY, BUDGET_EXHAUSTED, RATE_LIMITED, INFERENCE_FAILED,
       KEY_UNAVAILABLE, SANDBOX_FAILED, INTERNAL };
enum { F_NON_DUMPABLE = 1, F_CORE_ZERO = 2, F_NOFILE = 4, F_AS = 8, F_SECCOMP = 16, F_KEY_LOCKED = 32 };

#define OVERHEAD 9u
#define TAG 16u
#define MAX_TENSORS 1024u
#define NO_LIMIT UINT64_MAX
#define KEY_SIZE 32

static int g_fd = -1;
static uint32_t g_max_frame = 64u << 20;
static unsigned char *g_rx, *g_tx;               /* one frame each, allocated at start */
static unsigned char *g_key;                      /* one locked, non-dumped page */
static int g_key_ready, g_loaded, g_flags, g_use_seccomp = 1;
static unsigned char g_key_id[8];
static double g_started_at, g_started_mono;
static uint64_t g_served, g_requests, g_refused;
static double g_tokens, g_last;
/* the frame in g_rx when LOAD streaming met a different message: it is served next */
static int g_pending;
static uint8_t g_pend_type;
static uint64_t g_pend_id;
static uint32_t g_pend_len;
/* Bounded adaptive spin before blocking for the next request (docs/ENCLAVE.md, "Spinning"). */
static double g_spin = 200e-6;
static int g_spin_armed = 1;

/* ---------------------------------------------------------------------------------------- */
/* small helpers */

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void put16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = (unsigned char)v; }
static void put32(unsigned char *p, uint32_t v) { for (int i = 3; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v; }
static void put64(unsigned char *p, uint64_t v) { for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v; }
static void putf64(unsigned char *p, double d) { uint64_t v; memcpy(&v, &d, 8); put64(p, v); }
static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static void wipe_all(void) {
    if (g_key) OPENSSL_cleanse(g_key, KEY_SIZE);
    g_key_ready = 0;
    OPENSSL_cleanse(mc_plain, mc_section_size);
    mc_wipe();
}

static _Noreturn void leave(int status) {
    wipe_all();
    _exit(status);
}

static void on_sigterm(int sig) {
    (void)sig;
    leave(0);
}

/* ---------------------------------------------------------------------------------------- */
/* transport */

static int read_exact(unsigned char *buf, size_t count) {   /* 0, or -1 at end of input */
    size_t done = 0;
    while (done < count) {
        ssize_t got = read(g_fd, buf + done, count - done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        done += (size_t)got;
    }
    return 0;
}

static void read_or_leave(unsigned char *buf, size_t count) {
    if (read_exact(buf, count)) leave(0);   /* the host closed its end: wipe and go */
}

/* Poll for the next request without sleeping for at most g_spin seconds, yielding the core
 * between tries; only if the last request came within the bound (an idle host costs one spin). */
static double spin_for_request(void) {
    double began = now_mono();
    if (g_spin_armed) {
        struct pollfd p = {g_fd, POLLIN, 0};
        while (poll(&p, 1, 0) == 0 && now_mono() - began < g_spin) sched_yield();
    }
    return began;
}

static void request_arrived(double began) {
    g_spin_armed = g_spin > 0 && now_mono() - began <= g_spin;
}

static void discard(uint64_t count) {
    while (count) {
        size_t step = count < g_max_frame ? (size_t)count : g_max_frame;
        read_or_leave(g_rx, step);
        count -= step;
    }
}

static void send_parts(uint8_t type, uint64_t id, const unsigned char *a, size_t alen,
                       const unsigned char *b, size_t blen) {
    unsigned char head[13];
    put32(head, (uint32_t)(OVERHEAD + alen + blen));
    head[4] = type;
    put64(head + 5, id);
    struct iovec iov[3] = {{head, 13}, {(void *)a, alen}, {(void *)b, blen}};
    int first = 0;
    while (first < 3) {
        ssize_t wrote = writev(g_fd, iov + first, 3 - first);
        if (wrote < 0 && errno == EINTR) continue;
        if (wrote < 0) leave(0);
        while (first < 3 && (size_t)wrote >= iov[first].iov_len) wrote -= (ssize_t)iov[first++].iov_len;
        if (first < 3) { iov[first].iov_base = (char *)iov[first].iov_base + wrote; iov[first].iov_len -= (size_t)wrote; }
    }
}

static void send_frame(uint8_t type, uint64_t id, const unsigned char *p, size_t n) { send_parts(type, id, p, n, NULL, 0); }

static void send_error(uint64_t id, int code, const char *fmt, ...) {
    unsigned char buf[2 + 1024 + 1];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)buf + 2, 1025, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n > 1024) n = 1024;
    put16(buf, (uint16_t)code);
    send_frame(ERROR, id, buf, 2 + (size_t)n);
}

/* Next well-framed host message into g_rx; violations are answered and skipped. */
static void next_frame(uint8_t *type, uint64_t *id, uint32_t *len) {
    if (g_pending) {
        g_pending = 0;
        *type = g_pend_type, *id = g_pend_id, *len = g_pend_len;
        return;
    }
    for (;;) {
        unsigned char head[13];
        double began = spin_for_request();
        read_or_leave(head, 4);
        request_arrived(began);
        uint32_t length = get32(head);
        if (length < OVERHEAD) {
            discard(length);
            send_error(0, MALFORMED_FRAME, "frame length %u is shorter than its type and request id (9)", length);
            continue;
        }
        read_or_leave(head + 4, OVERHEAD);
        uint8_t t = head[4];
        uint64_t rid = get64(head + 5);
        uint32_t body = length - OVERHEAD;
        if (length > g_max_frame) {
            send_error(rid, FRAME_TOO_LARGE, "frame of %u bytes exceeds this enclave's limit of %u; its body was discarded",
                       length, g_max_frame);
            discard(body);
            continue;
        }
        read_or_leave(g_rx, body);
        if (t < LOAD || t > SHUTDOWN) {
            send_error(rid, UNKNOWN_TYPE, "unknown message type 0x%02x", t);
            continue;
        }
        *type = t, *id = rid, *len = body;
        return;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* key: 32 raw bytes, 64 hex digits or base64 of 32 bytes, whitespace around ignored */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int b64val(int c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

static int parse_key(const unsigned char *text, size_t len, unsigned char *out) {
    if (len == KEY_SIZE) { memcpy(out, text, KEY_SIZE); return 0; }
    while (len && strchr(" \t\r\n\v\f", text[len - 1]) && text[len - 1]) len--;
    while (len && strchr(" \t\r\n\v\f", text[0]) && text[0]) text++, len--;
    if (len == 2 * KEY_SIZE) {
        int ok = 1;
        for (int i = 0; i < KEY_SIZE && ok; i++) {
            int hi = hexval(text[2 * i]), lo = hexval(text[2 * i + 1]);
            if (hi < 0 || lo < 0) ok = 0; else out[i] = (unsigned char)(hi << 4 | lo);
        }
        if (ok) return 0;
    }
    if (len != 44 || text[43] != '=' || text[42] == '=') return -1;   /* base64 of 32 bytes: 43 symbols + '=' */
    uint32_t acc = 0;
    int bits = 0, n = 0;
    for (size_t i = 0; i < 43; i++) {
        int v = b64val(text[i]);
        if (v < 0) return -1;
        acc = acc << 6 | (uint32_t)v, bits += 6;
        if (bits >= 8) { bits -= 8; if (n < KEY_SIZE) out[n++] = (unsigned char)(acc >> bits); acc &= (1u << bits) - 1; }
    }
    return n == KEY_SIZE && acc == 0 ? 0 : -1;
}

static const char *read_key(const char *file, const char *env, char *why, size_t whylen) {
    unsigned char text[4097];
    size_t len = 0;
    char origin[600];
    if (file) {
        int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) {
            if (errno == ENOENT) snprintf(why, whylen, "enclave key file %s does not exist", file);
            else snprintf(why, whylen, "cannot open enclave key file %s: %s", file, strerror(errno));
            return why;
        }
        struct stat st;
        if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
            close(fd);
            snprintf(why, whylen, "enclave key file %s is not a regular file", file);
            return why;
        }
        if (st.st_mode & 077) {
            close(fd);
            snprintf(why, whylen, "enclave key file %s is readable by other users (mode %o); chmod 600 it", file,
                     st.st_mode & 0777);
            return why;
        }
        ssize_t got;
        while (len < sizeof text && (got = read(fd, text + len, sizeof text - len)) > 0) len += (size_t)got;
        close(fd);
        snprintf(origin, sizeof origin, "enclave key file %s", file);
    } else {
        const char *value = getenv(env);
        if (!value || !*value) {
            snprintf(why, whylen, "environment variable %s (the enclave key) is not set", env);
            return why;
        }
        len = strnlen(value, sizeof text);
        memcpy(text, value, len);
        OPENSSL_cleanse((void *)value, strlen(value));   /* our copy of the environment block */
        unsetenv(env);
        snprintf(origin, sizeof origin, "environment variable %s", env);
    }
    g_key = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_key == MAP_FAILED) { g_key = NULL; snprintf(why, whylen, "cannot map a page for the key"); return why; }
    madvise(g_key, 4096, MADV_DONTDUMP);
    if (mlock(g_key, 4096) == 0) g_flags |= F_KEY_LOCKED;
    int bad = parse_key(text, len, g_key);
    OPENSSL_cleanse(text, sizeof text);
    if (bad) {
        snprintf(why, whylen, "%s does not hold a 256-bit key (32 raw bytes, 64 hex digits or base64 of 32 bytes)", origin);
        return why;
    }
    g_key_ready = 1;
    return NULL;
}

/* HKDF-SHA256 as in enclave/chunks.py derive: info "modelcloak/v1/<label>". An empty salt is HMAC'd as
 * HashLen zero bytes (RFC 5869), which is what HMAC does with an empty key. */
static int hkdf(const unsigned char *salt, size_t salt_len, const char *info, unsigned char *out, size_t out_len) {
    static const unsigned char zeros[32];
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    int ok = ctx && EVP_PKEY_derive_init(ctx) > 0 && EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
             EVP_PKEY_CTX_set1_hkdf_salt(ctx, salt_len ? salt : zeros, salt_len ? (int)salt_len : 32) > 0 &&
             EVP_PKEY_CTX_set1_hkdf_key(ctx, g_key, KEY_SIZE) > 0 &&
             EVP_PKEY_CTX_add1_hkdf_info(ctx, (const unsigned char *)info, (int)strlen(info)) > 0 &&
             EVP_PKEY_derive(ctx, out, &out_len) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

static void hex8(const unsigned char *id, char *out) {
    for (int i = 0; i < 8; i++) sprintf(out + 2 * i, "%02x", id[i]);
}

/* ---------------------------------------------------------------------------------------- */
/* hardening and sandbox */

static void harden_early(uint64_t max_memory_mb) {
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 && prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0) g_flags |= F_NON_DUMPABLE;
    struct rlimit zero = {0, 0};
    if (setrlimit(RLIMIT_CORE, &zero) == 0) g_flags |= F_CORE_ZERO;
    if (max_memory_mb) {
        struct rlimit as = {max_memory_mb << 20, max_memory_mb << 20};
        if (setrlimit(RLIMIT_AS, &as) == 0) g_flags |= F_AS;
    }
    madvise(mc_plain, mc_section_size, MADV_DONTDUMP);
}

#if defined(__x86_64__)
#define MC_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define MC_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif
#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
#define KILL(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS)

/* An allow list: this program needs nothing after LOAD but its descriptor, the clock and exit.
 * Everything else fails with EPERM; exec, ptrace and cross-process memory kill the process. */
static int install_filter(void) {
#ifdef MC_AUDIT_ARCH
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MC_AUDIT_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
#if defined(__x86_64__)
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),   /* the x32 ABI */
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
#endif
        ALLOW(__NR_read), ALLOW(__NR_write), ALLOW(__NR_readv), ALLOW(__NR_writev),
        ALLOW(__NR_clock_gettime), ALLOW(__NR_rt_sigreturn), ALLOW(__NR_exit), ALLOW(__NR_exit_group),
        ALLOW(__NR_ppoll), ALLOW(__NR_sched_yield),   /* the bounded spin for the next request */
#ifdef __NR_poll
        ALLOW(__NR_poll),
#endif
        KILL(__NR_execve), KILL(__NR_execveat), KILL(__NR_ptrace), KILL(__NR_process_vm_readv),
        KILL(__NR_process_vm_writev),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof filter / sizeof filter[0]), filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
#else
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* LOAD */

static void load_reply_error(uint64_t id, int code, const char *msg) { send_error(id, code, "%s", msg); }

static void handle_load(uint64_t id, uint32_t len) {
    if (len < 4 || (uint64_t)len != 4ull + get32(g_rx) + 8) {
        send_error(id, MALFORMED_FRAME, "LOAD payload is truncated or has trailing bytes");
        return;
    }
    uint32_t hlen = get32(g_rx);
    const unsigned char *header = g_rx + 4;
    uint64_t total = get64(g_rx + 4 + hlen);
    uint64_t chunks = mc_section_size ? (mc_section_size + mc_chunk_size - 1) / mc_chunk_size : 1;
    uint64_t expected = mc_section_size + chunks * TAG;
    int code = 0;
    char msg[1024] = "";
    if (g_loaded || !g_key_ready) {
        code = BAD_STATE;
        snprintf(msg, sizeof msg, "a model is already loaded; start a new enclave for another bundle");
    } else if (hlen < 14 || memcmp(header, "\x89MCLOAK\n", 8) != 0) {
        code = BAD_HEADER;
        snprintf(msg, sizeof msg, "LOAD does not carry a modelcloak bundle header (bad magic bytes)");
    } else if (get16(header + 8) != 1) {
        code = BAD_HEADER;
        snprintf(msg, sizeof msg, "bundle format version %u is not supported by this enclave (it reads 1)", get16(header + 8));
    } else if (14ull + get32(header + 10) != hlen) {
        code = BAD_HEADER;
        snprintf(msg, sizeof msg, "header is %u bytes but its prefix announces a %u-byte manifest", hlen, get32(header + 10));
    } else if (memcmp(g_key_id, mc_key_id, 8) != 0) {
        char want[17], have[17];
        hex8(mc_key_id, want), hex8(g_key_id, have);
        code = WRONG_KEY;
        snprintf(msg, sizeof msg, "wrong enclave key: the bundle was sealed for enclave key id %s, this enclave holds key id %s",
                 want, have);
    } else {
        unsigned char digest[32];
        unsigned int dlen = 0;
        if (!EVP_Digest(header, hlen, digest, &dlen, EVP_sha256(), NULL) || memcmp(digest, mc_header_digest, 32) != 0) {
            code = AUTH_FAILED;
            snprintf(msg, sizeof msg, "the bundle header failed authentication: it was modified (its output policy "
                     "included) or it is not the bundle this native enclave was built for");
        } else if (total != expected) {
            code = BAD_HEADER;
            snprintf(msg, sizeof msg, "LOAD declares %llu ciphertext bytes; the enclave section needs %llu",
                     (unsigned long long)total, (unsigned long long)expected);
        }
    }
    unsigned char digest[32], key[32], tag[TAG], ad[45];
    EVP_CIPHER_CTX *ctx = NULL;
    if (!code) {
        EVP_Digest(header, hlen, digest, NULL, EVP_sha256(), NULL);
        ctx = EVP_CIPHER_CTX_new();
        if (!ctx || hkdf(mc_salt, 32, mc_section_label, key, 32)) { code = INTERNAL; snprintf(msg, sizeof msg, "crypto library failure"); }
    }
    /* Stream the ciphertext: plaintext bytes go through EVP straight into mc_plain, each chunk's
     * tag is collected and checked at the chunk's end. A failure keeps consuming the declared
     * bytes so the stream stays in step, then answers once. */
    uint64_t received = 0, chunk = 0, pos = 0;
    int started = 0;
    while (received < total) {
        uint8_t t;
        uint64_t rid;
        uint32_t n;
        next_frame(&t, &rid, &n);
        if (t != LOAD_DATA || rid != id) {
            g_pending = 1, g_pend_type = t, g_pend_id = rid, g_pend_len = n;
            OPENSSL_cleanse(mc_plain, mc_section_size);
            OPENSSL_cleanse(key, sizeof key);
            EVP_CIPHER_CTX_free(ctx);
            static const char *names[] = {"?", "LOAD", "LOAD_DATA", "INFER", "STATS", "PING", "SHUTDOWN"};
            send_error(id, BAD_STATE, "LOAD was interrupted: expected LOAD_DATA for request %llu, got %s",
                       (unsigned long long)id, names[t <= SHUTDOWN ? t : 0]);
            return;
        }
        if (received + n > total) {
            if (!code) { code = MALFORMED_FRAME; snprintf(msg, sizeof msg, "LOAD_DATA carries more than the %llu bytes LOAD declared", (unsigned long long)total); }
            break;
        }
        received += n;
        const unsigned char *q = g_rx;
        while (n && !code) {
            uint64_t start = chunk * mc_chunk_size;
            uint64_t plain = mc_section_size - start < mc_chunk_size ? mc_section_size - start : mc_chunk_size;
            if (!started) {
                unsigned char iv[12] = {0};
                put64(iv + 4, chunk);
                memcpy(ad, digest, 32), put32(ad + 32, mc_section_index), put64(ad + 36, chunk);
                ad[44] = chunk == chunks - 1;
                int outl;
                if (!EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) ||
                    !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) ||
                    !EVP_DecryptInit_ex(ctx, NULL, NULL, key, iv) || !EVP_DecryptUpdate(ctx, NULL, &outl, ad, 45)) {
                    code = INTERNAL; snprintf(msg, sizeof msg, "crypto library failure"); break;
                }
                started = 1;
            }
            if (pos < plain) {
                uint32_t take = (uint32_t)(plain - pos < n ? plain - pos : n);
                int outl;
                if (!EVP_DecryptUpdate(ctx, mc_plain + start + pos, &outl, q, (int)take)) { code = INTERNAL; break; }
                pos += take, q += take, n -= take;
            } else {
                uint32_t take = (uint32_t)(plain + TAG - pos < n ? plain + TAG - pos : n);
                memcpy(tag + (pos - plain), q, take);
                pos += take, q += take, n -= take;
                if (pos == plain + TAG) {
                    int outl;
                    if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, tag) ||
                        EVP_DecryptFinal_ex(ctx, mc_plain + start + plain, &outl) <= 0) {
                        code = AUTH_FAILED;
                        snprintf(msg, sizeof msg, "the private section failed authentication at chunk %llu of %llu: the "
                                 "bundle header (including its output policy) or the section was modified, or they come "
                                 "from different bundles", (unsigned long long)chunk, (unsigned long long)chunks);
                    }
                    chunk++, pos = 0, started = 0;
                }
            }
        }
    }
    OPENSSL_cleanse(key, sizeof key);
    EVP_CIPHER_CTX_free(ctx);
    if (!code && chunk != chunks) { code = INTERNAL; snprintf(msg, sizeof msg, "the enclave section ended early"); }
    if (!code && mc_prepare() != 0) { code = BAD_MODEL; snprintf(msg, sizeof msg, "the decrypted private part does not match this native enclave"); }
    OPENSSL_cleanse(mc_plain, mc_section_size);   /* weights live on in their own arrays */
    if (code) {
        if (!g_loaded) mc_wipe();   /* a refused second LOAD must not touch the model in service */
        load_reply_error(id, code, msg);
        return;
    }
    OPENSSL_cleanse(g_key, KEY_SIZE);   /* its only job is done: a second LOAD is refused */
    g_key_ready = 0;
    g_loaded = 1;
    for (int i = 0; i < mc_n_inputs; i++) memset(mc_input(i), 0, mc_inputs[i].sample_elems * sizeof(float));
    mc_run(1);   /* warm-up before the sandbox: first-touch page faults happen now */
    struct rlimit nofile = {16, 16};
    if (setrlimit(RLIMIT_NOFILE, &nofile) == 0) g_flags |= F_NOFILE;
    if (g_use_seccomp) {
        if (install_filter() != 0) {
            send_error(id, SANDBOX_FAILED, "the model loaded, but the sandbox could not be installed: seccomp filter refused");
            leave(4);
        }
        g_flags |= F_SECCOMP;
    }
    g_tokens = mc_rate > 1.0 ? mc_rate : 1.0;
    g_last = now_mono();
    unsigned char tail[20];
    putf64(tail, g_started_at);
    putf64(tail + 8, now_mono() - g_started_mono);
    put32(tail + 16, (uint32_t)g_flags);
    send_parts(READY, id, mc_ready_head, mc_ready_head_len, tail, sizeof tail);
}

/* ---------------------------------------------------------------------------------------- */
/* INFER */

typedef struct {
    const unsigned char *name, *dims, *data;
    uint16_t name_len;
    uint8_t dtype, rank;
} tensor_ref;

static tensor_ref g_tensors[MAX_TENSORS];
static const char *const DTYPE_NAMES[14] = {0, "float32", "uint8", "int8", "uint16", "int16", "int32", "int64", 0,
                                            "bool", "float16", "float64", "uint32", "uint64"};
static const int ITEMSIZE[14] = {0, 4, 1, 1, 2, 2, 4, 8, 0, 1, 2, 8, 4, 8};

/* Decode a tensor list into g_tensors; returns the count, or -1 after answering BAD_TENSOR. */
static int decode_tensors(uint64_t id, const unsigned char *p, uint32_t len) {
    uint32_t at = 0;
    if (len < 2) { send_error(id, BAD_TENSOR, "tensor list is truncated"); return -1; }
    uint16_t count = get16(p);
    at = 2;
    if (count > MAX_TENSORS) { send_error(id, BAD_TENSOR, "tensor list declares %u tensors, at most 1024 are allowed", count); return -1; }
    for (uint16_t i = 0; i < count; i++) {
        tensor_ref *t = &g_tensors[i];
        if (len - at < 2 || len - at - 2 < get16(p + at)) { send_error(id, BAD_TENSOR, "tensor list is truncated"); return -1; }
        t->name_len = get16(p + at), t->name = p + at + 2, at += 2 + t->name_len;
        if (len - at < 2) { send_error(id, BAD_TENSOR, "tensor list is truncated"); return -1; }
        t->dtype = p[at], t->rank = p[at + 1], at += 2;
        if (t->dtype > 13 || !ITEMSIZE[t->dtype]) {
            send_error(id, BAD_TENSOR, "tensor '%.*s' has unknown dtype code %u", t->name_len, t->name, t->dtype); return -1;
        }
        if (t->rank > 32) { send_error(id, BAD_TENSOR, "tensor '%.*s' has rank %u > 32", t->name_len, t->name, t->rank); return -1; }
        if ((uint64_t)(len - at) < 8ull * t->rank) { send_error(id, BAD_TENSOR, "tensor list is truncated"); return -1; }
        t->dims = p + at, at += 8u * t->rank;
        uint64_t bytes = (uint64_t)ITEMSIZE[t->dtype], left = len - at;
        int zero = 0;
        for (int d = 0; d < t->rank; d++) if (get64(t->dims + 8 * d) == 0) zero = 1;
        for (int d = 0; d < t->rank && !zero; d++) {
            uint64_t dim = get64(t->dims + 8 * d);
            if (dim > left || bytes > left / dim) { bytes = UINT64_MAX; break; }
            bytes *= dim;
        }
        if (zero) bytes = 0;
        if (bytes > left) {
            send_error(id, BAD_TENSOR, "tensor '%.*s' needs more bytes than the message has (%llu)", t->name_len, t->name,
                       (unsigned long long)left);
            return -1;
        }
        t->data = p + at, at += (uint32_t)bytes;
    }
    if (at != len) { send_error(id, BAD_TENSOR, "tensor list has %u unexpected trailing bytes", len - at); return -1; }
    return count;
}

static int name_is(const tensor_ref *t, const char *name) {
    return strlen(name) == t->name_len && memcmp(name, t->name, t->name_len) == 0;
}

static void shape_text(const mc_io *io, char *out, size_t n) {
    size_t at = (size_t)snprintf(out, n, "[%s", "?");
    if (io->fixed_batch >= 0) at = (size_t)snprintf(out, n, "[%lld", (long long)io->fixed_batch);
    for (int d = 0; d < io->rank && at < n; d++) at += (size_t)snprintf(out + at, n - at, ", %lld", (long long)io->dims[d]);
    if (at < n) snprintf(out + at, n - at, "]");
}

static void got_text(const tensor_ref *t, char *out, size_t n) {
    size_t at = (size_t)snprintf(out, n, "[");
    for (int d = 0; d < t->rank && at < n; d++)
        at += (size_t)snprintf(out + at, n - at, d ? ", %llu" : "%llu", (unsigned long long)get64(t->dims + 8 * d));
    if (at < n) snprintf(out + at, n - at, "]");
}

/* Budget and token bucket, as policy.Meter; 0 when admitted. */
static int admit(uint64_t id, uint64_t samples) {
    if (mc_budget != NO_LIMIT) {
        uint64_t left = mc_budget > g_served ? mc_budget - g_served : 0;
        if (!left) {
            g_refused++;
            send_error(id, BUDGET_EXHAUSTED, "query budget exhausted (%llu of %llu samples used)", (unsigned long long)g_served,
                       (unsigned long long)mc_budget);
            return -1;
        }
        if (samples > left) {
            g_refused++;
            send_error(id, BUDGET_EXHAUSTED, "query budget too small for this batch (%llu samples asked, %llu of %llu left)",
                       (unsigned long long)samples, (unsigned long long)left, (unsigned long long)mc_budget);
            return -1;
        }
    }
    if (mc_rate > 0) {
        double capacity = mc_rate > 1.0 ? mc_rate : 1.0, now = now_mono();
        g_tokens = fmin(capacity, g_tokens + (now - g_last) * mc_rate);
        g_last = now;
        if ((double)samples > capacity) {
            g_refused++;
            send_error(id, RATE_LIMITED, "a batch of %llu samples exceeds the rate limit's burst of %g samples (%g samples/s); "
                       "send smaller batches", (unsigned long long)samples, capacity, mc_rate);
            return -1;
        }
        if ((double)samples > g_tokens) {
            g_refused++;
            send_error(id, RATE_LIMITED, "rate limit of %g samples/s reached; retry in %.2f s", mc_rate,
                       ((double)samples - g_tokens) / mc_rate);
            return -1;
        }
        g_tokens -= (double)samples;
    }
    return 0;
}

static int better(float a, int ia, float b, int ib) {   /* a ranks before b: larger, NaN last, ties to the lower index */
    if (isnan(a) || isnan(b)) return isnan(b) && (!isnan(a) || ia < ib);
    return a > b || (a == b && ia < ib);
}

static unsigned char *put_tensor_head(unsigned char *p, const char *name, uint8_t dtype, int rank, const uint64_t *dims) {
    size_t n = strlen(name);
    put16(p, (uint16_t)n), memcpy(p + 2, name, n), p += 2 + n;
    p[0] = dtype, p[1] = (uint8_t)rank, p += 2;
    for (int d = 0; d < rank; d++) put64(p, dims[d]), p += 8;
    return p;
}

static void handle_infer(uint64_t id, uint32_t len) {
    int count = decode_tensors(id, g_rx, len);
    if (count < 0) return;
    const tensor_ref *feed[64] = {0};
    char missing[512] = "", unknown[512] = "";
    for (int i = 0; i < count; i++) {
        for (int j = 0; j < i; j++)
            if (g_tensors[j].name_len == g_tensors[i].name_len && !memcmp(g_tensors[j].name, g_tensors[i].name, g_tensors[i].name_len)) {
                send_error(id, BAD_INPUT, "input '%.*s' appears twice", g_tensors[i].name_len, g_tensors[i].name);
                return;
            }
        int found = -1;
        for (int k = 0; k < mc_n_inputs; k++) if (name_is(&g_tensors[i], mc_inputs[k].name)) found = k;
        if (found < 0) {
            size_t at = strlen(unknown);
            snprintf(unknown + at, sizeof unknown - at, "%s'%.*s'", at ? ", " : "", g_tensors[i].name_len, g_tensors[i].name);
        } else feed[found] = &g_tensors[i];
    }
    for (int k = 0; k < mc_n_inputs; k++)
        if (!feed[k]) { size_t at = strlen(missing); snprintf(missing + at, sizeof missing - at, "%s'%s'", at ? ", " : "", mc_inputs[k].name); }
    if (*missing || *unknown) {
        send_error(id, BAD_INPUT, "inputs do not match the private part: %s%s%s%s%s", *missing ? "missing " : "", missing,
                   *missing && *unknown ? "; " : "", *unknown ? "unknown " : "", unknown);
        return;
    }
    uint64_t samples = 0;
    for (int k = 0; k < mc_n_inputs; k++) {
        const tensor_ref *t = feed[k];
        const mc_io *io = &mc_inputs[k];
        char want[300], got[300];
        if (t->dtype != 1) {
            send_error(id, BAD_INPUT, "input '%s' must be float32, got %s", io->name, DTYPE_NAMES[t->dtype]);
            return;
        }
        int ok = t->rank == io->rank + 1 && (io->fixed_batch < 0 || get64(t->dims) == (uint64_t)io->fixed_batch);
        for (int d = 0; ok && d < io->rank; d++) ok = get64(t->dims + 8 * (d + 1)) == (uint64_t)io->dims[d];
        if (!ok) {
            shape_text(io, want, sizeof want), got_text(t, got, sizeof got);
            send_error(id, BAD_INPUT, "input '%s' must have shape %s, got %s", io->name, want, got);
            return;
        }
        uint64_t n = get64(t->dims);
        if (k && n != samples) { send_error(id, BAD_INPUT, "every input must have the same batch size"); return; }
        samples = n;
    }
    /* the result's size, known before running: refuse what cannot be sent */
    const mc_io *first = &mc_outputs[0];
    uint64_t rows = first->rank ? first->sample_elems / (uint64_t)first->dims[first->rank - 1] : 1;
    uint64_t classes = first->rank ? (uint64_t)first->dims[first->rank - 1] : 1;
    uint64_t head_bytes = 2, data_bytes = 0;
    if (mc_policy_mode == 3) {
        for (int o = 0; o < mc_n_outputs; o++)
            head_bytes += 2 + strlen(mc_outputs[o].name) + 2 + 8ull * (mc_outputs[o].rank + 1),
            data_bytes += samples * mc_outputs[o].sample_elems * 4;
    } else {
        uint64_t per = mc_policy_mode == 2 ? mc_policy_k : 1;
        head_bytes += 2 + (mc_policy_mode == 2 ? 4 : 5) + 2 + 8ull * (first->rank + (mc_policy_mode == 2));
        data_bytes = samples * rows * per * 8;
    }
    if (admit(id, samples)) return;
    if (OVERHEAD + head_bytes + data_bytes > g_max_frame) {
        send_error(id, FRAME_TOO_LARGE, "the result (%llu bytes) exceeds the frame limit of %u; send smaller batches",
                   (unsigned long long)(head_bytes + data_bytes), g_max_frame);
        return;
    }
    unsigned char *p = g_tx;
    unsigned char *data[64];
    uint64_t dims[MC_MAX_RANK + 2];
    dims[0] = samples;
    if (mc_policy_mode == 3) {
        put16(p, (uint16_t)mc_n_outputs), p += 2;
        for (int o = 0; o < mc_n_outputs; o++) {
            for (int d = 0; d < mc_outputs[o].rank; d++) dims[d + 1] = (uint64_t)mc_outputs[o].dims[d];
            p = put_tensor_head(p, mc_outputs[o].name, 1, mc_outputs[o].rank + 1, dims);
            data[o] = p, p += samples * mc_outputs[o].sample_elems * 4;
        }
    } else {
        int rank = first->rank;   /* batch + dims without the class axis (+ K for topk) */
        for (int d = 0; d + 1 < first->rank; d++) dims[d + 1] = (uint64_t)first->dims[d];
        if (mc_policy_mode == 2) dims[rank] = mc_policy_k, rank++;
        put16(p, 1), p += 2;
        p = put_tensor_head(p, mc_policy_mode == 2 ? "topk" : "label", 7, rank, dims);
        data[0] = p;
    }
    static unsigned char chosen[1 << 16];
    for (uint64_t s = 0; s < samples; s += (uint64_t)mc_tile) {
        int n = (int)(samples - s < (uint64_t)mc_tile ? samples - s : (uint64_t)mc_tile);
        for (int k = 0; k < mc_n_inputs; k++)
            memcpy(mc_input(k), feed[k]->data + s * mc_inputs[k].sample_elems * 4, (size_t)n * mc_inputs[k].sample_elems * 4);
        mc_run(n);
        if (mc_policy_mode == 3) {
            for (int o = 0; o < mc_n_outputs; o++)
                memcpy(data[o] + s * mc_outputs[o].sample_elems * 4, mc_output(o), (size_t)n * mc_outputs[o].sample_elems * 4);
            continue;
        }
        const float *out = mc_output(0);
        for (uint64_t r = 0; r < (uint64_t)n * rows; r++) {
            const float *row = out + r * classes;
            int64_t picks = mc_policy_mode == 2 ? mc_policy_k : 1;
            if (mc_policy_mode == 2 && classes <= sizeof chosen) memset(chosen, 0, classes);
            for (int64_t j = 0; j < picks; j++) {
                int best = -1;
                for (uint64_t c = 0; c < classes; c++) {
                    if (mc_policy_mode == 2 && chosen[c]) continue;
                    if (best < 0 || better(row[c], (int)c, row[best], best)) best = (int)c;
                }
                if (mc_policy_mode == 2) chosen[best] = 1;
                int64_t v = best;
                memcpy(data[0] + ((s * rows + r) * (uint64_t)picks + (uint64_t)j) * 8, &v, 8);
            }
        }
    }
    g_served += samples;
    g_requests++;
    send_frame(RESULT, id, g_tx, (size_t)(head_bytes + data_bytes));
}

static void handle_stats(uint64_t id) {
    unsigned char p[48];
    put64(p, g_served), put64(p + 8, g_requests), put64(p + 16, g_refused);
    put64(p + 24, mc_budget);
    put64(p + 32, mc_budget == NO_LIMIT ? NO_LIMIT : (mc_budget > g_served ? mc_budget - g_served : 0));
    putf64(p + 40, now_mono() - g_started_mono);
    send_frame(STATS_REPLY, id, p, sizeof p);
}

/* ---------------------------------------------------------------------------------------- */

static _Noreturn void usage(const char *why) {
    fprintf(stderr, "modelcloak native enclave: %s\n", why);
    fprintf(stderr, "usage: enclave --fd N (--key-file PATH | --key-env VAR) [--max-frame-bytes B] "
                    "[--max-memory-mb M] [--threads T] [--seccomp on|off] [--spin-us U]\n");
    _exit(2);
}

int main(int argc, char **argv) {
    g_started_mono = now_mono();
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    g_started_at = (double)wall.tv_sec + wall.tv_nsec * 1e-9;
    const char *key_file = NULL, *key_env = NULL;
    uint64_t max_memory = 0, max_frame = 64u << 20;
    long fd = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--connect")) usage("--connect is not supported by the native enclave; pass --fd");
        if (i + 1 >= argc) usage("every option takes a value");
        const char *v = argv[++i];
        char *end;
        if (!strcmp(a, "--fd")) { fd = strtol(v, &end, 10); if (*end || fd < 0) usage("--fd must be a descriptor number"); }
        else if (!strcmp(a, "--key-file")) key_file = v;
        else if (!strcmp(a, "--key-env")) key_env = v;
        else if (!strcmp(a, "--max-frame-bytes")) { max_frame = strtoull(v, &end, 10); if (*end) usage("--max-frame-bytes must be a number"); }
        else if (!strcmp(a, "--max-memory-mb")) { max_memory = strtoull(v, &end, 10); if (*end || !max_memory) usage("--max-memory-mb must be > 0"); }
        else if (!strcmp(a, "--threads")) { if (strtol(v, &end, 10) <= 0 || *end) usage("--threads must be > 0"); }
        else if (!strcmp(a, "--spin-us")) {
            long us = strtol(v, &end, 10);
            if (*end || us < 0 || us > 1000000) usage("--spin-us must be 0..1000000");
            g_spin = us * 1e-6;
            g_spin_armed = us > 0;
        }
        else if (!strcmp(a, "--seccomp")) { if (strcmp(v, "on") && strcmp(v, "off")) usage("--seccomp is on or off"); g_use_seccomp = !strcmp(v, "on"); }
        else usage("unknown option");
    }
    if (fd < 0) usage("--fd is required");
    if (!key_file == !key_env) usage("give exactly one of --key-file or --key-env");
    if (max_frame < 65536 || max_frame > 0xFFFFFFFFull) usage("--max-frame-bytes must be 65536..4294967295");
    g_max_frame = (uint32_t)max_frame;
    harden_early(max_memory);
    struct stat st;
    if (fd <= 2 || fstat((int)fd, &st) || !(S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode))) {
        fprintf(stderr, "modelcloak native enclave: cannot use the channel: descriptor %ld is not a socket or pipe above 2\n", fd);
        return 3;
    }
    g_fd = (int)fd;
    char why[900];
    if (read_key(key_file, key_env, why, sizeof why)) {
        send_error(0, KEY_UNAVAILABLE, "the enclave could not read its key: %s", why);
        fprintf(stderr, "modelcloak enclave: %s\n", why);
        leave(2);
    }
    if (hkdf(NULL, 0, "modelcloak/v1/key-id", g_key_id, 8)) { fprintf(stderr, "modelcloak enclave: HKDF failed\n"); leave(2); }
    g_rx = malloc(g_max_frame);
    g_tx = malloc(g_max_frame);
    if (!g_rx || !g_tx) { fprintf(stderr, "modelcloak enclave: cannot allocate the frame buffers\n"); leave(2); }
    signal(SIGTERM, on_sigterm);
    signal(SIGPIPE, SIG_IGN);

    unsigned char hello[22];
    put16(hello, 1), put32(hello + 2, g_max_frame), memcpy(hello + 6, g_key_id, 8), putf64(hello + 14, g_started_at);
    send_frame(HELLO, 0, hello, sizeof hello);
    for (;;) {
        uint8_t type;
        uint64_t id;
        uint32_t len;
        next_frame(&type, &id, &len);
        switch (type) {
        case SHUTDOWN:
            wipe_all();
            send_frame(BYE, id, NULL, 0);
            leave(0);
        case PING: send_frame(PONG, id, g_rx, len); break;
        case LOAD: handle_load(id, len); break;
        case LOAD_DATA: send_error(id, BAD_STATE, "LOAD_DATA without a LOAD in progress"); break;
        case INFER:
            if (!g_loaded) send_error(id, BAD_STATE, "INFER before a model was loaded; send LOAD first");
            else handle_infer(id, len);
            break;
        case STATS:
            if (!g_loaded) send_error(id, BAD_STATE, "STATS before a model was loaded; send LOAD first");
            else handle_stats(id);
            break;
        }
    }
}
