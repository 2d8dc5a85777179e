/*
 * args: prints the command line and the environment the host passed with
 * CMDSIZE/CMDVAL:
 *     argc=<N>
 *     argv[<i>]=<argument>        (i = 0 .. N-1; argv[0] is the kernel path)
 *     envc=<M>
 *     env[<i>]=<KEY=VALUE>        (i = 0 .. M-1)
 * exit 0.
 */
#include "tvguest.h"

int main(int argc, char **argv, char **envp)
{
    int envc = 0;

    printf("argc=%d\n", argc);
    for (int i = 0; i < argc; i++)
        printf("argv[%d]=%s\n", i, argv[i]);
    while (envp[envc])
        envc++;
    printf("envc=%d\n", envc);
    for (int i = 0; i < envc; i++)
        printf("env[%d]=%s\n", i, envp[i]);
    return 0;
}
