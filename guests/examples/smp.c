/*
 * smp: vCPU 1 computes 1 + 2 + ... + 10000 in ap_main, publishes the
 * result and raises a flag, then parks.  vCPU 0 spins (PAUSE) on the flag
 * and prints
 *     smp: cpus=<num_cpus from the boot info> cpu1 result=50005000
 * on stdout; exit 0.  Other vCPUs (2, 3, ...) park at once.
 * With 1 vCPU: "smp: needs 2 vCPUs\n" on stderr, exit 2.
 * If vCPU 1 never reports (about 10 s): "smp: timeout waiting for cpu1\n" on
 * stderr, exit 3.
 */
#include "tvguest.h"

/* Small on purpose: on some hosts guest instructions run emulated (~1 us each). */
#define SMP_LIMIT 10000ULL

static volatile uint64_t cpu1_result;
static volatile uint32_t cpu1_done;

void ap_main(unsigned cpu)
{
    uint64_t sum = 0;

    if (cpu != 1)
        return;
    for (uint64_t i = 1; i <= SMP_LIMIT; i++) {
        sum += i;
        /* Keep the loop a loop (no closed form). */
        __asm__ volatile("" : "+r"(sum));
    }
    cpu1_result = sum;
    tv_store32(&cpu1_done, 1);
}

static bool wait_for_cpu1(void)
{
    uint32_t khz = tv_cpu_freq_khz();
    uint64_t budget = (uint64_t)khz * 1000ULL * 10ULL;   /* ~10 s of TSC ticks */
    uint64_t start = tv_rdtsc();
    uint64_t spins = 0;

    while (!tv_load32(&cpu1_done)) {
        tv_pause();
        if (budget ? tv_rdtsc() - start > budget : ++spins > (1ULL << 24))
            return false;
    }
    return true;
}

int main(int argc, char **argv, char **envp)
{
    uint64_t cpus = tv_num_cpus();

    (void)argc;
    (void)argv;
    (void)envp;
    if (cpus < 2) {
        eprintf("smp: needs 2 vCPUs\n");
        return 2;
    }
    if (!wait_for_cpu1()) {
        eprintf("smp: timeout waiting for cpu1\n");
        return 3;
    }
    printf("smp: cpus=%lu cpu1 result=%lu\n", cpus, tv_load64(&cpu1_result));
    return 0;
}
