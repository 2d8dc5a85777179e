/*
 * note.S - the Hermit entry-version note that makes an ELF a "Hermit kernel"
 * of entry version 2 (the boot protocol of uhyve 0.2.x).
 *
 * Standard ELF note layout: namesz = 7 ("HERMIT\0"), descsz = 1,
 * type = 0x5A00, the name padded to 8 bytes, the single descriptor byte
 * (the entry version) padded to 4.  The linker script puts this section
 * first in the first PT_NOTE segment.
 */
    .section .note.hermit.entry-version, "a", @note
    .balign 4
    .long   7                   /* n_namesz */
    .long   1                   /* n_descsz */
    .long   0x5a00              /* n_type: NT_HERMIT_ENTRY_VERSION */
    .asciz  "HERMIT"            /* 7 bytes */
    .balign 4                   /* name padded to 8 */
    .byte   2                   /* entry version */
    .balign 4                   /* descriptor padded to 4 */

    .section .note.GNU-stack, "", @progbits
