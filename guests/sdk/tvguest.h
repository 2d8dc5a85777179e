/*
 * tvguest.h - the tracevisor guest SDK (freestanding C, x86-64).
 *
 * A guest program includes this header, defines
 *
 *     int main(int argc, char **argv, char **envp);
 *
 * and optionally
 *
 *     void ap_main(unsigned cpu);      (runs on every vCPU except 0)
 *
 * and is linked with start.S, note.S, hypercall.c, runtime.c, printf.c,
 * string.c and bootinfo.c using guest.ld (tracevisor.guestbuild does this).
 *
 * ABI: uhyve 0.2.1, Hermit entry version 2.  Every hypercall is an
 * `outl %eax, %dx` whose data is the guest-physical address of a packed
 * argument block.  The first GiB is identity mapped, so the address of any
 * static or stack object is its physical address.
 *
 * Everything here is integer-only: guests are built with
 * -mgeneral-regs-only because x87/SSE instructions cannot run on every
 * host (see guests/README.md).
 */
#ifndef TVGUEST_H
#define TVGUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Hypercall ports (uhyve 0.2.1)                                            */
/* ------------------------------------------------------------------------ */

#define TV_PORT_WRITE    0x400
#define TV_PORT_OPEN     0x440
#define TV_PORT_CLOSE    0x480
#define TV_PORT_READ     0x500
#define TV_PORT_EXIT     0x540
#define TV_PORT_LSEEK    0x580
#define TV_PORT_NETWRITE 0x640
#define TV_PORT_NETREAD  0x680
#define TV_PORT_NETSTAT  0x700
#define TV_PORT_CMDSIZE  0x740
#define TV_PORT_CMDVAL   0x780
#define TV_PORT_UART     0x800
#define TV_PORT_UNLINK   0x840

/* open(2) flags and lseek(2) whence values, as the host (Linux) spells them. */
#define O_RDONLY   0
#define O_WRONLY   1
#define O_RDWR     2
#define O_CREAT    0100
#define O_EXCL     0200
#define O_TRUNC    01000
#define O_APPEND   02000

#define SEEK_SET 0
#define SEEK_CUR 1
#define SEEK_END 2

/* Limits of the CMDSIZE/CMDVAL protocol. */
#define TV_MAX_ARGS 128
#define TV_MAX_ENVS 128

/* ------------------------------------------------------------------------ */
/* Argument blocks: packed, little-endian, exactly as the host reads them.  */
/* ------------------------------------------------------------------------ */

#define TV_PACKED __attribute__((packed))

struct TV_PACKED tv_sys_write  { int32_t fd; uint64_t buf; uint64_t len; };
struct TV_PACKED tv_sys_open   { uint64_t name; int32_t flags; int32_t mode; int32_t ret; };
struct TV_PACKED tv_sys_close  { int32_t fd; int32_t ret; };
struct TV_PACKED tv_sys_read   { int32_t fd; uint64_t buf; uint64_t len; int64_t ret; };
struct TV_PACKED tv_sys_exit   { int32_t arg; };
struct TV_PACKED tv_sys_lseek  { int32_t fd; int64_t offset; int32_t whence; };
struct TV_PACKED tv_sys_unlink { uint64_t name; int32_t ret; };
/* All members are 4-byte integers at 4-byte offsets: no packing needed. */
struct tv_sys_cmdsize {
    int32_t argc;
    int32_t argsz[TV_MAX_ARGS];
    int32_t envc;
    int32_t envsz[TV_MAX_ENVS];
};
struct TV_PACKED tv_sys_cmdval { uint64_t argv; uint64_t envp; };

_Static_assert(sizeof(struct tv_sys_write) == 20, "SysWrite is 20 bytes");
_Static_assert(offsetof(struct tv_sys_write, buf) == 4, "SysWrite.buf @4");
_Static_assert(offsetof(struct tv_sys_write, len) == 12, "SysWrite.len @12");
_Static_assert(sizeof(struct tv_sys_open) == 20, "SysOpen is 20 bytes");
_Static_assert(offsetof(struct tv_sys_open, flags) == 8, "SysOpen.flags @8");
_Static_assert(offsetof(struct tv_sys_open, mode) == 12, "SysOpen.mode @12");
_Static_assert(offsetof(struct tv_sys_open, ret) == 16, "SysOpen.ret @16");
_Static_assert(sizeof(struct tv_sys_close) == 8, "SysClose is 8 bytes");
_Static_assert(sizeof(struct tv_sys_read) == 28, "SysRead is 28 bytes");
_Static_assert(offsetof(struct tv_sys_read, ret) == 20, "SysRead.ret @20");
_Static_assert(sizeof(struct tv_sys_exit) == 4, "SysExit is 4 bytes");
_Static_assert(sizeof(struct tv_sys_lseek) == 16, "SysLseek is 16 bytes");
_Static_assert(offsetof(struct tv_sys_lseek, offset) == 4, "SysLseek.offset @4");
_Static_assert(offsetof(struct tv_sys_lseek, whence) == 12, "SysLseek.whence @12");
_Static_assert(sizeof(struct tv_sys_unlink) == 12, "SysUnlink is 12 bytes");
_Static_assert(sizeof(struct tv_sys_cmdsize) == 1032, "SysCmdsize is 1032 bytes");
_Static_assert(offsetof(struct tv_sys_cmdsize, envc) == 516, "SysCmdsize.envc @516");
_Static_assert(offsetof(struct tv_sys_cmdsize, envsz) == 520, "SysCmdsize.envsz @520");
_Static_assert(sizeof(struct tv_sys_cmdval) == 16, "SysCmdval is 16 bytes");

/* ------------------------------------------------------------------------ */
/* Raw port I/O                                                             */
/* ------------------------------------------------------------------------ */

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}
static inline void outw(uint16_t port, uint16_t v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory");
}
static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

/*
 * Issue one hypercall: `outl` of the block's (identity-mapped) physical
 * address.  The "memory" clobber makes the compiler store the block before
 * the OUT and reload it afterwards.  Blocks must lie below 4 GiB.
 */
static inline void tv_hypercall(uint16_t port, volatile void *block)
{
    outl(port, (uint32_t)(uintptr_t)block);
}

/* ------------------------------------------------------------------------ */
/* Hypercall wrappers (hypercall.c).  Results are the host's raw values:    */
/* an fd or -1, a byte count or -1, 0 or -1, a new offset or -1.            */
/* ------------------------------------------------------------------------ */

/* WRITE has no result field; returns len (what the Hermit kernel reports). */
int64_t hc_write(int fd, const void *buf, uint64_t len);
int     hc_open(const char *path, int flags, int mode);
int     hc_close(int fd);
int64_t hc_read(int fd, void *buf, uint64_t len);
int64_t hc_lseek(int fd, int64_t offset, int whence);
int     hc_unlink(const char *path);
__attribute__((noreturn)) void hc_exit(int code);
/* Fills *sizes (zeroed first, so an unanswered call reads as argc = envc = 0). */
void    hc_cmdsize(struct tv_sys_cmdsize *sizes);
/* argv/envp: arrays of pointers to buffers of the sizes CMDSIZE announced. */
void    hc_cmdval(char **argv, char **envp);
/* One byte to the host console (port 0x800). */
void    uart_putc(char c);
void    uart_puts(const char *s);

/* ------------------------------------------------------------------------ */
/* Runtime (runtime.c)                                                      */
/* ------------------------------------------------------------------------ */

/* Flush stdout and end the VM with `code` (EXIT hypercall).  Never returns. */
__attribute__((noreturn)) void exit(int code);
/* Stop this vCPU for good: `cli; hlt` forever.  Does not end the VM. */
__attribute__((noreturn)) void tv_park(void);

/* ------------------------------------------------------------------------ */
/* Boot information (bootinfo.c), entry version 2 layout                    */
/* ------------------------------------------------------------------------ */

#define TV_BOOTINFO_ADDR 0x9000UL

const volatile uint8_t *tv_bootinfo(void);   /* as passed in RDI */
uint64_t tv_ram_size(void);                  /* phys_addr_end, bytes */
uint64_t tv_num_cpus(void);                  /* >= 1 */
uint32_t tv_cpu_freq_khz(void);              /* 0 = unknown */
/* boot_time in ns since the Unix epoch (the i128 field, saturated to i64). */
int64_t  tv_boot_time_ns(void);
uint64_t tv_image_start(void);               /* kernel_image_addr_start */
uint64_t tv_image_end(void);                 /* kernel_image_addr_end */
uint16_t tv_serial_port(void);               /* 0 = none */

/* ------------------------------------------------------------------------ */
/* stdio (printf.c)                                                         */
/* ------------------------------------------------------------------------ */
/*
 * Conversions: %d %i %u %x %X %p %s %c %%, flags '-' and '0', a width
 * (number or '*'), a precision (for %s: max chars; for integers: min
 * digits), length modifiers hh h l ll z j t.  stdout is line buffered
 * (flushed at '\n', when full and at exit) and written with WRITE on fd 1;
 * eprintf writes to fd 2 unbuffered (one WRITE per 256 bytes).
 */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int eprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int veprintf(const char *fmt, va_list ap);
int dprintf(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int puts(const char *s);       /* s and '\n' to stdout */
int putchar(int c);
void fflush_stdout(void);

/* ------------------------------------------------------------------------ */
/* Strings (string.c)                                                       */
/* ------------------------------------------------------------------------ */

void  *memcpy(void *dst, const void *src, size_t n);
void  *memmove(void *dst, const void *src, size_t n);
void  *memset(void *dst, int c, size_t n);
int    memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int    strcmp(const char *a, const char *b);
int    strncmp(const char *a, const char *b, size_t n);
char  *strchr(const char *s, int c);
long   strtol(const char *s, char **end, int base);
unsigned long strtoul(const char *s, char **end, int base);
int    atoi(const char *s);
long   atol(const char *s);

/* ------------------------------------------------------------------------ */
/* SMP helpers                                                              */
/* ------------------------------------------------------------------------ */
/*
 * Stores use release order and loads acquire order: both are plain MOVs on
 * x86-64.  Read-modify-write operations are LOCK-prefixed instructions.
 * tv_mb() is a full barrier built from a LOCKed no-op (no MFENCE).
 */
static inline void tv_pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void tv_mb(void) { __asm__ volatile("lock orq $0, (%%rsp)" ::: "memory", "cc"); }

static inline uint32_t tv_load32(const volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t tv_load64(const volatile uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void tv_store32(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void tv_store64(volatile uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t tv_fetch_add32(volatile uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
static inline uint64_t tv_fetch_add64(volatile uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
static inline bool tv_cas32(volatile uint32_t *p, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

typedef struct { volatile uint32_t locked; } tv_spinlock_t;
#define TV_SPINLOCK_INIT { 0 }

static inline void tv_spin_lock(tv_spinlock_t *l)
{
    while (__atomic_exchange_n(&l->locked, 1u, __ATOMIC_ACQUIRE) != 0)
        while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED) != 0)
            tv_pause();
}
static inline void tv_spin_unlock(tv_spinlock_t *l) { __atomic_store_n(&l->locked, 0u, __ATOMIC_RELEASE); }

static inline uint64_t tv_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Hooks implemented by the program; ap_main is optional. */
int main(int argc, char **argv, char **envp);
void ap_main(unsigned cpu);

#ifdef __cplusplus
}
#endif
#endif /* TVGUEST_H */
