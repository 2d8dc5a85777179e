/*
 * hypercall.c - one wrapper per uhyve 0.2.1 hypercall port.
 *
 * Each wrapper fills a packed block on its own stack (so concurrent vCPUs
 * never share one), pre-fills the result field with -1 as the Hermit kernel
 * does, issues the OUT and reads the result back.  tv_hypercall's "memory"
 * clobber orders the block stores before the OUT and the result load after.
 */
#include "tvguest.h"

int64_t hc_write(int fd, const void *buf, uint64_t len)
{
    volatile struct tv_sys_write b = {
        .fd = fd, .buf = (uint64_t)(uintptr_t)buf, .len = len,
    };
    tv_hypercall(TV_PORT_WRITE, &b);
    return (int64_t)len;
}

int hc_open(const char *path, int flags, int mode)
{
    volatile struct tv_sys_open b = {
        .name = (uint64_t)(uintptr_t)path, .flags = flags, .mode = mode, .ret = -1,
    };
    tv_hypercall(TV_PORT_OPEN, &b);
    return b.ret;
}

int hc_close(int fd)
{
    volatile struct tv_sys_close b = { .fd = fd, .ret = -1 };
    tv_hypercall(TV_PORT_CLOSE, &b);
    return b.ret;
}

int64_t hc_read(int fd, void *buf, uint64_t len)
{
    volatile struct tv_sys_read b = {
        .fd = fd, .buf = (uint64_t)(uintptr_t)buf, .len = len, .ret = -1,
    };
    tv_hypercall(TV_PORT_READ, &b);
    return b.ret;
}

int64_t hc_lseek(int fd, int64_t offset, int whence)
{
    /* The offset field is in/out: the host replaces it with the result. */
    volatile struct tv_sys_lseek b = { .fd = fd, .offset = offset, .whence = whence };
    tv_hypercall(TV_PORT_LSEEK, &b);
    return b.offset;
}

int hc_unlink(const char *path)
{
    volatile struct tv_sys_unlink b = { .name = (uint64_t)(uintptr_t)path, .ret = -1 };
    tv_hypercall(TV_PORT_UNLINK, &b);
    return b.ret;
}

void hc_exit(int code)
{
    volatile struct tv_sys_exit b = { .arg = code };
    tv_hypercall(TV_PORT_EXIT, &b);
    /* The host does not resume a vCPU after EXIT; if it did, stay here. */
    tv_park();
}

void hc_cmdsize(struct tv_sys_cmdsize *sizes)
{
    memset(sizes, 0, sizeof(*sizes));
    tv_hypercall(TV_PORT_CMDSIZE, sizes);
}

void hc_cmdval(char **argv, char **envp)
{
    volatile struct tv_sys_cmdval b = {
        .argv = (uint64_t)(uintptr_t)argv, .envp = (uint64_t)(uintptr_t)envp,
    };
    tv_hypercall(TV_PORT_CMDVAL, &b);
}

void uart_putc(char c)
{
    outb(TV_PORT_UART, (uint8_t)c);
}

void uart_puts(const char *s)
{
    while (*s)
        uart_putc(*s++);
}
