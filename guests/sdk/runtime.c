/*
 * runtime.c - from sdk_entry (called by start.S on its own stack) to main.
 *
 * vCPU 0 fetches the command line and environment with CMDSIZE/CMDVAL into
 * static buffers, then runs exit(main(argc, argv, envp)).  Every other vCPU
 * runs ap_main(cpu) if the program defines one, then parks.
 */
#include "tvguest.h"

/* Weak reference: resolves to a null address when the program has no ap_main. */
extern void ap_main(unsigned cpu) __attribute__((weak));

void sdk_set_bootinfo(const void *bootinfo);
__attribute__((noreturn)) void sdk_entry(const void *bootinfo, uint64_t cpu);

/*
 * Caps.  The host copies every string into the buffer we announce for it
 * without further checks, so either everything fits here or CMDVAL is not
 * issued at all.
 */
#define SDK_ARG_SPACE (128 * 1024)
#define SDK_ENV_SPACE (128 * 1024)

static struct tv_sys_cmdsize cmd_sizes;
static char arg_space[SDK_ARG_SPACE];
static char env_space[SDK_ENV_SPACE];
static char *argv_ptrs[TV_MAX_ARGS + 1];
static char *envp_ptrs[TV_MAX_ENVS + 1];

/* Carve `count` strings of the announced sizes out of `space`. */
static bool layout(int32_t count, const int32_t *sizes, int32_t max,
                   char *space, size_t cap, char **ptrs)
{
    size_t used = 0;

    if (count < 0 || count > max)
        return false;
    for (int32_t i = 0; i < count; i++) {
        if (sizes[i] <= 0 || (size_t)sizes[i] > cap - used)
            return false;
        ptrs[i] = space + used;
        used += (size_t)sizes[i];
    }
    ptrs[count] = NULL;
    return true;
}

static int fetch_command_line(char ***argv, char ***envp)
{
    int32_t argc, envc;

    hc_cmdsize(&cmd_sizes);
    argc = cmd_sizes.argc;
    envc = cmd_sizes.envc;

    if (!layout(argc, cmd_sizes.argsz, TV_MAX_ARGS, arg_space, sizeof(arg_space), argv_ptrs) ||
        !layout(envc, cmd_sizes.envsz, TV_MAX_ENVS, env_space, sizeof(env_space), envp_ptrs)) {
        eprintf("tvguest: command line too large (argc=%d envc=%d); running without arguments\n",
                (int)argc, (int)envc);
        argv_ptrs[0] = NULL;
        envp_ptrs[0] = NULL;
        *argv = argv_ptrs;
        *envp = envp_ptrs;
        return 0;
    }

    if (argc > 0 || envc > 0)
        hc_cmdval(argv_ptrs, envp_ptrs);

    /* Whatever the host wrote, every string ends inside its buffer. */
    for (int32_t i = 0; i < argc; i++)
        argv_ptrs[i][cmd_sizes.argsz[i] - 1] = '\0';
    for (int32_t i = 0; i < envc; i++)
        envp_ptrs[i][cmd_sizes.envsz[i] - 1] = '\0';

    *argv = argv_ptrs;
    *envp = envp_ptrs;
    return (int)argc;
}

void tv_park(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}

void exit(int code)
{
    fflush_stdout();
    hc_exit(code);
}

void sdk_entry(const void *bootinfo, uint64_t cpu)
{
    char **argv, **envp;
    int argc;

    sdk_set_bootinfo(bootinfo);

    if (cpu != 0) {
        if (ap_main)
            ap_main((unsigned)cpu);
        tv_park();
    }

    argc = fetch_command_line(&argv, &envp);
    exit(main(argc, argv, envp));
}
