/*
 * tracevisor._fastloop: the KVM_RUN loop of one vCPU in C.
 *
 * Why: on nested KVM every guest entry/exit flushes the branch predictors and instruction caches, so each
 * bytecode the interpreter runs between two KVM_RUNs costs several times what it costs in a tight loop.  The
 * commonest exit by far is a one-byte OUT to the UART, whose handling is fixed: append the byte to the console,
 * append (record) or compare (replay) a 27/31-byte exit row.  This module does exactly that in C and hands
 * every other exit back to Python, decoded, together with the console bytes gathered so far.  Python keeps all
 * decisions: stop requests, kicks (EINTR), pauses, hypercalls, devices, faults, debugging.
 *
 * The layout constants below mirror tracevisor/kvm/uapi.py (checked by tests/test_native.py); no kernel
 * header is needed to build this file.  The GIL is released only around ioctl(KVM_RUN).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#ifdef TV_HAVE_ZLIB
#include <zlib.h>
#endif

/* which source this build came from (tracevisor/fastloop.py refuses a build of another version of this file) */
#ifndef TV_SOURCE_SHA
#define TV_SOURCE_SHA unknown
#endif
#define TV_STR2(x) #x
#define TV_STR(x) TV_STR2(x)

#define TV_KVM_RUN 0xAE80u       /* _IO(KVMIO, 0x80) */
#define OFF_EXIT_REASON 8
#define OFF_IO 32                /* struct { u8 direction, size; u16 port; u32 count; u64 data_offset; } */
#define OFF_REGS 304             /* kvm_run.s.regs (KVM_CAP_SYNC_REGS): 18 u64, rax ... r15, rip, rflags */
#define OFF_RIP (OFF_REGS + 16 * 8)
#define REGS_SIZE 144
#define IO_DATA_OFFSET 4096
#define EXIT_IO 2
#define RING_ENTRY 24            /* struct kvm_coalesced_mmio */
#define RING_MAX ((4096 - 8) / RING_ENTRY)

enum { MODE_NONE = 0, MODE_ROWS = 1, MODE_CALL = 2, MODE_CHECK = 3 };
enum { RET_EXIT = 0, RET_BATCH = 1, RET_EINTR = 2, RET_ERROR = 3 };

/* ---------------------------------------------------------------------------------------------- */
/* CRC-32 (zlib's: reflected polynomial 0xEDB88320, initial and final xor 0xFFFFFFFF)             */

#ifdef TV_HAVE_ZLIB
static uint32_t tv_crc32(const uint8_t *p, size_t n) { return (uint32_t)crc32(0L, p, (uInt)n); }
#else
static uint32_t crc_table[256];
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}
static uint32_t tv_crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}
#endif

/* ---------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;
    uint8_t *run;           /* the vCPU's kvm_run mapping (owned by Python; outlives this object) */
    Py_ssize_t run_size;
    unsigned cpu;
    int64_t t0;             /* CLOCK_MONOTONIC ns of the trace clock's zero */
    int uart_port;          /* -1: no fast path */
    int mode;
    int row_size;           /* 27, or 31 with the register digest */
    int digest;             /* compute the register digest of each exit */
    Py_ssize_t ring_off;    /* byte offset of the coalesced ring page in the mapping (0: none) */
    PyObject *call;         /* MODE_CALL: trace.exit(cpu, t, reason, rip, port, dir, size, value[, digest]) */
    Py_buffer rows;         /* MODE_ROWS: the trace writer's chunk buffer */
    int have_rows;
    uint8_t *con;           /* console bytes not yet handed to Python */
    Py_ssize_t con_len, con_cap, con_limit;
    int64_t con_t;          /* trace time of the first of them */
} Loop;

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void con_put(Loop *L, const uint8_t *p, Py_ssize_t n, int64_t t) {
    if (L->con_len == 0) L->con_t = t;
    memcpy(L->con + L->con_len, p, (size_t)n);
    L->con_len += n;
}

/* Move the bytes KVM queued in the coalesced ring (UART OUTs that did not exit) to the console buffer.
 * The buffer has room for a whole ring beyond con_limit, and run() never starts KVM_RUN above con_limit. */
static void ring_drain(Loop *L, int64_t t) {
    uint8_t *ring = L->run + L->ring_off;
    uint32_t *first_p = (uint32_t *)ring, *last_p = (uint32_t *)(ring + 4);
    uint32_t first = __atomic_load_n(first_p, __ATOMIC_RELAXED);
    uint32_t last = __atomic_load_n(last_p, __ATOMIC_ACQUIRE);
    if (first == last) return;
    while (first != last && first < RING_MAX) {
        const uint8_t *e = ring + 8 + (size_t)first * RING_ENTRY;
        uint64_t addr;
        uint32_t len, pio;
        memcpy(&addr, e, 8);
        memcpy(&len, e + 8, 4);
        memcpy(&pio, e + 12, 4);
        if (pio && addr == (uint64_t)L->uart_port && len <= 8 && L->con_len + len <= L->con_cap)
            con_put(L, e + 16, len, t);
        first = (first + 1) % RING_MAX;
    }
    __atomic_store_n(first_p, first, __ATOMIC_RELEASE);
}

static int Loop_init(Loop *L, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "run_address", "run_size", "cpu", "t0", "uart_port", "mode", "rows",
                             "call", "row_size", "digest", "ring_offset", "con_limit", NULL};
    unsigned long long addr = 0;
    long long t0 = 0;
    PyObject *rows = Py_None, *call = Py_None;
    int fd, uart_port = -1, mode = MODE_NONE, row_size = 27, digest = 0;
    unsigned cpu = 0;
    Py_ssize_t run_size = 0, ring_off = 0, con_limit = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKnIL|iiOOipnn", kwlist, &fd, &addr, &run_size, &cpu, &t0,
                                     &uart_port, &mode, &rows, &call, &row_size, &digest, &ring_off,
                                     &con_limit))
        return -1;
    if (L->con != NULL || L->have_rows) {
        PyErr_SetString(PyExc_RuntimeError, "Loop is already initialised");
        return -1;
    }
    if (run_size < IO_DATA_OFFSET + 8 || addr == 0) {
        PyErr_SetString(PyExc_ValueError, "the kvm_run mapping must include the I/O data page");
        return -1;
    }
    if (mode < MODE_NONE || mode > MODE_CHECK || (row_size != 27 && row_size != 31) || con_limit < 1 ||
        con_limit > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "bad mode, row_size or con_limit");
        return -1;
    }
    if (ring_off && (ring_off % 4096 || ring_off + 4096 > run_size)) {
        PyErr_SetString(PyExc_ValueError, "the coalesced ring page is outside the kvm_run mapping");
        return -1;
    }
    L->fd = fd;
    L->run = (uint8_t *)(uintptr_t)addr;
    L->run_size = run_size;
    L->cpu = cpu;
    L->t0 = t0;
    L->uart_port = uart_port;
    L->mode = mode;
    L->row_size = row_size;
    L->digest = digest || row_size == 31;
    L->ring_off = ring_off;
    L->con_limit = con_limit;
    L->con_cap = con_limit + RING_MAX * 8 + 8;
    L->con = PyMem_Malloc((size_t)L->con_cap);
    if (L->con == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (mode == MODE_ROWS) {
        if (PyObject_GetBuffer(rows, &L->rows, PyBUF_WRITABLE) < 0) return -1;
        L->have_rows = 1;
    } else if (mode == MODE_CALL) {
        if (!PyCallable_Check(call)) {
            PyErr_SetString(PyExc_TypeError, "mode CALL needs a callable");
            return -1;
        }
        Py_INCREF(call);
        L->call = call;
    }
    return 0;
}

static void Loop_dealloc(Loop *L) {
    if (L->have_rows) PyBuffer_Release(&L->rows);
    Py_XDECREF(L->call);
    PyMem_Free(L->con);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

/* Is the PyLong o equal to v?  (Anything else, or an overflow, is "not equal": Python then decides.) */
static inline int eq(PyObject *o, unsigned long long v) {
    if (!PyLong_CheckExact(o)) return 0;
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return x == v;
}

static PyObject *result(Loop *L, int status, Py_ssize_t handled, Py_ssize_t off, Py_ssize_t i, PyObject *exit) {
    PyObject *con;
    if (L->con_len) {
        con = PyBytes_FromStringAndSize((const char *)L->con, L->con_len);
        if (con == NULL) {
            Py_XDECREF(exit);
            return NULL;
        }
    } else {
        con = Py_NewRef(Py_None);
    }
    long long con_t = L->con_t;
    L->con_len = 0;
    if (exit == NULL) exit = Py_NewRef(Py_None);
    return Py_BuildValue("(innnNLN)", status, handled, off, i, con, con_t, exit);
}

/*
 * run(budget=0, fast=True, off=0, lim=0, items=None, i=0, climit=0) -> (status, handled, off, i, console, console_t, exit)
 *
 * Runs the vCPU until an exit Python must see.  status: 0 an exit (``exit`` is the tuple
 * (reason, direction, size, port, count, data_offset, rip, data, digest)); 1 a batch ended (a console line or
 * buffer is complete, the writer's chunk is full, or ``budget`` exits were handled); 2 KVM_RUN returned
 * EINTR/EAGAIN (``exit`` is the errno); 3 KVM_RUN failed (``exit`` is the errno).  ``handled`` counts the UART
 * exits handled here, ``off`` is the writer's next row offset (MODE_ROWS), ``i`` the index of the next
 * recorded item (MODE_CHECK).  ``console`` holds the UART bytes handled here or drained from the coalesced
 * ring, oldest first, or None; ``console_t`` the trace time of the first.  With ``fast`` false, every exit
 * is returned.
 */
static PyObject *Loop_run(Loop *L, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"budget", "fast", "off", "lim", "items", "i", "climit", NULL};
    Py_ssize_t budget = 0, off = 0, lim = 0, i = 0, climit = 0;
    int fast = 1;
    PyObject *items = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|npnnOnn", kwlist, &budget, &fast, &off, &lim, &items, &i,
                                     &climit))
        return NULL;
    if (L->con == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Loop is not initialised");
        return NULL;
    }
    uint8_t *run = L->run;
    int uart = fast ? L->uart_port : -1;
    const int mode = L->mode, rs = L->row_size;
    uint8_t *rowbuf = NULL;
    if (uart >= 0 && mode == MODE_ROWS) {
        rowbuf = (uint8_t *)L->rows.buf;
        if (off < 0 || lim < 0 || lim > L->rows.len - rs || off > lim) {
            PyErr_SetString(PyExc_ValueError, "row window outside the writer's buffer");
            return NULL;
        }
    }
    if (uart >= 0 && mode == MODE_CHECK && !PyList_CheckExact(items)) {
        PyErr_SetString(PyExc_TypeError, "replay needs the list of recorded items");
        return NULL;
    }
    /* climit: return once this many console bytes are gathered (at most con_limit; 0 means con_limit) */
    if (climit <= 0 || climit > L->con_limit) climit = L->con_limit;
    Py_ssize_t handled = 0;
    for (;;) {
        if (budget > 0 && handled >= budget) return result(L, RET_BATCH, handled, off, i, NULL);
        int r, err = 0;
        Py_BEGIN_ALLOW_THREADS
        r = ioctl(L->fd, TV_KVM_RUN, 0);
        if (r < 0) err = errno;
        Py_END_ALLOW_THREADS
        /* The trace clock is read only when something is stamped with it (a clock read is not free here). */
        const int stamp_rows = mode == MODE_ROWS || mode == MODE_CALL;
        int64_t t = (stamp_rows || L->ring_off || L->con_len == 0) ? now_ns() - L->t0 : 0;
        if (L->ring_off) ring_drain(L, t);
        if (r < 0)
            return result(L, (err == EINTR || err == EAGAIN) ? RET_EINTR : RET_ERROR, handled, off, i,
                          PyLong_FromLong(err));
        uint32_t reason;
        memcpy(&reason, run + OFF_EXIT_REASON, 4);
        uint8_t dir = run[OFF_IO], size = run[OFF_IO + 1];
        uint16_t port;
        uint32_t count;
        uint64_t doff, rip;
        memcpy(&port, run + OFF_IO + 2, 2);
        memcpy(&count, run + OFF_IO + 4, 4);
        memcpy(&doff, run + OFF_IO + 8, 8);
        memcpy(&rip, run + OFF_RIP, 8);
        uint32_t digest = L->digest ? tv_crc32(run + OFF_REGS, REGS_SIZE) : 0;
        if (reason == EXIT_IO && dir == 1 && size == 1 && count == 1 && doff == IO_DATA_OFFSET &&
            (int)port == uart) {
            uint8_t value = run[IO_DATA_OFFSET];
            if (L->ring_off) {
                /* The ring was full: this byte follows the ring's in the console stream (no exit row). */
                con_put(L, &value, 1, t);
                handled++;
                if (L->con_len >= climit) return result(L, RET_BATCH, handled, off, i, NULL);
                continue;
            }
            if (mode == MODE_ROWS) {
                uint8_t *p = rowbuf + off;
                uint64_t tt = (uint64_t)t;
                uint32_t v32 = value;
                uint16_t vcpu = (uint16_t)L->cpu;
                memcpy(p, &tt, 8);
                memcpy(p + 8, &rip, 8);
                memcpy(p + 16, &v32, 4);
                memcpy(p + 20, &port, 2);
                memcpy(p + 22, &vcpu, 2);
                p[24] = EXIT_IO;
                p[25] = 1;
                p[26] = 1;
                if (rs == 31) memcpy(p + 27, &digest, 4);
                off += rs;
            } else if (mode == MODE_CHECK) {
                /* The recorded item must be this exit: (rip, value, port, vcpu, reason, dir, size[, digest]). */
                PyObject *it = i < PyList_GET_SIZE(items) ? PyList_GET_ITEM(items, i) : NULL;
                Py_ssize_t n = it != NULL && PyTuple_CheckExact(it) ? PyTuple_GET_SIZE(it) : 0;
                if (!((n == 7 || (n == 8 && L->digest)) && eq(PyTuple_GET_ITEM(it, 0), rip) &&
                      eq(PyTuple_GET_ITEM(it, 1), value) && eq(PyTuple_GET_ITEM(it, 2), port) &&
                      eq(PyTuple_GET_ITEM(it, 3), L->cpu) && eq(PyTuple_GET_ITEM(it, 4), EXIT_IO) &&
                      eq(PyTuple_GET_ITEM(it, 5), 1) && eq(PyTuple_GET_ITEM(it, 6), 1) &&
                      (n == 7 || eq(PyTuple_GET_ITEM(it, 7), digest)))) {
                    /* Not the recorded exit (or the chunk's items ran out): Python compares and reports. */
                    goto to_python;
                }
                i++;
            } else if (mode == MODE_CALL) {
                PyObject *a[9];
                int na = L->digest ? 9 : 8;
                a[0] = PyLong_FromUnsignedLong(L->cpu);
                a[1] = PyLong_FromLongLong(t);
                a[2] = PyLong_FromLong(EXIT_IO);
                a[3] = PyLong_FromUnsignedLongLong(rip);
                a[4] = PyLong_FromLong(port);
                a[5] = PyLong_FromLong(1);
                a[6] = PyLong_FromLong(1);
                a[7] = PyLong_FromLong(value);
                a[8] = L->digest ? PyLong_FromUnsignedLong(digest) : NULL;
                PyObject *ret = NULL;
                int ok = 1;
                for (int k = 0; k < na; k++) ok &= a[k] != NULL;
                if (ok) ret = PyObject_Vectorcall(L->call, a, (size_t)na, NULL);
                for (int k = 0; k < na; k++) Py_XDECREF(a[k]);
                if (ret == NULL) return NULL;
                Py_DECREF(ret);
            }
            con_put(L, &value, 1, t);
            handled++;
            if (value == '\n' || L->con_len >= climit || (mode == MODE_ROWS && off >= lim))
                return result(L, RET_BATCH, handled, off, i, NULL);
            continue;
        }
    to_python:;
        uint32_t data;
        memcpy(&data, run + IO_DATA_OFFSET, 4);
        PyObject *ex = Py_BuildValue("(IIIIIKKII)", reason, (unsigned)dir, (unsigned)size, (unsigned)port, count,
                                     (unsigned long long)doff, (unsigned long long)rip, data, digest);
        if (ex == NULL) return NULL;
        return result(L, RET_EXIT, handled, off, i, ex);
    }
}

static PyMethodDef Loop_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Loop_run, METH_VARARGS | METH_KEYWORDS,
     "Run the vCPU until an exit Python must handle (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tracevisor._fastloop.Loop",
    .tp_basicsize = sizeof(Loop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The KVM_RUN loop of one vCPU, with UART OUT exits handled in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Loop_init,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = Loop_methods,
};

/*
 * BlockCounter: the instruction fallback's burst budget and instruction count, as a Unicorn block hook in C.
 *
 * Why: Unicorn's own instruction budget (uc_emu_start's count) calls a helper before every instruction, which
 * doubles the cost of emulated code; a Python block hook costs a callback per block.  This hook runs once per
 * translation block entered: it stops the burst before the block that would exceed the budget (in blocks, so
 * where a burst ends depends only on the code, as translation blocks do), and adds the block's instruction
 * count from a table keyed by (address, size).  Blocks not in the table yet are counted by visits; Python
 * disassembles them after the burst (result/learn) and the table knows them from then on.
 *
 * A second hook, installed only when something tracks written memory (memory hashes, checkpoints, the exact
 * schedule's digests), collects the pages the burst stores to (Unicorn's store hooks get guest-physical
 * addresses): Unicorn writes guest RAM through the host mapping, which KVM's dirty log does not see.
 *
 * The hooks run inside uc_emu_start, called through ctypes with the GIL released: they touch only this
 * object's C fields and the C heap.
 */
typedef struct {
    uint64_t addr;
    uint32_t size;
    uint32_t n;      /* instructions in the block; BC_UNKNOWN until learnt */
    uint64_t visits; /* entries while unknown (this burst) */
} BcEntry;

#define BC_UNKNOWN 0xFFFFFFFFu
#define BC_CROSS_MAX 64
#define BC_EMPTY UINT64_MAX

typedef struct {
    PyObject_HEAD
    uint64_t blocks, limit, insns;
    int64_t last; /* table index of the block entered last, -1 none */
    int budget_hit;
    int failed; /* out of memory inside the hook: the burst stopped, the result says so */
    int (*stop)(void *);
    BcEntry *table;
    uint32_t mask, used;
    uint32_t *pending;
    uint32_t npending, cap;
    /* the virtual pages the burst wrote (write hook; a set, open addressing, emptied by start) */
    uint64_t *wpages;
    uint32_t wmask, wused;
    uint64_t wlast;
    uint64_t cross[BC_CROSS_MAX]; /* physical addresses of stores that cross a page boundary */
    uint32_t ncross;
    int cross_overflow;
} BlockCounter;

static uint32_t bc_hash(uint64_t addr, uint32_t size) {
    uint64_t h = (addr ^ ((uint64_t)size << 48)) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32);
}

static int bc_alloc(BlockCounter *c, uint32_t slots) {
    BcEntry *t = malloc(sizeof(BcEntry) * slots);
    if (t == NULL) return -1;
    for (uint32_t i = 0; i < slots; i++) t[i].addr = BC_EMPTY;
    BcEntry *old = c->table;
    uint32_t old_slots = old ? c->mask + 1 : 0;
    c->table = t;
    c->mask = slots - 1;
    c->used = 0;
    c->npending = 0; /* indices change: pending blocks are re-found by their unknown count below */
    for (uint32_t i = 0; i < old_slots; i++) {
        if (old[i].addr == BC_EMPTY) continue;
        uint32_t j = bc_hash(old[i].addr, old[i].size) & c->mask;
        while (t[j].addr != BC_EMPTY) j = (j + 1) & c->mask;
        t[j] = old[i];
        c->used++;
        if (t[j].n == BC_UNKNOWN && t[j].visits) {
            if (c->npending == c->cap) {
                uint32_t cap = c->cap ? c->cap * 2 : 256;
                uint32_t *p = realloc(c->pending, sizeof(uint32_t) * cap);
                if (p == NULL) { free(old); return -1; }
                c->pending = p;
                c->cap = cap;
            }
            c->pending[c->npending++] = j;
        }
    }
    free(old);
    return 0;
}

static void bc_hook(void *uc, uint64_t addr, uint32_t size, void *user) {
    BlockCounter *c = (BlockCounter *)user;
    if (c->blocks >= c->limit) {
        c->budget_hit = 1;
        c->stop(uc); /* before the block runs: it starts the next burst */
        return;
    }
    if ((c->used + 1) * 2 > c->mask + 1 && bc_alloc(c, (c->mask + 1) * 2) < 0) {
        c->failed = 1;
        c->stop(uc);
        return;
    }
    uint32_t j = bc_hash(addr, size) & c->mask;
    BcEntry *e;
    for (;;) {
        e = &c->table[j];
        if (e->addr == addr && e->size == size) break;
        if (e->addr == BC_EMPTY) {
            e->addr = addr;
            e->size = size;
            e->n = BC_UNKNOWN;
            e->visits = 0;
            c->used++;
            break;
        }
        j = (j + 1) & c->mask;
    }
    c->blocks++;
    c->last = j;
    if (e->n != BC_UNKNOWN) {
        c->insns += e->n;
        return;
    }
    if (e->visits++ == 0) {
        if (c->npending == c->cap) {
            uint32_t cap = c->cap ? c->cap * 2 : 256;
            uint32_t *p = realloc(c->pending, sizeof(uint32_t) * cap);
            if (p == NULL) {
                c->failed = 1;
                c->stop(uc);
                return;
            }
            c->pending = p;
            c->cap = cap;
        }
        c->pending[c->npending++] = j;
    }
}

static int bc_wadd(BlockCounter *c, uint64_t page) {
    if ((c->wused + 1) * 2 > c->wmask + 1) {
        uint32_t slots = c->wmask ? (c->wmask + 1) * 2 : 256;
        uint64_t *t = malloc(sizeof(uint64_t) * slots);
        if (t == NULL) return -1;
        for (uint32_t i = 0; i < slots; i++) t[i] = BC_EMPTY;
        for (uint32_t i = 0; c->wpages && i <= c->wmask; i++) {
            if (c->wpages[i] == BC_EMPTY) continue;
            uint32_t j = bc_hash(c->wpages[i], 0) & (slots - 1);
            while (t[j] != BC_EMPTY) j = (j + 1) & (slots - 1);
            t[j] = c->wpages[i];
        }
        free(c->wpages);
        c->wpages = t;
        c->wmask = slots - 1;
    }
    uint32_t j = bc_hash(page, 0) & c->wmask;
    while (c->wpages[j] != BC_EMPTY) {
        if (c->wpages[j] == page) return 0;
        j = (j + 1) & c->wmask;
    }
    c->wpages[j] = page;
    c->wused++;
    return 0;
}

/* UC_HOOK_MEM_WRITE: the page(s) of every store of the burst (guest-physical addresses) */
static void bc_write_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *user) {
    BlockCounter *c = (BlockCounter *)user;
    (void)type;
    (void)value;
    uint64_t first = addr >> 12, last = (addr + (uint64_t)(size > 0 ? size - 1 : 0)) >> 12;
    if (last != first) {
        /* the hook sees the physical address of the first byte only: which page the rest went to depends on
           the page tables (Python resolves it) */
        if (c->ncross < BC_CROSS_MAX)
            c->cross[c->ncross++] = addr;
        else
            c->cross_overflow = 1;
    }
    for (uint64_t p = first; p <= last; p++) {
        if (p == c->wlast) continue;
        if (bc_wadd(c, p) < 0) {
            c->failed = 1;
            c->stop(uc);
            return;
        }
        c->wlast = p;
    }
}

static int BlockCounter_init(BlockCounter *c, PyObject *args, PyObject *kw) {
    static char *names[] = {"stop", NULL};
    unsigned long long stop;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K", names, &stop)) return -1;
    if (stop == 0) {
        PyErr_SetString(PyExc_ValueError, "stop: the address of uc_emu_stop");
        return -1;
    }
    c->stop = (int (*)(void *))(uintptr_t)stop;
    c->last = -1;
    c->wlast = BC_EMPTY;
    if (c->table == NULL && bc_alloc(c, 1u << 14) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void BlockCounter_dealloc(BlockCounter *c) {
    free(c->table);
    free(c->pending);
    free(c->wpages);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *BlockCounter_start(BlockCounter *c, PyObject *arg) {
    unsigned long long limit = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    for (uint32_t k = 0; k < c->npending; k++) c->table[c->pending[k]].visits = 0;
    c->npending = 0;
    c->blocks = 0;
    c->insns = 0;
    c->limit = limit;
    c->last = -1;
    c->budget_hit = 0;
    c->failed = 0;
    if (c->wused) {
        for (uint32_t i = 0; i <= c->wmask; i++) c->wpages[i] = BC_EMPTY;
        c->wused = 0;
    }
    c->wlast = BC_EMPTY;
    c->ncross = 0;
    c->cross_overflow = 0;
    Py_RETURN_NONE;
}

static PyObject *BlockCounter_written(BlockCounter *c, PyObject *Py_UNUSED(ignored)) {
    PyObject *cross = PyList_New(0);
    if (cross == NULL) return NULL;
    for (uint32_t i = 0; i < c->ncross; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(c->cross[i]);
        if (v == NULL || PyList_Append(cross, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(cross);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        Py_DECREF(cross);
        return NULL;
    }
    for (uint32_t i = 0; c->wused && i <= c->wmask; i++) {
        if (c->wpages[i] == BC_EMPTY) continue;
        PyObject *v = PyLong_FromUnsignedLongLong(c->wpages[i]);
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            Py_DECREF(cross);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("NNO", out, cross, c->cross_overflow ? Py_True : Py_False);
}

static PyObject *BlockCounter_result(BlockCounter *c, PyObject *Py_UNUSED(ignored)) {
    PyObject *pending = PyList_New(c->npending);
    if (pending == NULL) return NULL;
    for (uint32_t k = 0; k < c->npending; k++) {
        BcEntry *e = &c->table[c->pending[k]];
        PyObject *t = Py_BuildValue("KIK", (unsigned long long)e->addr, (unsigned)e->size,
                                    (unsigned long long)e->visits);
        if (t == NULL) {
            Py_DECREF(pending);
            return NULL;
        }
        PyList_SET_ITEM(pending, k, t);
    }
    PyObject *last;
    if (c->last >= 0) {
        BcEntry *e = &c->table[c->last];
        last = Py_BuildValue("KIl", (unsigned long long)e->addr, (unsigned)e->size,
                             e->n == BC_UNKNOWN ? -1L : (long)e->n);
    } else {
        last = Py_NewRef(Py_None);
    }
    if (last == NULL) {
        Py_DECREF(pending);
        return NULL;
    }
    return Py_BuildValue("KKiiNN", (unsigned long long)c->blocks, (unsigned long long)c->insns, c->budget_hit,
                         c->failed, last, pending);
}

static PyObject *BlockCounter_learn(BlockCounter *c, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "learn: a sequence of instruction counts, one per pending block");
    if (seq == NULL) return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != (Py_ssize_t)c->npending) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "learn: one count per pending block");
        return NULL;
    }
    for (uint32_t k = 0; k < c->npending; k++) {
        unsigned long n = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, k));
        if (PyErr_Occurred() || n >= BC_UNKNOWN) {
            Py_DECREF(seq);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "learn: count out of range");
            return NULL;
        }
        BcEntry *e = &c->table[c->pending[k]];
        e->n = (uint32_t)n;
        e->visits = 0;
    }
    c->npending = 0;
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *BlockCounter_get_hook(BlockCounter *Py_UNUSED(c), void *Py_UNUSED(closure)) {
    return PyLong_FromVoidPtr((void *)(uintptr_t)bc_hook);
}

static PyObject *BlockCounter_get_write_hook(BlockCounter *Py_UNUSED(c), void *Py_UNUSED(closure)) {
    return PyLong_FromVoidPtr((void *)(uintptr_t)bc_write_hook);
}

static PyObject *BlockCounter_get_address(BlockCounter *c, void *Py_UNUSED(closure)) {
    return PyLong_FromVoidPtr((void *)c);
}

static PyMethodDef BlockCounter_methods[] = {
    {"start", (PyCFunction)BlockCounter_start, METH_O, "start(limit): a new burst of at most limit blocks."},
    {"result", (PyCFunction)BlockCounter_result, METH_NOARGS,
     "(blocks, instructions in known blocks, budget hit, failed, (addr, size, n or -1) of the last block or None, "
     "[(addr, size, visits)] of the blocks not known yet)."},
    {"learn", (PyCFunction)BlockCounter_learn, METH_O,
     "learn(counts): the instruction counts of the pending blocks, in result()'s order."},
    {"written", (PyCFunction)BlockCounter_written, METH_NOARGS,
     "(guest-physical page numbers the burst wrote, in no particular order; physical addresses of its stores that "
     "crossed a page boundary; True if there were more of those than it kept) — with write_hook installed."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef BlockCounter_getset[] = {
    {"hook", (getter)BlockCounter_get_hook, NULL, "address of the C block hook (uc_cb_hookcode_t)", NULL},
    {"write_hook", (getter)BlockCounter_get_write_hook, NULL,
     "address of the C store hook (uc_cb_hookmem_t) that collects the pages a burst writes", NULL},
    {"address", (getter)BlockCounter_get_address, NULL, "the hook's user_data: this object", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BlockCounterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tracevisor._fastloop.BlockCounter",
    .tp_basicsize = sizeof(BlockCounter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The instruction fallback's burst budget (in translation blocks) and instruction count.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)BlockCounter_init,
    .tp_dealloc = (destructor)BlockCounter_dealloc,
    .tp_methods = BlockCounter_methods,
    .tp_getset = BlockCounter_getset,
};

static PyObject *mod_crc32(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t c = tv_crc32((const uint8_t *)b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(c);
}

static PyMethodDef mod_methods[] = {
    {"crc32", mod_crc32, METH_O, "CRC-32 of a buffer, as the digest of each exit is computed (= zlib.crc32)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_fastloop", "The native vCPU run loop of tracevisor.", -1, mod_methods,
};

PyMODINIT_FUNC PyInit__fastloop(void) {
#ifndef TV_HAVE_ZLIB
    crc_init();
#endif
    if (PyType_Ready(&LoopType) < 0 || PyType_Ready(&BlockCounterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    Py_INCREF(&LoopType);
    if (PyModule_AddObject(m, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(&LoopType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BlockCounterType);
    if (PyModule_AddObject(m, "BlockCounter", (PyObject *)&BlockCounterType) < 0) {
        Py_DECREF(&BlockCounterType);
        Py_DECREF(m);
        return NULL;
    }
    int bad = PyModule_AddIntConstant(m, "OFF_EXIT_REASON", OFF_EXIT_REASON) ||
              PyModule_AddIntConstant(m, "OFF_IO", OFF_IO) || PyModule_AddIntConstant(m, "OFF_REGS", OFF_REGS) ||
              PyModule_AddIntConstant(m, "OFF_RIP", OFF_RIP) ||
              PyModule_AddIntConstant(m, "IO_DATA_OFFSET", IO_DATA_OFFSET) ||
              PyModule_AddIntConstant(m, "KVM_RUN", TV_KVM_RUN) || PyModule_AddIntConstant(m, "RING_MAX", RING_MAX) ||
              PyModule_AddIntConstant(m, "MODE_NONE", MODE_NONE) || PyModule_AddIntConstant(m, "MODE_ROWS", MODE_ROWS) ||
              PyModule_AddIntConstant(m, "MODE_CALL", MODE_CALL) ||
              PyModule_AddIntConstant(m, "MODE_CHECK", MODE_CHECK) ||
#ifdef TV_HAVE_ZLIB
              PyModule_AddIntConstant(m, "ZLIB", 1) ||
#else
              PyModule_AddIntConstant(m, "ZLIB", 0) ||
#endif
              PyModule_AddIntConstant(m, "ABI", 2) ||
              PyModule_AddStringConstant(m, "SOURCE_SHA", TV_STR(TV_SOURCE_SHA));
    if (bad) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
