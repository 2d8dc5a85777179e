/*
 * hello-pie: built as a static PIE (ET_DYN linked at 0).  `msg` is an
 * initialised pointer, so the linker emits an R_X86_64_RELATIVE relocation
 * for it; the text is only right if the hypervisor applied it.
 * Prints "Hello from a relocated tracevisor kernel!\n"; exit 0.
 */
#include "tvguest.h"

const char *msg = "Hello from a relocated tracevisor kernel!";

int main(int argc, char **argv, char **envp)
{
    (void)argc;
    (void)argv;
    (void)envp;
    printf("%s\n", msg);
    return 0;
}
