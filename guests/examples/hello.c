/* hello: prints "Hello from tracevisor!\n" on stdout (WRITE, fd 1); exit 0. */
#include "tvguest.h"

int main(int argc, char **argv, char **envp)
{
    (void)argc;
    (void)argv;
    (void)envp;
    printf("Hello from %s!\n", "tracevisor");
    return 0;
}
