/*
 * hostile: a guest that attacks its hypervisor, one attack per mode.
 *
 *     hostile MODE [ARG]
 *
 * Every mode prints a line naming what it is about to do (stdout is flushed
 * at each '\n', so the line reaches the host before the attack).  Modes that
 * the host must refuse with -1 print one "<request> = <result>" line per
 * request and exit 0 when every refusal happened, 1 otherwise.  Modes whose
 * attack must stop the VM (a bad pointer, a fault, a spin) never return;
 * they exit 42 if the host lets them continue.
 *
 * The first GiB is identity mapped with 2 MiB pages and RAM is smaller, so a
 * virtual address in [RAM size, 1 GiB) translates to a physical address
 * outside RAM, and every address >= 1 GiB is unmapped.  The list of modes
 * with what the host must do is in guests/hostile/README.md.
 */
#include "tvguest.h"

#define SURVIVED 42
#define GiB (1ULL << 30)

typedef int (*mode_fn)(int argc, char **argv);

static char msg[] = "hostile: this text must never reach the host\n";
static volatile struct tv_sys_write wblk;
static volatile struct tv_sys_read rblk;
static volatile struct tv_sys_open oblk;
static volatile struct tv_sys_unlink ublk;
static volatile struct tv_sys_cmdval vblk;
static uint64_t ptr_array[TV_MAX_ARGS + 1];
static char small_buf[256] __attribute__((aligned(4096)));
static int failures;

static uint64_t ram(void) { return tv_ram_size(); }

/* Announce the attack (flushed at '\n', before the OUT). */
#define SAY(...) printf(__VA_ARGS__)

static int survived(const char *what)
{
    printf("hostile: the host let %s through\n", what);
    return SURVIVED;
}

static void expect(const char *what, int64_t got, int64_t want)
{
    printf("%s = %ld%s\n", what, (long)got, got == want ? "" : "  UNEXPECTED");
    if (got != want)
        failures++;
}

static void expect_fail(const char *what, int64_t got)
{
    expect(what, got, -1);
}

static int verdict(const char *mode)
{
    printf("%s: %s\n", mode, failures ? "FAILED" : "OK");
    return failures ? 1 : 0;
}

static void raw_write(int fd, uint64_t buf, uint64_t len)
{
    wblk.fd = fd;
    wblk.buf = buf;
    wblk.len = len;
    tv_hypercall(TV_PORT_WRITE, &wblk);
}

static int64_t raw_read(int fd, uint64_t buf, uint64_t len)
{
    rblk.fd = fd;
    rblk.buf = buf;
    rblk.len = len;
    rblk.ret = -1;
    tv_hypercall(TV_PORT_READ, &rblk);
    return rblk.ret;
}

static int raw_open(uint64_t name, int flags, int mode)
{
    oblk.name = name;
    oblk.flags = flags;
    oblk.mode = mode;
    oblk.ret = -1;
    tv_hypercall(TV_PORT_OPEN, &oblk);
    return oblk.ret;
}

static inline uint64_t read_cr3(void)
{
    uint64_t v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

static inline void write_cr3(uint64_t v)
{
    __asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory");
}

/* ---------------------------------------------------------------- blocks */

static int block_beyond_ram(int argc, char **argv)
{
    SAY("hostile: OPEN with its argument block at %#lx (= RAM size)\n", ram());
    outl(TV_PORT_OPEN, (uint32_t)ram());
    return survived("a block beyond RAM");
}

static int block_last_byte(int argc, char **argv)
{
    SAY("hostile: LSEEK with its 16-byte block at the last byte of RAM %#lx\n", ram() - 1);
    outl(TV_PORT_LSEEK, (uint32_t)(ram() - 1));
    return survived("a block at the last byte of RAM");
}

static int block_max(int argc, char **argv)
{
    SAY("hostile: READ with its block at 0xffffffff (4-byte address space wraps)\n");
    outl(TV_PORT_READ, 0xFFFFFFFFu);
    return survived("a block at 0xffffffff");
}

static int block_straddle(int argc, char **argv)
{
    SAY("hostile: CMDSIZE with its 1032-byte block 512 bytes before the end of RAM\n");
    outl(TV_PORT_CMDSIZE, (uint32_t)(ram() - 512));
    return survived("a CMDSIZE block straddling the end of RAM");
}

/* Blocks are fine anywhere in RAM, even on top of this guest's own code. */
static int block_on_code(int argc, char **argv)
{
    extern char victim_code[];
    SAY("hostile: CMDSIZE with its block over this guest's own code\n");
    outl(TV_PORT_CMDSIZE, (uint32_t)(uintptr_t)victim_code);
    int32_t got_argc;
    memcpy(&got_argc, victim_code, 4);
    printf("block-on-code: argc written over the code = %d\n", (int)got_argc);
    return got_argc == argc ? 0 : 1;
}
__asm__(".text\n.globl victim_code\nvictim_code:\n .fill 1032, 1, 0xf4\n");

/* --------------------------------------------------------------- buffers */

static int buf_beyond_ram(int argc, char **argv)
{
    SAY("hostile: WRITE of 16 bytes at virtual %#lx (mapped, but outside RAM)\n", ram());
    raw_write(1, ram(), 16);
    return survived("a buffer beyond RAM");
}

static int buf_straddle(int argc, char **argv)
{
    SAY("hostile: WRITE of 16 bytes starting 8 bytes before the end of RAM\n");
    raw_write(1, ram() - 8, 16);
    return survived("a buffer straddling the end of RAM");
}

static int buf_len_huge(int argc, char **argv)
{
    SAY("hostile: WRITE of 2^63 bytes\n");
    raw_write(1, (uint64_t)(uintptr_t)msg, 1ULL << 63);
    return survived("a 2^63-byte buffer");
}

static int buf_wrap(int argc, char **argv)
{
    SAY("hostile: WRITE of 0x20 bytes at 0xfffffffffffffff0 (wraps 2^64)\n");
    raw_write(1, 0xFFFFFFFFFFFFFFF0ULL, 0x20);
    return survived("a buffer wrapping 2^64");
}

static int buf_unmapped(int argc, char **argv)
{
    SAY("hostile: WRITE of 16 bytes at virtual 1 GiB (not mapped)\n");
    raw_write(1, GiB, 16);
    return survived("an unmapped buffer");
}

static int buf_noncanonical(int argc, char **argv)
{
    SAY("hostile: WRITE of 16 bytes at non-canonical 0x0000800000000000\n");
    raw_write(1, 0x0000800000000000ULL, 16);
    return survived("a non-canonical buffer");
}

static int buf_in_hole(int argc, char **argv)
{
    SAY("hostile: WRITE of 16 bytes at virtual 512 MiB (identity mapped, no RAM behind)\n");
    raw_write(1, 512ULL << 20, 16);
    return survived("a buffer in the identity map beyond RAM");
}

static int read_huge(int argc, char **argv)
{
    SAY("hostile: READ of 2^40 bytes from stdin into a 256-byte buffer\n");
    raw_read(0, (uint64_t)(uintptr_t)small_buf, 1ULL << 40);
    return survived("a 2^40-byte READ");
}

static int read_beyond(int argc, char **argv)
{
    SAY("hostile: READ of 16 bytes from stdin into virtual %#lx (outside RAM)\n", ram() + 4096);
    raw_read(0, ram() + 4096, 16);
    return survived("a READ into memory beyond RAM");
}

/* ------------------------------------------------------------ file names */

static int name_no_nul(int argc, char **argv)
{
    uint64_t start = ram() - 4096;
    memset((void *)(uintptr_t)start, 'A', 4096);
    SAY("hostile: OPEN of a name at %#lx with no NUL before the end of RAM\n", start);
    raw_open(start, O_RDONLY, 0);
    return survived("a file name without NUL");
}

static int unlink_no_nul(int argc, char **argv)
{
    uint64_t start = ram() - 100;
    memset((void *)(uintptr_t)start, 'B', 100);
    SAY("hostile: UNLINK of a name at %#lx with no NUL before the end of RAM\n", start);
    ublk.name = start;
    ublk.ret = -1;
    tv_hypercall(TV_PORT_UNLINK, &ublk);
    return survived("an unlink name without NUL");
}

static int name_beyond(int argc, char **argv)
{
    SAY("hostile: OPEN of a name at %#lx (outside RAM)\n", ram() + 16);
    raw_open(ram() + 16, O_RDONLY, 0);
    return survived("a file name outside RAM");
}

static int name_long(int argc, char **argv)
{
    static char longname[8192];
    memset(longname, 'a', sizeof(longname) - 1);
    SAY("hostile: OPEN of a %d-byte name\n", (int)sizeof(longname) - 1);
    int fd = raw_open((uint64_t)(uintptr_t)longname, O_RDONLY, 0);
    /* Either answer is a defined one: -1, or a stop with a report. */
    printf("open <8191 x a> = %d\n", fd);
    return fd == -1 ? 0 : 1;
}

/* --------------------------------------------------------------- CMDVAL */

static int cmdval_array_outside(int argc, char **argv)
{
    SAY("hostile: CMDVAL with its argv array at %#lx (outside RAM)\n", ram());
    vblk.argv = ram();
    vblk.envp = ram();
    tv_hypercall(TV_PORT_CMDVAL, &vblk);
    return survived("a CMDVAL array outside RAM");
}

static int cmdval_ptr_outside(int argc, char **argv)
{
    for (int i = 0; i <= TV_MAX_ARGS; i++)
        ptr_array[i] = 0xDEAD00000000ULL + (uint64_t)i;
    SAY("hostile: CMDVAL whose argv pointers are 0xdead00000000...\n");
    vblk.argv = (uint64_t)(uintptr_t)ptr_array;
    vblk.envp = (uint64_t)(uintptr_t)ptr_array;
    tv_hypercall(TV_PORT_CMDVAL, &vblk);
    return survived("CMDVAL pointers outside RAM");
}

static int cmdval_ptr_straddle(int argc, char **argv)
{
    for (int i = 0; i <= TV_MAX_ARGS; i++)
        ptr_array[i] = ram() - 2;
    SAY("hostile: CMDVAL whose argv pointers are 2 bytes before the end of RAM\n");
    vblk.argv = (uint64_t)(uintptr_t)ptr_array;
    vblk.envp = (uint64_t)(uintptr_t)ptr_array;
    tv_hypercall(TV_PORT_CMDVAL, &vblk);
    return survived("CMDVAL strings straddling the end of RAM");
}

static int cmdval_array_wrap(int argc, char **argv)
{
    SAY("hostile: CMDVAL with its argv array at 0xfffffffffffffff8\n");
    vblk.argv = 0xFFFFFFFFFFFFFFF8ULL;
    vblk.envp = 0;
    tv_hypercall(TV_PORT_CMDVAL, &vblk);
    return survived("a CMDVAL array wrapping 2^64");
}

/* The strings land in the boot page tables: the guest wrecks itself, the host reports the fault. */
static int cmdval_over_pagetables(int argc, char **argv)
{
    for (int i = 0; i <= TV_MAX_ARGS; i++)
        ptr_array[i] = 0x10000 + 8 * (uint64_t)(i % 512);  /* the PML4 */
    SAY("hostile: CMDVAL strings written over the PML4 at 0x10000\n");
    vblk.argv = (uint64_t)(uintptr_t)ptr_array;
    vblk.envp = (uint64_t)(uintptr_t)ptr_array;
    tv_hypercall(TV_PORT_CMDVAL, &vblk);
    /* the next TLB miss walks tables made of text */
    write_cr3(read_cr3());
    return survived("a PML4 made of strings");
}

/* ------------------------------------------------------------- file paths */

/* Names that lead outside the mount (the test plants link-out, abs-link, dirlink
 * and up2 as symlinks pointing out, and fifo as a FIFO inside the mount). */
static const char *const escapes[] = {
    "../canary", "../../canary", "/../canary", "a/../../canary", "./../canary", "..", "/..",
    "dirlink/canary", "dirlink/new.txt", "up2/canary", "up2/new.txt", "sub/../../canary",
    "//..//canary", "/proc/self/root/etc/passwd", "/etc/passwd", "/dev/zero", "",
};
/* Names inside the mount that must not open (symlinks out, a FIFO); unlinking
 * them would only remove the entry inside the mount, so it is not tried. */
static const char *const no_open[] = { "link-out", "abs-link", "dirlink", "up2", "fifo" };

static const int open_flags[] = { O_RDONLY, O_WRONLY | O_TRUNC, O_CREAT | O_WRONLY, O_RDWR | O_APPEND,
                                  O_CREAT | O_EXCL | O_RDWR };
static const char *const open_flag_names[] = { "O_RDONLY", "O_WRONLY|O_TRUNC", "O_CREAT|O_WRONLY",
                                               "O_RDWR|O_APPEND", "O_CREAT|O_EXCL|O_RDWR" };
#define N_OPEN_FLAGS (sizeof(open_flags) / sizeof(open_flags[0]))

static void try_opens(const char *name)
{
    char line[200];
    for (size_t f = 0; f < N_OPEN_FLAGS; f++) {
        int fd = hc_open(name, open_flags[f], 0666);
        snprintf(line, sizeof(line), "open \"%s\" %s", name, open_flag_names[f]);
        if (fd >= 0) {
            hc_write(fd, "pwned\n", 6);
            hc_close(fd);
        }
        expect_fail(line, fd);
    }
}

static int traversal(int argc, char **argv)
{
    char line[200];
    for (size_t i = 0; i < sizeof(escapes) / sizeof(escapes[0]); i++) {
        try_opens(escapes[i]);
        snprintf(line, sizeof(line), "unlink \"%s\"", escapes[i]);
        expect_fail(line, hc_unlink(escapes[i]));
    }
    for (size_t i = 0; i < sizeof(no_open) / sizeof(no_open[0]); i++)
        try_opens(no_open[i]);
    /* the mount itself still works */
    int fd = hc_open("inside.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    printf("open \"inside.txt\" O_CREAT|O_WRONLY|O_TRUNC = %s\n", fd >= 0 ? "ok" : "-1  UNEXPECTED");
    if (fd < 0)
        failures++;
    hc_write(fd, "inside\n", 7);
    expect("close inside.txt", hc_close(fd), 0);
    return verdict("traversal");
}

/* ------------------------------------------------------------------- fds */

static int fds[10000];

static int fd_exhaust(int argc, char **argv)
{
    int n = argc > 2 ? atoi(argv[2]) : 10000;
    int ok = 0, first_fail = -1;
    char c;
    if (n > 10000)
        n = 10000;
    for (int i = 0; i < n; i++) {
        fds[i] = hc_open("file.txt", O_RDONLY, 0);
        if (fds[i] >= 0)
            ok++;
        else if (first_fail < 0)
            first_fail = i;
        else if (fds[i] != -1)
            failures++;
    }
    printf("fd-exhaust: %d opens, %d ok, first refusal at %d\n", n, ok, first_fail);
    printf("fd-exhaust: waiting\n");
    /* the test counts the hypervisor's fds now, then sends a line */
    raw_read(0, (uint64_t)(uintptr_t)&c, 1);
    int closed = 0;
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0 && hc_close(fds[i]) == 0)
            closed++;
    printf("fd-exhaust: closed %d\n", closed);
    int fd = hc_open("file.txt", O_RDONLY, 0);
    printf("fd-exhaust: open after closing = %s\n", fd >= 0 ? "ok" : "-1");
    if (fd < 0 || closed != ok)
        failures++;
    hc_close(fd);
    return verdict("fd-exhaust");
}

static int fd_churn(int argc, char **argv)
{
    int n = argc > 2 ? atoi(argv[2]) : 10000;
    int bad = 0;
    char c;
    for (int i = 0; i < n; i++) {
        int fd = hc_open("file.txt", O_RDONLY, 0);
        int fd2 = hc_open("missing.txt", O_RDONLY, 0); /* refused opens must not leak either */
        int fd3 = hc_open("fifo", O_RDONLY, 0);
        if (fd < 0 || fd2 != -1 || fd3 != -1 || hc_close(fd) != 0)
            bad++;
    }
    printf("fd-churn: %d open/close rounds, %d bad\n", n, bad);
    printf("fd-churn: waiting\n");
    raw_read(0, (uint64_t)(uintptr_t)&c, 1);
    if (bad)
        failures++;
    return verdict("fd-churn");
}

static int bad_fds(int argc, char **argv)
{
    char buf[16];
    static const int badfd[] = { 77, 3, -1, 0x7fffffff, (int)0x80000000, 1000 };
    char line[80];
    for (size_t i = 0; i < sizeof(badfd) / sizeof(badfd[0]); i++) {
        hc_write(badfd[i], "never\n", 6);  /* WRITE has no result: the trace shows -1 */
        snprintf(line, sizeof(line), "read fd %d", badfd[i]);
        expect_fail(line, hc_read(badfd[i], buf, sizeof(buf)));
        snprintf(line, sizeof(line), "lseek fd %d", badfd[i]);
        expect_fail(line, hc_lseek(badfd[i], 0, SEEK_SET));
        snprintf(line, sizeof(line), "close fd %d", badfd[i]);
        expect_fail(line, hc_close(badfd[i]));
    }
    int fd = hc_open("file.txt", O_RDONLY, 0);
    printf("open file.txt = %s\n", fd >= 0 ? "ok" : "-1  UNEXPECTED");
    if (fd < 0)
        failures++;
    expect_fail("lseek whence 7", hc_lseek(fd, 0, 7));
    expect_fail("lseek whence -1", hc_lseek(fd, 0, -1));
    expect_fail("lseek whence 3 (SEEK_DATA)", hc_lseek(fd, 0, 3));
    expect_fail("lseek -1 SEEK_SET", hc_lseek(fd, -1, SEEK_SET));
    expect_fail("lseek INT64_MIN SEEK_CUR", hc_lseek(fd, (int64_t)0x8000000000000000ULL, SEEK_CUR));
    expect("lseek 0 SEEK_SET", hc_lseek(fd, 0, SEEK_SET), 0);
    hc_write(fd, "read-only fd\n", 13);
    expect_fail("read fd into a zero-length buffer at 0", hc_read(fd, (void *)0, 0) == 0 ? -1 : 0);
    expect("close file.txt", hc_close(fd), 0);
    expect_fail("close file.txt again", hc_close(fd));
    expect_fail("read after close", hc_read(fd, buf, sizeof(buf)));
    /* the guest's stdio: closing fd 2 hides it from the guest, not from the host */
    expect("close fd 0", hc_close(0), 0);
    expect_fail("close fd 0 again", hc_close(0));
    expect_fail("read fd 0 after close", hc_read(0, buf, sizeof(buf)));
    expect_fail("read fd 1", hc_read(1, buf, sizeof(buf)));
    return verdict("bad-fds");
}

static int ro_mount(int argc, char **argv)
{
    char buf[64];
    static const int flags[] = { O_WRONLY, O_RDWR, O_WRONLY | O_APPEND, O_RDONLY | O_TRUNC,
                                 O_CREAT | O_RDONLY, O_CREAT | O_EXCL | O_WRONLY };
    static const char *const fname[] = { "O_WRONLY", "O_RDWR", "O_WRONLY|O_APPEND", "O_RDONLY|O_TRUNC",
                                         "O_CREAT|O_RDONLY", "O_CREAT|O_EXCL|O_WRONLY" };
    char line[80];
    for (int f = 0; f < 6; f++) {
        snprintf(line, sizeof(line), "open ro/file.txt %s", fname[f]);
        int fd = hc_open("ro/file.txt", flags[f], 0644);
        if (fd >= 0) {
            hc_write(fd, "pwned\n", 6);
            hc_close(fd);
        }
        expect_fail(line, fd);
        snprintf(line, sizeof(line), "open ro/new.txt %s", fname[f]);
        fd = hc_open("ro/new.txt", flags[f], 0644);
        if (fd >= 0)
            hc_close(fd);
        expect_fail(line, fd);
    }
    expect_fail("unlink ro/file.txt", hc_unlink("ro/file.txt"));
    expect_fail("unlink ro/missing.txt", hc_unlink("ro/missing.txt"));
    expect_fail("unlink ro", hc_unlink("ro"));
    int fd = hc_open("ro/file.txt", O_RDONLY, 0);
    printf("open ro/file.txt O_RDONLY = %s\n", fd >= 0 ? "ok" : "-1  UNEXPECTED");
    if (fd < 0)
        failures++;
    hc_write(fd, "pwned\n", 6);  /* refused: fd is read-only */
    int64_t n = hc_read(fd, buf, sizeof(buf));
    printf("read ro/file.txt = %ld\n", (long)n);
    hc_close(fd);
    /* the writable mount next to it works */
    fd = hc_open("rw/out.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    printf("open rw/out.txt O_CREAT|O_WRONLY = %s\n", fd >= 0 ? "ok" : "-1  UNEXPECTED");
    if (fd < 0)
        failures++;
    hc_write(fd, "written\n", 8);
    hc_close(fd);
    return verdict("ro-mount");
}

/* ------------------------------------------------------------ CPU abuse */

static int spin(int argc, char **argv)
{
    SAY("hostile: spinning forever\n");
    for (volatile int forever = 1; forever;)
        __asm__ volatile("" ::: "memory");
    return survived("the end of an endless loop");
}

static int halt_forever(int argc, char **argv)
{
    SAY("hostile: sti; hlt with nothing to wake it\n");
    for (volatile int forever = 1; forever;)
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    return survived("the end of an endless loop");
}

static int triple_fault(int argc, char **argv)
{
    static const struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idt = { 0, 0 };
    SAY("hostile: empty IDT, then ud2 (triple fault)\n");
    __asm__ volatile("lidt %0; ud2" : : "m"(idt));
    return survived("a triple fault");
}

static int cr3_beyond(int argc, char **argv)
{
    SAY("hostile: CR3 = %#lx (outside RAM)\n", ram() + 0x10000);
    write_cr3(ram() + 0x10000);
    return survived("page tables outside RAM");
}

static int stdin_block(int argc, char **argv)
{
    char c;
    SAY("hostile: READ from stdin (blocks the vCPU in the host)\n");
    int64_t r = hc_read(0, &c, 1);
    printf("read stdin = %ld\n", (long)r);
    return 0;
}

/* ------------------------------------------------------------ port abuse */

static int port_sizes(int argc, char **argv)
{
    /* 8- and 16-bit OUTs to hypercall ports: the block address is the
     * truncated value, i.e. somewhere in the first 64 KiB.  CLOSE with
     * its block at 0x0/0x00: closes fd 0 (the guest's view) and writes ret. */
    SAY("hostile: outb/outw to hypercall ports, IN from them, rep outs/ins\n");
    outb(TV_PORT_CLOSE, 0x00);
    outw(TV_PORT_CLOSE, 0x0100);
    outb(TV_PORT_LSEEK, 0x80);
    outb(TV_PORT_NETWRITE, 0x12);
    outl(TV_PORT_NETREAD, 0x12345678);
    outl(TV_PORT_NETSTAT, 0xFFFFFFFF);
    printf("in 0x440 = %#x, 0x400 = %#x, 0x540 = %#x, 0x800 = %#x\n", inl(TV_PORT_OPEN),
           (unsigned)inw(TV_PORT_WRITE), (unsigned)inb(TV_PORT_EXIT), (unsigned)inb(TV_PORT_UART));
    /* rep outsb to the UART: the bytes are console output */
    static const char hello[] = "rep-outsb-to-uart\n";
    const char *p = hello;
    uint64_t n = sizeof(hello) - 1;
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((uint16_t)TV_PORT_UART) : "memory");
    /* rep outsl to CLOSE: each element is a block address */
    static volatile struct tv_sys_close cblk[3] = { { 55, -1 }, { 56, -1 }, { 57, -1 } };
    static uint32_t addrs[3];
    for (int i = 0; i < 3; i++)
        addrs[i] = (uint32_t)(uintptr_t)&cblk[i];
    const uint32_t *q = addrs;
    n = 3;
    __asm__ volatile("rep outsl" : "+S"(q), "+c"(n) : "d"((uint16_t)TV_PORT_CLOSE) : "memory");
    printf("rep outsl CLOSE x3 = %d %d %d\n", cblk[0].ret, cblk[1].ret, cblk[2].ret);
    /* rep insb from OPEN: all-ones */
    static uint8_t got[8];
    uint8_t *d = got;
    n = sizeof(got);
    __asm__ volatile("rep insb" : "+D"(d), "+c"(n) : "d"((uint16_t)TV_PORT_OPEN) : "memory");
    printf("rep insb OPEN = %02x %02x\n", got[0], got[7]);
    /* PCI config with odd sizes and offsets */
    outb(0xCF8, 0x12);
    outw(0xCF8, 0x1234);
    outl(0xCF8, 0x80FFFFFC);
    printf("pci: %#x %#x %#x\n", inl(0xCFC), (unsigned)inw(0xCFE), (unsigned)inb(0xCFF));
    outl(0xCFC, 0xFFFFFFFF);
    outb(0xCFD, 0xFF);
    outl(0xCF8, 0x80000000);
    printf("pci 0:0.0 = %#x\n", inl(0xCFC));
    return 0;
}

static int rep_outs_block(int argc, char **argv)
{
    /* rep outsl to EXIT: the elements are block addresses; the first one exits */
    static volatile struct tv_sys_exit eblk = { 7 };
    static uint32_t addrs[4];
    for (int i = 0; i < 4; i++)
        addrs[i] = (uint32_t)(uintptr_t)&eblk;
    const uint32_t *q = addrs;
    uint64_t n = 4;
    SAY("hostile: rep outsl of 4 EXIT block addresses (code 7)\n");
    __asm__ volatile("rep outsl" : "+S"(q), "+c"(n) : "d"((uint16_t)TV_PORT_EXIT) : "memory");
    return survived("four EXITs");
}

static int rep_outs_bad(int argc, char **argv)
{
    /* rep outsl to WRITE whose second element is a block beyond RAM */
    static volatile struct tv_sys_write ok = { 1, 0, 0 };
    static uint32_t addrs[2];
    static const char text[] = "first element served\n";
    ok.buf = (uint64_t)(uintptr_t)text;
    ok.len = sizeof(text) - 1;
    addrs[0] = (uint32_t)(uintptr_t)&ok;
    addrs[1] = (uint32_t)ram();
    const uint32_t *q = addrs;
    uint64_t n = 2;
    SAY("hostile: rep outsl of 2 WRITE block addresses, the second beyond RAM\n");
    __asm__ volatile("rep outsl" : "+S"(q), "+c"(n) : "d"((uint16_t)TV_PORT_WRITE) : "memory");
    return survived("a string OUT with a bad block");
}

static int unknown_port(int argc, char **argv)
{
    SAY("hostile: outl to port 0x4242\n");
    outl(0x4242, 0xDEADBEEF);
    return survived("an OUT to an unknown port");
}

/* ------------------------------------------------------------- memory map */

static int mmio(int argc, char **argv)
{
    volatile uint32_t *p = (volatile uint32_t *)(uintptr_t)(ram() + 0x1000);
    int n = argc > 2 ? atoi(argv[2]) : 1;
    SAY("hostile: loads and stores at %#lx.. (beyond RAM, inside the identity map)\n", ram() + 0x1000);
    uint32_t v = p[0];
    p[1] = 0x12345678;
    volatile uint64_t *q = (volatile uint64_t *)(uintptr_t)(ram() + 0x2000);
    uint64_t w = *q;
    *q = 0x1122334455667788ULL;
    for (int i = 0; i < n; i++)  /* many distinct addresses */
        (void)p[1024 * (i + 3)];
    printf("mmio: read32 = %#x, read64 = %#lx, %d more loads\n", v, (unsigned long)w, n);
    /* the APIC and IOAPIC pages are the kernel's */
    return 0;
}

/* Map 1 GiB.. with our own page tables, then hand the host buffers there. */
static uint64_t pd_new[512] __attribute__((aligned(4096)));
static uint64_t pt_new[512] __attribute__((aligned(4096)));
static uint64_t pml4_copy[512] __attribute__((aligned(4096)));
static char page_a[4096] __attribute__((aligned(4096)));
static char page_b[4096] __attribute__((aligned(4096)));

static int pt_remap(int argc, char **argv)
{
    volatile uint64_t *pdpt = (volatile uint64_t *)0x11000;
    /* VA 1 GiB + 0 -> page_b, 1 GiB + 4 KiB -> page_a: virtually contiguous, physically reversed */
    memset(pt_new, 0, sizeof(pt_new));
    memset(pd_new, 0, sizeof(pd_new));
    pt_new[0] = (uint64_t)(uintptr_t)page_b | 3;
    pt_new[1] = (uint64_t)(uintptr_t)page_a | 3;
    pd_new[0] = (uint64_t)(uintptr_t)pt_new | 3;
    pdpt[1] = (uint64_t)(uintptr_t)pd_new | 3;
    write_cr3(read_cr3());
    const char *s = "split across two remapped pages\n";
    size_t len = strlen(s);
    char *va = (char *)(uintptr_t)(GiB + 4096 - 10);
    memcpy(va, s, len);
    SAY("hostile: WRITE from 1 GiB - crossing 4 KiB pages mapped in reverse order\n");
    hc_write(1, va, len);
    /* a private copy of the PML4 as CR3: the host must walk the current CR3 */
    for (int i = 0; i < 512; i++)
        pml4_copy[i] = ((volatile uint64_t *)0x10000)[i];
    pml4_copy[511] = (uint64_t)(uintptr_t)pml4_copy | 3;
    pdpt[1] = 0;  /* the boot tables no longer map 1 GiB */
    static uint64_t pdpt2[512] __attribute__((aligned(4096)));
    for (int i = 0; i < 512; i++)
        pdpt2[i] = pdpt[i];
    pdpt2[1] = (uint64_t)(uintptr_t)pd_new | 3;
    pml4_copy[0] = (uint64_t)(uintptr_t)pdpt2 | 3;
    uint64_t old = read_cr3();
    write_cr3((uint64_t)(uintptr_t)pml4_copy);
    SAY("hostile: the same WRITE under a private CR3 %#lx\n", (uint64_t)(uintptr_t)pml4_copy);
    hc_write(1, va, len);
    write_cr3(old);
    return 0;
}

static int pt_table_beyond(int argc, char **argv)
{
    volatile uint64_t *pdpt = (volatile uint64_t *)0x11000;
    pdpt[1] = (ram() + 0x200000) | 3;  /* a page directory outside RAM */
    SAY("hostile: WRITE from 1 GiB whose page directory lies outside RAM\n");
    raw_write(1, GiB, 8);
    return survived("a page walk outside RAM");
}

static int pt_page_beyond(int argc, char **argv)
{
    volatile uint64_t *pdpt = (volatile uint64_t *)0x11000;
    memset(pd_new, 0, sizeof(pd_new));
    pd_new[0] = (ram() + 0x400000) | 0x83;  /* 2 MiB page beyond RAM */
    pdpt[1] = (uint64_t)(uintptr_t)pd_new | 3;
    SAY("hostile: WRITE from 1 GiB mapped by a 2 MiB page outside RAM\n");
    raw_write(1, GiB, 8);
    return survived("a page outside RAM");
}

static int pt_huge_1g(int argc, char **argv)
{
    volatile uint64_t *pdpt = (volatile uint64_t *)0x11000;
    pdpt[2] = 0x83;  /* 1 GiB page: VA 2 GiB -> PA 0 */
    write_cr3(read_cr3());
    const char *s = "via a 1 GiB page\n";
    SAY("hostile: WRITE through a 1 GiB page at VA 2 GiB\n");
    hc_write(1, (const char *)(uintptr_t)(2 * GiB + (uint64_t)(uintptr_t)s), strlen(s));
    return 0;
}

static int selfmod(int argc, char **argv)
{
    extern char patch_me[];
    int before, after;
    __asm__ volatile("call patch_me" : "=a"(before) : : "memory");
    patch_me[1] = 2;  /* mov $1, %eax -> mov $2, %eax */
    __asm__ volatile("call patch_me" : "=a"(after) : : "memory");
    printf("selfmod: %d -> %d\n", before, after);
    return after == 2 ? 0 : 1;
}
__asm__(".text\n.globl patch_me\npatch_me:\n mov $1, %eax\n ret\n");

static int exec_beyond(int argc, char **argv)
{
    SAY("hostile: jump to %#lx (outside RAM)\n", ram() + 0x1000);
    ((void (*)(void))(uintptr_t)(ram() + 0x1000))();
    return survived("code executed outside RAM");
}

static int rep_ins_beyond(int argc, char **argv)
{
    uint8_t *d = (uint8_t *)(uintptr_t)(ram() + 0x1000);
    uint64_t n = 16;
    SAY("hostile: rep insb from port 0x440 into %#lx (outside RAM)\n", ram() + 0x1000);
    __asm__ volatile("rep insb" : "+D"(d), "+c"(n) : "d"((uint16_t)TV_PORT_OPEN) : "memory");
    printf("rep-ins-beyond: %lu left\n", (unsigned long)n);
    return 0;
}

static int rep_outs_beyond(int argc, char **argv)
{
    const uint8_t *p = (const uint8_t *)(uintptr_t)(ram() + 0x1000);
    uint64_t n = 16;
    SAY("hostile: rep outsb to the UART from %#lx (outside RAM)\n", ram() + 0x1000);
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((uint16_t)TV_PORT_UART) : "memory");
    printf("\nrep-outs-beyond: %lu left\n", (unsigned long)n);
    return 0;
}

static int msr_bad(int argc, char **argv)
{
    SAY("hostile: wrmsr to MSR 0xdeadbeef\n");
    __asm__ volatile("wrmsr" : : "c"(0xDEADBEEFu), "a"(1u), "d"(0u));
    return survived("a write to a nonexistent MSR");
}

static int cmdval_self_overwrite(int argc, char **argv)
{
    /* argv[0]'s string is written over the pointer array itself, so the
     * host's next pointer is made of path characters. */
    for (int i = 0; i <= TV_MAX_ARGS; i++)
        ptr_array[i] = (uint64_t)(uintptr_t)ptr_array;
    SAY("hostile: CMDVAL whose first string overwrites its own pointer array\n");
    vblk.argv = (uint64_t)(uintptr_t)ptr_array;
    vblk.envp = 0;
    tv_hypercall(TV_PORT_CMDVAL, &vblk);
    printf("cmdval-self-overwrite: array now starts with \"%.8s\"\n", (const char *)ptr_array);
    return 0;
}

/* Legal but heavy: all of RAM in one WRITE, a few times (host memory and trace size are what it costs). */
static int write_all_ram(int argc, char **argv)
{
    int times = argc > 2 ? atoi(argv[2]) : 1;
    for (int i = 0; i < times; i++)
        raw_write(1, 0, ram());
    printf("\nwrite-all-ram: %d x %lu bytes\n", times, (unsigned long)ram());
    return 0;
}

/* -------------------------------------------------------------- exit codes */

static int exit_code(int argc, char **argv)
{
    int code = argc > 2 ? atoi(argv[2]) : -1;
    SAY("hostile: EXIT %d\n", code);
    fflush_stdout();
    hc_exit(code);
}

/* ----------------------------------------------------------------- SMP */

static volatile uint32_t ap_go;     /* which SMP mode vCPU 1 runs (set by vCPU 0) */
static volatile uint32_t ap_done;
static volatile uint32_t ap_ready;
static volatile uint32_t ap_bad;

enum { AP_NONE, AP_FAULT, AP_HAMMER, AP_EXIT, AP_BADPTR };

static int wait_ap(void)
{
    for (uint64_t i = 0; i < (1ULL << 26); i++) {
        if (tv_load32(&ap_done))
            return 1;
        tv_pause();
    }
    return 0;
}

static void need_cpus(void)
{
    if (tv_num_cpus() < 2) {
        eprintf("hostile: this mode needs -c 2\n");
        exit(2);
    }
}

static int smp_fault(int argc, char **argv)
{
    need_cpus();
    SAY("hostile: vCPU 1 triple-faults while vCPU 0 spins\n");
    tv_store32(&ap_go, AP_FAULT);
    for (volatile int forever = 1; forever;)
        tv_pause();
    return survived("the end of an endless loop");
}

static int smp_badptr(int argc, char **argv)
{
    need_cpus();
    SAY("hostile: vCPU 1 passes a bad block while vCPU 0 spins\n");
    tv_store32(&ap_go, AP_BADPTR);
    for (volatile int forever = 1; forever;)
        tv_pause();
    return survived("the end of an endless loop");
}

static int hammer(unsigned cpu)
{
    char name[32], buf[32], want[32];
    int bad = 0;
    snprintf(name, sizeof(name), "cpu%u.txt", cpu);
    snprintf(want, sizeof(want), "vcpu %u", cpu);
    for (int i = 0; i < 300; i++) {
        int fd = hc_open(name, O_CREAT | O_RDWR | O_TRUNC, 0644);
        if (fd < 0) {
            bad++;
            continue;
        }
        hc_write(fd, want, strlen(want));
        if (hc_lseek(fd, 0, SEEK_SET) != 0)
            bad++;
        memset(buf, 0, sizeof(buf));
        if (hc_read(fd, buf, sizeof(buf)) != (int64_t)strlen(want) || strcmp(buf, want) != 0)
            bad++;
        if (hc_close(fd) != 0)
            bad++;
        if (hc_open("missing", O_RDONLY, 0) != -1 || hc_close(77 + (int)cpu) != -1)
            bad++;
        uart_putc(cpu ? 'b' : 'a');
    }
    return bad;
}

static int smp_hammer(int argc, char **argv)
{
    need_cpus();
    SAY("hostile: vCPUs 0 and 1 hammer the file hypercalls at the same time\n");
    tv_store32(&ap_go, AP_HAMMER);
    int bad = hammer(0);
    if (!wait_ap()) {
        printf("\nsmp-hammer: vCPU 1 never finished\n");
        return 1;
    }
    uart_putc('\n');
    printf("smp-hammer: bad results cpu0=%d cpu1=%d\n", bad, (int)ap_bad);
    return bad || ap_bad ? 1 : 0;
}

static int smp_exit(int argc, char **argv)
{
    need_cpus();
    SAY("hostile: vCPUs 0 and 1 EXIT at the same time (codes 10 and 11)\n");
    fflush_stdout();
    tv_store32(&ap_go, AP_EXIT);
    while (!tv_load32(&ap_ready))
        tv_pause();
    hc_exit(10);
}

void ap_main(unsigned cpu)
{
    uint32_t mode;
    if (cpu != 1)
        return;
    while ((mode = tv_load32(&ap_go)) == AP_NONE)
        tv_pause();
    switch (mode) {
    case AP_FAULT: {
        static const struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idt = { 0, 0 };
        for (volatile int i = 0; i < 1000; i++)
            ;
        __asm__ volatile("lidt %0; ud2" : : "m"(idt));
        break;
    }
    case AP_BADPTR:
        outl(TV_PORT_WRITE, 0xFFFFFFF0u);
        break;
    case AP_HAMMER:
        ap_bad = (uint32_t)hammer(1);
        tv_store32(&ap_done, 1);
        break;
    case AP_EXIT:
        tv_store32(&ap_ready, 1);
        hc_exit(11);
    }
}

/* ---------------------------------------------------------------- table */

static const struct { const char *name; mode_fn fn; } modes[] = {
    { "block-beyond-ram", block_beyond_ram },
    { "block-last-byte", block_last_byte },
    { "block-max", block_max },
    { "block-straddle", block_straddle },
    { "block-on-code", block_on_code },
    { "buf-beyond-ram", buf_beyond_ram },
    { "buf-straddle", buf_straddle },
    { "buf-len-huge", buf_len_huge },
    { "buf-wrap", buf_wrap },
    { "buf-unmapped", buf_unmapped },
    { "buf-noncanonical", buf_noncanonical },
    { "buf-in-hole", buf_in_hole },
    { "read-huge", read_huge },
    { "read-beyond", read_beyond },
    { "name-no-nul", name_no_nul },
    { "unlink-no-nul", unlink_no_nul },
    { "name-beyond", name_beyond },
    { "name-long", name_long },
    { "cmdval-array-outside", cmdval_array_outside },
    { "cmdval-ptr-outside", cmdval_ptr_outside },
    { "cmdval-ptr-straddle", cmdval_ptr_straddle },
    { "cmdval-array-wrap", cmdval_array_wrap },
    { "cmdval-over-pagetables", cmdval_over_pagetables },
    { "traversal", traversal },
    { "fd-exhaust", fd_exhaust },
    { "fd-churn", fd_churn },
    { "bad-fds", bad_fds },
    { "ro-mount", ro_mount },
    { "spin", spin },
    { "halt-forever", halt_forever },
    { "triple-fault", triple_fault },
    { "cr3-beyond", cr3_beyond },
    { "stdin-block", stdin_block },
    { "port-sizes", port_sizes },
    { "rep-outs-exit", rep_outs_block },
    { "rep-outs-bad", rep_outs_bad },
    { "unknown-port", unknown_port },
    { "mmio", mmio },
    { "pt-remap", pt_remap },
    { "pt-table-beyond", pt_table_beyond },
    { "pt-page-beyond", pt_page_beyond },
    { "pt-huge-1g", pt_huge_1g },
    { "selfmod", selfmod },
    { "write-all-ram", write_all_ram },
    { "exec-beyond", exec_beyond },
    { "rep-ins-beyond", rep_ins_beyond },
    { "rep-outs-beyond", rep_outs_beyond },
    { "msr-bad", msr_bad },
    { "cmdval-self-overwrite", cmdval_self_overwrite },
    { "exit-code", exit_code },
    { "smp-fault", smp_fault },
    { "smp-badptr", smp_badptr },
    { "smp-hammer", smp_hammer },
    { "smp-exit", smp_exit },
};

int main(int argc, char **argv, char **envp)
{
    (void)envp;
    if (argc < 2) {
        eprintf("usage: hostile MODE [ARG]; modes:");
        for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
            eprintf(" %s", modes[i].name);
        eprintf("\n");
        return 2;
    }
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
        if (strcmp(argv[1], modes[i].name) == 0)
            return modes[i].fn(argc, argv);
    eprintf("hostile: unknown mode %s\n", argv[1]);
    return 2;
}
