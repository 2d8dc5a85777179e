/*
 * plain: a minimal static ELF executable WITHOUT the Hermit note and without
 * the SDK runtime (only tvguest.h's inline port I/O and block layouts).
 * It never uses the boot stack: _start switches to its own stack.
 * Prints "plain ELF\n" with one WRITE on fd 1; exit 0.
 */
#include "tvguest.h"

__attribute__((noreturn, used)) void plain_main(void);

static char plain_stack[16384] __attribute__((aligned(16), used));

__asm__(
    "    .section .text.start, \"ax\", @progbits\n"
    "    .globl _start\n"
    "    .type _start, @function\n"
    "_start:\n"
    "    cli\n"
    "    cld\n"
    "    leaq plain_stack+16384(%rip), %rsp\n"
    "    xorl %ebp, %ebp\n"
    "    call plain_main\n"
    "1:  cli\n"
    "    hlt\n"
    "    jmp 1b\n"
    "    .size _start, . - _start\n"
    "    .text\n");

void plain_main(void)
{
    static const char text[] = "plain ELF\n";
    volatile struct tv_sys_write w = {
        .fd = 1, .buf = (uint64_t)(uintptr_t)text, .len = sizeof(text) - 1,
    };
    volatile struct tv_sys_exit e = { .arg = 0 };

    tv_hypercall(TV_PORT_WRITE, &w);
    tv_hypercall(TV_PORT_EXIT, &e);
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}
