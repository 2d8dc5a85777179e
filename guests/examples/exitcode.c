/* exitcode: exits with atoi(argv[1]) (0 without an argument); prints nothing. */
#include "tvguest.h"

int main(int argc, char **argv, char **envp)
{
    (void)envp;
    return argc > 1 ? atoi(argv[1]) : 0;
}
