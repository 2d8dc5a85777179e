/*
 * start.S - entry point of every SDK guest.
 *
 * The hypervisor starts each vCPU in 64-bit long mode at _start with
 *   RDI = 0x9000 (boot information), RSI = vCPU number,
 *   RSP = load address - 0x8000 = the LOWEST address of the shared 32 KiB
 *         boot stack (pushing on it would write below the stack),
 *   RFLAGS = 2 (interrupts off), no IDT.
 *
 * We give every vCPU its own 64 KiB stack out of sdk_cpu_stacks (in .bss,
 * zeroed by the loader) and call sdk_entry(bootinfo, cpu) with RDI/RSI
 * unchanged.  A vCPU numbered SDK_MAX_CPUS or higher has no stack: it
 * prints a message on stderr and ends the VM with exit code 99.
 *
 * Only RIP-relative addressing is used, so the same code works in the
 * position-dependent and the static-PIE builds.
 */

#define SDK_MAX_CPUS    8
#define SDK_STACK_SHIFT 16                  /* 64 KiB per vCPU */
#define SDK_STACK_SIZE  (1 << SDK_STACK_SHIFT)

#define PORT_WRITE 0x400
#define PORT_EXIT  0x540

    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    cmpq    $SDK_MAX_CPUS, %rsi
    jae     .Ltoo_many_cpus

    /* top of this vCPU's stack = sdk_cpu_stacks + (cpu + 1) * 64 KiB */
    leaq    1(%rsi), %rax
    shlq    $SDK_STACK_SHIFT, %rax
    leaq    sdk_cpu_stacks(%rip), %rsp
    addq    %rax, %rsp
    /* RSP is 16-byte aligned here, so after the CALL pushes the return
       address, RSP + 8 is 16-byte aligned at sdk_entry's first instruction,
       as the SysV ABI requires. */
    xorl    %ebp, %ebp
    call    sdk_entry                       /* (RDI = bootinfo, RSI = cpu) */
    jmp     .Lpark                          /* sdk_entry does not return */

.Ltoo_many_cpus:
    /* No stack: the argument blocks are static. */
    leaq    sdk_too_many_write(%rip), %rax
    movw    $PORT_WRITE, %dx
    outl    %eax, %dx
    leaq    sdk_too_many_exit(%rip), %rax
    movw    $PORT_EXIT, %dx
    outl    %eax, %dx
.Lpark:
    cli
    hlt
    jmp     .Lpark
    .size _start, . - _start

    .section .rodata.sdk_start, "a", @progbits
sdk_too_many_msg:
    .ascii  "tvguest: vCPU number too large (the SDK supports 8 vCPUs)\n"
    .set    sdk_too_many_len, . - sdk_too_many_msg

    /* Packed argument blocks.  The WRITE block holds an absolute address,
       which a static-PIE build turns into an R_X86_64_RELATIVE relocation,
       so it lives in writable data (like .data.rel.ro). */
    .section .data.sdk_start, "aw", @progbits
    .balign 8
sdk_too_many_write:                         /* SysWrite: fd, buf, len */
    .long   2
    .quad   sdk_too_many_msg
    .quad   sdk_too_many_len
    .balign 8
sdk_too_many_exit:                          /* SysExit: arg */
    .long   99

    .section .bss.sdk_stacks, "aw", @nobits
    .balign 4096
    .globl sdk_cpu_stacks
    .type sdk_cpu_stacks, @object
sdk_cpu_stacks:
    .skip   SDK_MAX_CPUS * SDK_STACK_SIZE
    .size sdk_cpu_stacks, . - sdk_cpu_stacks

    .section .note.GNU-stack, "", @progbits
