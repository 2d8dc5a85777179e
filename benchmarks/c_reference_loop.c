/*
 * The C reference for the exit-cost benchmarks: the same kind of exit tracevisor serves for the
 * `compute` guest (a 1-byte OUT to port 0x800, handled in user space), with the raw KVM API and
 * nothing else.  The guest is 16 bytes of real-mode code, so no page tables or GDT are needed:
 *
 *     mov ecx, N ; mov dx, 0x800 ; mov al, '.' ; L: out dx, al ; dec ecx ; jnz L ; hlt
 *
 * Usage: c_reference_loop N   → prints "exits=<n> seconds=<s> us_per_exit=<x>"
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 0) : 200000;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    size_t memsz = 0x10000;
    uint8_t *mem = mmap(NULL, memsz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    uint8_t code[] = {
        0x66, 0xb9, 0, 0, 0, 0,   /* mov ecx, imm32 */
        0xba, 0x00, 0x08,         /* mov dx, 0x800 */
        0xb0, '.',                /* mov al, '.' */
        0xee,                     /* L: out dx, al */
        0x66, 0x49,               /* dec ecx */
        0x75, 0xfb,               /* jnz L */
        0xf4,                     /* hlt */
    };
    memcpy(code + 2, &n, 4);
    memcpy(mem + 0x1000, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = memsz, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0x1000, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    struct timespec t0, t1;
    uint64_t exits = 0, sum = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x800) {
            sum += *((volatile uint8_t *)run + run->io.data_offset);
            exits++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT) break;
        fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("exits=%llu seconds=%.6f us_per_exit=%.3f checksum=%llu\n", (unsigned long long)exits, s,
           s * 1e6 / (exits ? exits : 1), (unsigned long long)sum);
    return 0;
}
