/*
 * string.c - the string and memory functions guests (and gcc, which emits
 * calls to memcpy/memset/memmove/memcmp for struct copies and large
 * initialisers) need.  memcpy/memset/memmove use `rep movsb`/`rep stosb`,
 * which never touch vector registers.  The SDK is compiled with
 * -fno-tree-loop-distribute-patterns so gcc does not turn the loops below
 * back into calls to themselves.
 */
#include "tvguest.h"

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    if ((uintptr_t)dst - (uintptr_t)src >= n) {
        /* No harmful overlap: copy forwards. */
        return memcpy(dst, src, n);
    }
    if (n) {
        /* dst lies inside [src, src + n): copy backwards. */
        void *d = (char *)dst + n - 1;
        const void *s = (const char *)src + n - 1;
        __asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory", "cc");
    }
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *p = a, *q = b;

    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    const char *p = s;

    while (*p)
        p++;
    return (size_t)(p - s);
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;

    while (n < max && s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

char *strchr(const char *s, int c)
{
    for (;; s++) {
        if (*s == (char)c)
            return (char *)s;
        if (!*s)
            return NULL;
    }
}

static int digit_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'z') return c - 'a' + 10;
    if (c >= 'A' && c <= 'Z') return c - 'A' + 10;
    return 99;
}

/*
 * Shared parser: optional spaces, optional sign, optional 0x/0 prefix
 * (base 0 or 16), digits.  Saturates at the unsigned 64-bit range; the
 * signed wrappers clamp to long.
 */
static uint64_t parse(const char *s, char **end, int base, bool *neg, bool *overflow)
{
    const char *p = s;
    uint64_t v = 0;
    bool any = false;

    *neg = false;
    *overflow = false;
    while (*p == ' ' || (*p >= '\t' && *p <= '\r'))
        p++;
    if (*p == '+' || *p == '-')
        *neg = *p++ == '-';
    if ((base == 0 || base == 16) && p[0] == '0' && (p[1] == 'x' || p[1] == 'X') &&
        digit_value(p[2]) < 16) {
        p += 2;
        base = 16;
    } else if (base == 0) {
        base = p[0] == '0' ? 8 : 10;
    }
    if (base < 2 || base > 36) {
        if (end)
            *end = (char *)s;
        return 0;
    }
    for (;; p++) {
        int d = digit_value(*p);
        if (d >= base)
            break;
        any = true;
        if (v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base) {
            *overflow = true;
            v = UINT64_MAX;
        } else if (!*overflow) {
            v = v * (uint64_t)base + (uint64_t)d;
        }
    }
    if (end)
        *end = (char *)(any ? p : s);
    return v;
}

unsigned long strtoul(const char *s, char **end, int base)
{
    bool neg, overflow;
    uint64_t v = parse(s, end, base, &neg, &overflow);

    if (overflow)
        return UINT64_MAX;
    return neg ? 0 - v : v;
}

long strtol(const char *s, char **end, int base)
{
    bool neg, overflow;
    uint64_t v = parse(s, end, base, &neg, &overflow);

    if (neg)
        return (overflow || v > (uint64_t)INT64_MAX + 1) ? INT64_MIN : (long)(0 - v);
    return (overflow || v > (uint64_t)INT64_MAX) ? INT64_MAX : (long)v;
}

long atol(const char *s)
{
    return strtol(s, NULL, 10);
}

int atoi(const char *s)
{
    long v = strtol(s, NULL, 10);

    if (v > INT32_MAX)
        return INT32_MAX;
    if (v < INT32_MIN)
        return INT32_MIN;
    return (int)v;
}
