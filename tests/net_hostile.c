/*
 * net_hostile: programs the virtio-net device by hand, then hands it a
 * malformed ring (one per mode).  The hypervisor must stop the VM with a
 * device error; if the guest gets past the attack it exits 42.
 *
 *     net_hostile outside|overflow|wrap|cycle|avail|rx-avail|pfn
 */
#include "tvguest.h"

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

static uint8_t rxq[3 * 4096] __attribute__((aligned(4096)));
static uint8_t txq[3 * 4096] __attribute__((aligned(4096)));
static uint8_t buf[4096] __attribute__((aligned(4096)));
static uint16_t io;

static uint32_t pci_read(uint8_t off)
{
    outl(0xCF8, 0x80000000u | off);
    return inl(0xCFC);
}

static void setup(int driver_ok)
{
    io = (uint16_t)(pci_read(0x10) & 0xFFFC);
    outb(io + 18, 0);
    outb(io + 18, 1);
    outb(io + 18, 3);
    outl(io + 4, inl(io + 0));
    outw(io + 14, 0);
    outl(io + 8, (uint32_t)((uintptr_t)rxq >> 12));
    outw(io + 14, 1);
    outl(io + 8, (uint32_t)((uintptr_t)txq >> 12));
    if (driver_ok)
        outb(io + 18, 7);
}

static void offer(uint8_t *q, uint16_t head, uint16_t idx)
{
    volatile uint16_t *avail = (volatile uint16_t *)(q + 4096);
    avail[2] = head;
    avail[1] = idx;
}

int main(int argc, char **argv, char **envp)
{
    (void)envp;
    const char *mode = argc > 1 ? argv[1] : "";
    struct desc *tx = (struct desc *)txq;
    printf("net_hostile: %s\n", mode);
    if (strcmp(mode, "pfn") == 0) {
        setup(0);
        outw(io + 14, 0);
        outl(io + 8, 0xFFFFFFFFu);            /* the ring would lie far outside RAM */
        return 42;
    }
    setup(1);
    tx[0] = (struct desc){ (uint64_t)(uintptr_t)buf, 64, 0, 0 };
    if (strcmp(mode, "outside") == 0)
        tx[0].addr = tv_ram_size() + 0x1000;
    else if (strcmp(mode, "overflow") == 0)
        tx[0].len = 0xFFFFFFF0u;
    else if (strcmp(mode, "wrap") == 0)
        tx[0] = (struct desc){ 0xFFFFFFFFFFFFF000ull, 0x2000, 0, 0 };
    else if (strcmp(mode, "cycle") == 0) {
        tx[0] = (struct desc){ (uint64_t)(uintptr_t)buf, 64, 1, 1 };
        tx[1] = (struct desc){ (uint64_t)(uintptr_t)buf, 64, 1, 0 };
    } else if (strcmp(mode, "avail") == 0) {
        offer(txq, 0, 40000);
        outw(io + 16, 1);
        return 42;
    } else if (strcmp(mode, "rx-avail") == 0) {
        offer(rxq, 0, 1000);
        (void)inb(io + 19);                   /* an ISR read looks at the RX ring */
        return 42;
    } else {
        eprintf("usage: net_hostile outside|overflow|wrap|cycle|avail|rx-avail|pfn\n");
        return 2;
    }
    offer(txq, 0, 1);
    outw(io + 16, 1);                         /* notify TX */
    return 42;
}
