/*
 * files: a round trip through the file hypercalls (OPEN, WRITE, LSEEK, READ,
 * CLOSE, UNLINK) on the host file argv[1] (default "data.txt", relative to
 * the hypervisor's working directory).  One line per step; the exact output
 * is listed in guests/README.md.  fd numbers are not printed (they depend on
 * the hypervisor), only whether an open succeeded.
 *
 * Success: "files: OK\n", exit 0.  First failed step: "files: FAIL at
 * <step>\n", exit 1 (after a silent best-effort close and unlink).
 */
#include "tvguest.h"

static const char part1[] = "The quick brown fox jumps over the lazy dog.\n";
static const char part2[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

#define LEN1 ((int64_t)sizeof(part1) - 1)        /* 45 */
#define LEN2 ((int64_t)sizeof(part2) - 1)        /* 36 */
#define TOTAL (LEN1 + LEN2)                      /* 81 */
#define CHUNK 32
#define BAD_FD 77

static char expected[TOTAL];
static char buf[128];
static const char *path;
static int open_fd = -1;
static bool created;

static int fail(const char *step)
{
    printf("files: FAIL at %s\n", step);
    if (open_fd >= 0)
        hc_close(open_fd);
    if (created)
        hc_unlink(path);
    return 1;
}

/* An open's fd depends on the hypervisor: print "ok" for success, else the value. */
static void report_open(const char *how, int fd)
{
    if (fd >= 0)
        printf("open %s %s = ok\n", path, how);
    else
        printf("open %s %s = %d\n", path, how, fd);
}

#define CHECK(cond, step) do { if (!(cond)) return fail(step); } while (0)

int main(int argc, char **argv, char **envp)
{
    int64_t r, off, got;
    int fd, ret;

    (void)envp;
    path = argc > 1 ? argv[1] : "data.txt";
    memcpy(expected, part1, (size_t)LEN1);
    memcpy(expected + LEN1, part2, (size_t)LEN2);
    printf("files: path=%s\n", path);

    /* create and write in two pieces */
    fd = hc_open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
    report_open("O_CREAT|O_RDWR|O_TRUNC 0644", fd);
    CHECK(fd >= 0, "open-create");
    open_fd = fd;
    created = true;

    hc_write(fd, part1, (uint64_t)LEN1);
    printf("write %ld\n", (long)LEN1);
    hc_write(fd, part2, (uint64_t)LEN2);
    printf("write %ld\n", (long)LEN2);

    /* read it back */
    off = hc_lseek(fd, 0, SEEK_SET);
    printf("lseek 0 SEEK_SET = %ld\n", (long)off);
    CHECK(off == 0, "lseek-set");

    memset(buf, 0, sizeof(buf));
    r = hc_read(fd, buf, sizeof(buf));
    printf("read %ld = %ld\n", (long)sizeof(buf), (long)r);
    CHECK(r == TOTAL, "read-back");
    ret = memcmp(buf, expected, (size_t)TOTAL);
    printf("compare = %s\n", ret == 0 ? "ok" : "mismatch");
    CHECK(ret == 0, "compare");

    off = hc_lseek(fd, 0, SEEK_END);
    printf("lseek 0 SEEK_END = %ld\n", (long)off);
    CHECK(off == TOTAL, "lseek-end");

    off = hc_lseek(fd, -5, SEEK_CUR);
    printf("lseek -5 SEEK_CUR = %ld\n", (long)off);
    CHECK(off == TOTAL - 5, "lseek-cur");

    memset(buf, 0, sizeof(buf));
    r = hc_read(fd, buf, 5);
    printf("read 5 = %ld \"%.*s\"\n", (long)r, r > 0 ? (int)r : 0, buf);
    CHECK(r == 5 && memcmp(buf, expected + TOTAL - 5, 5) == 0, "read-tail");

    ret = hc_close(fd);
    printf("close = %d\n", ret);
    open_fd = -1;
    CHECK(ret == 0, "close");

    /* reopen read-only and read everything in chunks until EOF */
    fd = hc_open(path, O_RDONLY, 0);
    report_open("O_RDONLY", fd);
    CHECK(fd >= 0, "reopen");
    open_fd = fd;

    memset(buf, 0, sizeof(buf));
    got = 0;
    for (;;) {
        CHECK(got + CHUNK <= (int64_t)sizeof(buf), "read-all");
        r = hc_read(fd, buf + got, CHUNK);
        printf("read %d = %ld\n", CHUNK, (long)r);
        CHECK(r >= 0, "read-all");
        if (r == 0)
            break;
        got += r;
    }
    CHECK(got == TOTAL, "read-all");
    ret = memcmp(buf, expected, (size_t)TOTAL);
    printf("compare = %s\n", ret == 0 ? "ok" : "mismatch");
    CHECK(ret == 0, "compare-all");

    ret = hc_close(fd);
    printf("close = %d\n", ret);
    open_fd = -1;
    CHECK(ret == 0, "close-reopened");

    /* error paths */
    ret = hc_close(fd);
    printf("close again = %d\n", ret);
    CHECK(ret == -1, "close-again");

    r = hc_read(BAD_FD, buf, 8);
    printf("read fd %d = %ld\n", BAD_FD, (long)r);
    CHECK(r == -1, "read-bad-fd");

    ret = hc_unlink(path);
    printf("unlink %s = %d\n", path, ret);
    CHECK(ret == 0, "unlink");
    created = false;

    fd = hc_open(path, O_RDONLY, 0);
    report_open("O_RDONLY", fd);
    if (fd >= 0)
        open_fd = fd;
    CHECK(fd == -1, "open-after-unlink");

    ret = hc_unlink(path);
    printf("unlink %s = %d\n", path, ret);
    CHECK(ret == -1, "unlink-again");

    printf("files: OK\n");
    return 0;
}
