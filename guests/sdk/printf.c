/*
 * printf.c - a small integer-only printf family.
 *
 * One formatter (format()) writes into a "sink": either a caller's string
 * (snprintf) or a buffer flushed with the WRITE hypercall (stdout, stderr).
 * stdout is line buffered and shared by all vCPUs behind a spinlock.
 */
#include "tvguest.h"

struct sink {
    char *buf;
    size_t cap;
    size_t len;
    int fd;             /* -1: string sink (truncating), else a WRITE target */
    bool line;          /* flush at '\n' */
    size_t total;       /* characters produced, as printf returns */
};

static void sink_flush(struct sink *s)
{
    if (s->fd >= 0 && s->len > 0) {
        hc_write(s->fd, s->buf, s->len);
        s->len = 0;
    }
}

static void sink_putc(struct sink *s, char c)
{
    s->total++;
    if (s->fd < 0) {
        if (s->len + 1 < s->cap)
            s->buf[s->len++] = c;
        return;
    }
    s->buf[s->len++] = c;
    if (s->len == s->cap || (c == '\n' && s->line))
        sink_flush(s);
}

static void sink_repeat(struct sink *s, char c, int n)
{
    while (n-- > 0)
        sink_putc(s, c);
}

static void sink_write(struct sink *s, const char *p, size_t n)
{
    while (n--)
        sink_putc(s, *p++);
}

#define F_LEFT  1
#define F_ZERO  2
#define F_PLUS  4
#define F_SPACE 8
#define F_ALT   16

static void put_number(struct sink *s, uint64_t v, bool negative, unsigned base,
                       bool upper, int flags, int width, int prec)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int nd = 0;
    const char *prefix = "";
    int npre, zeros, total;

    if (!(v == 0 && prec == 0)) {
        do {
            tmp[nd++] = digits[v % base];
            v /= base;
        } while (v);
    }

    if (negative)
        prefix = "-";
    else if (flags & F_PLUS)
        prefix = "+";
    else if (flags & F_SPACE)
        prefix = " ";
    else if ((flags & F_ALT) && base == 16)
        prefix = upper ? "0X" : "0x";
    npre = (int)strlen(prefix);

    zeros = prec > nd ? prec - nd : 0;
    total = npre + zeros + nd;
    if ((flags & F_ZERO) && !(flags & F_LEFT) && prec < 0 && width > total) {
        zeros += width - total;
        total = width;
    }

    if (!(flags & F_LEFT))
        sink_repeat(s, ' ', width - total);
    sink_write(s, prefix, (size_t)npre);
    sink_repeat(s, '0', zeros);
    while (nd)
        sink_putc(s, tmp[--nd]);
    if (flags & F_LEFT)
        sink_repeat(s, ' ', width - total);
}

static void put_padded(struct sink *s, const char *p, size_t n, int flags, int width)
{
    int pad = width > (int)n ? width - (int)n : 0;

    if (!(flags & F_LEFT))
        sink_repeat(s, ' ', pad);
    sink_write(s, p, n);
    if (flags & F_LEFT)
        sink_repeat(s, ' ', pad);
}

enum { L_NONE, L_HH, L_H, L_L, L_LL, L_Z, L_J, L_T };

static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        int flags = 0, width = 0, prec = -1, len = L_NONE;

        if (*fmt != '%') {
            sink_putc(s, *fmt);
            continue;
        }
        fmt++;

        for (;; fmt++) {
            if (*fmt == '-') flags |= F_LEFT;
            else if (*fmt == '0') flags |= F_ZERO;
            else if (*fmt == '+') flags |= F_PLUS;
            else if (*fmt == ' ') flags |= F_SPACE;
            else if (*fmt == '#') flags |= F_ALT;
            else break;
        }

        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                flags |= F_LEFT;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }

        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                if (prec < 0)
                    prec = -1;
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }

        switch (*fmt) {
        case 'h':
            len = L_H;
            if (fmt[1] == 'h') { len = L_HH; fmt++; }
            fmt++;
            break;
        case 'l':
            len = L_L;
            if (fmt[1] == 'l') { len = L_LL; fmt++; }
            fmt++;
            break;
        case 'z': len = L_Z; fmt++; break;
        case 'j': len = L_J; fmt++; break;
        case 't': len = L_T; fmt++; break;
        default: break;
        }

        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v;
            switch (len) {
            case L_HH: v = (signed char)va_arg(ap, int); break;
            case L_H:  v = (short)va_arg(ap, int); break;
            case L_L:  v = va_arg(ap, long); break;
            case L_LL: v = va_arg(ap, long long); break;
            case L_Z:  v = va_arg(ap, long); break;       /* ssize_t */
            case L_J:  v = va_arg(ap, int64_t); break;
            case L_T:  v = va_arg(ap, ptrdiff_t); break;
            default:   v = va_arg(ap, int); break;
            }
            /* Negate in unsigned arithmetic so INT64_MIN is fine. */
            put_number(s, v < 0 ? 0 - (uint64_t)v : (uint64_t)v, v < 0, 10, false,
                       flags, width, prec);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v;
            switch (len) {
            case L_HH: v = (unsigned char)va_arg(ap, unsigned); break;
            case L_H:  v = (unsigned short)va_arg(ap, unsigned); break;
            case L_L:  v = va_arg(ap, unsigned long); break;
            case L_LL: v = va_arg(ap, unsigned long long); break;
            case L_Z:  v = va_arg(ap, size_t); break;
            case L_J:  v = va_arg(ap, uint64_t); break;
            case L_T:  v = (uint64_t)va_arg(ap, ptrdiff_t); break;
            default:   v = va_arg(ap, unsigned); break;
            }
            put_number(s, v, false, *fmt == 'u' ? 10 : 16, *fmt == 'X',
                       flags & ~(F_PLUS | F_SPACE), width, prec);
            break;
        }
        case 'p': {
            uint64_t v = (uint64_t)(uintptr_t)va_arg(ap, void *);
            put_number(s, v, false, 16, false, (flags & ~(F_PLUS | F_SPACE)) | F_ALT,
                       width, prec);
            break;
        }
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            put_padded(s, str, prec >= 0 ? strnlen(str, (size_t)prec) : strlen(str),
                       flags, width);
            break;
        }
        case 'c': {
            char c = (char)va_arg(ap, int);
            put_padded(s, &c, 1, flags, width);
            break;
        }
        case '%':
            sink_putc(s, '%');
            break;
        case '\0':
            /* A lone '%' at the end: print it and stop. */
            sink_putc(s, '%');
            return;
        default:
            /* Unknown conversion: print it literally. */
            sink_putc(s, '%');
            sink_putc(s, *fmt);
            break;
        }
    }
}

/* ---- stdout ---------------------------------------------------------------- */

static char stdout_buf[1024];
static struct sink stdout_sink = {
    .buf = stdout_buf, .cap = sizeof(stdout_buf), .fd = 1, .line = true,
};
static tv_spinlock_t stdout_lock = TV_SPINLOCK_INIT;

int vprintf(const char *fmt, va_list ap)
{
    size_t before;

    tv_spin_lock(&stdout_lock);
    before = stdout_sink.total;
    format(&stdout_sink, fmt, ap);
    before = stdout_sink.total - before;
    tv_spin_unlock(&stdout_lock);
    return (int)before;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int putchar(int c)
{
    tv_spin_lock(&stdout_lock);
    sink_putc(&stdout_sink, (char)c);
    tv_spin_unlock(&stdout_lock);
    return (unsigned char)c;
}

int puts(const char *str)
{
    tv_spin_lock(&stdout_lock);
    sink_write(&stdout_sink, str, strlen(str));
    sink_putc(&stdout_sink, '\n');
    tv_spin_unlock(&stdout_lock);
    return 1;
}

void fflush_stdout(void)
{
    tv_spin_lock(&stdout_lock);
    sink_flush(&stdout_sink);
    tv_spin_unlock(&stdout_lock);
}

/* ---- other file descriptors (unbuffered beyond one call) ------------------ */

int veprintf(const char *fmt, va_list ap)
{
    char buf[256];
    struct sink s = { .buf = buf, .cap = sizeof(buf), .fd = 2 };

    format(&s, fmt, ap);
    sink_flush(&s);
    return (int)s.total;
}

int eprintf(const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = veprintf(fmt, ap);
    va_end(ap);
    return n;
}

int dprintf(int fd, const char *fmt, ...)
{
    char buf[256];
    struct sink s = { .buf = buf, .cap = sizeof(buf), .fd = fd };
    va_list ap;

    if (fd == 1)
        fflush_stdout();
    va_start(ap, fmt);
    format(&s, fmt, ap);
    va_end(ap);
    sink_flush(&s);
    return (int)s.total;
}

/* ---- strings ---------------------------------------------------------------- */

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = { .buf = buf, .cap = size, .fd = -1 };

    format(&s, fmt, ap);
    if (size > 0)
        buf[s.len] = '\0';
    return (int)s.total;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}
