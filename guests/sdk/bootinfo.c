/*
 * bootinfo.c - accessors for the 120-byte boot information block (Hermit
 * entry version 2) that the hypervisor writes at 0x9000 and passes in RDI.
 *
 *   off  8  u64  phys_addr_end (RAM size)     off 88  u64  num_cpus
 *   off 16  u16  serial_port_base             off 96  u32  cpu_freq (kHz)
 *   off 24  u64  kernel_image_addr_start      off 104 i128 boot_time (ns)
 *   off 32  u64  kernel_image_addr_end
 *
 * Fields are read with volatile loads: the block is written by the host.
 */
#include "tvguest.h"

void sdk_set_bootinfo(const void *bootinfo);

static const volatile uint8_t *bootinfo_ptr;

void sdk_set_bootinfo(const void *bootinfo)
{
    bootinfo_ptr = bootinfo ? (const volatile uint8_t *)bootinfo
                            : (const volatile uint8_t *)TV_BOOTINFO_ADDR;
}

const volatile uint8_t *tv_bootinfo(void)
{
    return bootinfo_ptr ? bootinfo_ptr : (const volatile uint8_t *)TV_BOOTINFO_ADDR;
}

static uint64_t field64(size_t off)
{
    return *(const volatile uint64_t *)(tv_bootinfo() + off);
}

uint64_t tv_ram_size(void)     { return field64(8); }
uint64_t tv_image_start(void)  { return field64(24); }
uint64_t tv_image_end(void)    { return field64(32); }
uint16_t tv_serial_port(void)  { return *(const volatile uint16_t *)(tv_bootinfo() + 16); }
uint32_t tv_cpu_freq_khz(void) { return *(const volatile uint32_t *)(tv_bootinfo() + 96); }

uint64_t tv_num_cpus(void)
{
    uint64_t n = field64(88);
    return n ? n : 1;
}

int64_t tv_boot_time_ns(void)
{
    uint64_t lo = field64(104);
    int64_t hi = (int64_t)field64(112);

    if (hi == 0 && lo <= (uint64_t)INT64_MAX)
        return (int64_t)lo;
    if (hi == -1 && lo > (uint64_t)INT64_MAX)
        return (int64_t)lo;
    return hi < 0 ? INT64_MIN : INT64_MAX;
}
