/*
 * compute: integer work plus one UART byte per iteration.
 *
 * argv[1] = N (default 1000; negative counts as 0).  Iteration i (0-based):
 *     x ^= x << 13;  x ^= x >> 7;  x ^= x << 17;          (xorshift64)
 *     sum = (sum ^ x) * 0x100000001B3 + i                 (mod 2^64)
 * starting from x = 0x9E3779B97F4A7C15, sum = 0; then one `outb` of '.' to
 * port 0x800, and after every 64th iteration one more `outb` of '\n'.
 * After the loop a final '\n' goes to the UART if N is not a multiple of 64,
 * then stdout gets "compute: N=<N> checksum=<sum as 16 lowercase hex digits>\n".
 * exit 0.
 */
#include "tvguest.h"

int main(int argc, char **argv, char **envp)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    uint64_t sum = 0;

    (void)envp;
    if (n < 0)
        n = 0;

    for (uint64_t i = 0; i < (uint64_t)n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum = (sum ^ x) * 0x100000001B3ULL + i;
        outb(TV_PORT_UART, '.');
        if ((i + 1) % 64 == 0)
            outb(TV_PORT_UART, '\n');
    }
    if (n % 64 != 0)
        outb(TV_PORT_UART, '\n');

    printf("compute: N=%ld checksum=%016lx\n", n, sum);
    return 0;
}
