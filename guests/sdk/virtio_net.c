/*
 * virtio_net.c - polling driver for tracevisor's legacy virtio-net device
 * (see virtio_net.h and docs/network.md).
 */
#include "tvguest.h"
#include "virtio_net.h"

#define PCI_ADDR 0xCF8
#define PCI_DATA 0xCFC

/* legacy register block, offsets in BAR0 */
#define R_HOST_FEATURES  0
#define R_GUEST_FEATURES 4
#define R_QUEUE_PFN      8
#define R_QUEUE_NUM      12
#define R_QUEUE_SEL      14
#define R_QUEUE_NOTIFY   16
#define R_STATUS         18
#define R_ISR            19
#define R_MAC            20
#define R_NET_STATUS     26

#define F_MAC    (1u << 5)
#define F_STATUS (1u << 16)

#define S_ACK         1
#define S_DRIVER      2
#define S_DRIVER_OK   4
#define S_NEEDS_RESET 0x40
#define S_FAILED      0x80

#define QSIZE 256
#define RXQ 0
#define TXQ 1
#define NET_HDR 10
#define BUF_SIZE 2048   /* >= NET_HDR + VNET_MAX_FRAME */

#define DESC_F_NEXT  1
#define DESC_F_WRITE 2
#define USED_F_NO_NOTIFY 1

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_avail { uint16_t flags; uint16_t idx; uint16_t ring[QSIZE]; uint16_t used_event; };
struct vring_used_elem { uint32_t id; uint32_t len; };
struct vring_used { uint16_t flags; uint16_t idx; struct vring_used_elem ring[QSIZE]; uint16_t avail_event; };

_Static_assert(sizeof(struct vring_desc) == 16, "descriptor is 16 bytes");
_Static_assert(sizeof(struct vring_avail) == 6 + 2 * QSIZE, "available ring layout");
_Static_assert(sizeof(struct vring_used) == 6 + 8 * QSIZE + 2, "used ring layout");

/* The legacy layout with 4096-byte alignment: descriptors, then the
 * available ring, then (at the next page) the used ring: 3 pages. */
struct vqueue_mem {
    struct vring_desc desc[QSIZE];                 /* 4096 bytes */
    struct vring_avail avail;                      /* 518 bytes  */
    uint8_t pad[4096 - sizeof(struct vring_avail)];
    struct vring_used used;                        /* at +8192   */
} __attribute__((aligned(4096)));

_Static_assert(__builtin_offsetof(struct vqueue_mem, used) == 8192, "used ring at +8192");

struct vqueue {
    struct vqueue_mem *m;
    uint16_t avail_idx;   /* our copy of avail.idx */
    uint16_t used_seen;   /* used entries consumed */
};

static struct vqueue_mem rx_mem, tx_mem;
static uint8_t rx_bufs[VNET_RX_BUFFERS][BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_bufs[VNET_TX_BUFFERS][BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_busy[VNET_TX_BUFFERS];
static struct vqueue rxq = { &rx_mem, 0, 0 }, txq = { &tx_mem, 0, 0 };
static struct vnet_info info;
static struct vnet_stats stats;
static int rx_current = -1;   /* descriptor of the frame vnet_rx_next returned */
static int ready;

#define barrier() __asm__ volatile("" ::: "memory")

static inline uint16_t rd16v(const volatile uint16_t *p) { return *p; }

/* -- PCI ----------------------------------------------------------------- */

static uint32_t pci_read(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off)
{
    outl(PCI_ADDR, 0x80000000u | (uint32_t)bus << 16 | (uint32_t)dev << 11 | (uint32_t)fn << 8 | (off & 0xFC));
    return inl(PCI_DATA);
}

static void pci_write(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off, uint32_t v)
{
    outl(PCI_ADDR, 0x80000000u | (uint32_t)bus << 16 | (uint32_t)dev << 11 | (uint32_t)fn << 8 | (off & 0xFC));
    outl(PCI_DATA, v);
}

static int pci_find(void)
{
    for (unsigned dev = 0; dev < 32; dev++) {
        for (unsigned fn = 0; fn < 8; fn++) {
            uint32_t id = pci_read(0, dev, fn, 0x00);
            if ((id & 0xFFFF) == 0xFFFF) {
                if (fn == 0)
                    break;          /* no device: no other functions */
                continue;
            }
            uint32_t sub = pci_read(0, dev, fn, 0x2C);
            uint32_t cls = pci_read(0, dev, fn, 0x08) >> 8;
            if (id == 0x10001AF4u && (sub >> 16) == 1 && (cls >> 16) == 0x02) {
                info.bus = 0;
                info.dev = (uint8_t)dev;
                info.fn = (uint8_t)fn;
                return 0;
            }
            if (fn == 0 && !(pci_read(0, dev, 0, 0x0C) & 0x00800000u))
                break;              /* single-function device */
        }
    }
    return VNET_ENODEV;
}

/* -- registers ------------------------------------------------------------- */

#define IO(off) ((uint16_t)(info.iobase + (off)))

static void queue_setup(struct vqueue *q)
{
    memset(q->m, 0, sizeof *q->m);
    q->avail_idx = 0;
    q->used_seen = 0;
    outl(IO(R_QUEUE_PFN), (uint32_t)((uintptr_t)q->m >> 12));
}

static void rx_post(uint16_t d)
{
    struct vring_avail *a = &rxq.m->avail;
    a->ring[rxq.avail_idx % QSIZE] = d;
    barrier();
    rxq.avail_idx++;
    *(volatile uint16_t *)&a->idx = rxq.avail_idx;
    barrier();
    if (!(rd16v(&rxq.m->used.flags) & USED_F_NO_NOTIFY))
        outw(IO(R_QUEUE_NOTIFY), RXQ);
}

int vnet_init(void)
{
    int err = pci_find();
    if (err)
        return err;
    uint8_t b = info.bus, d = info.dev, f = info.fn;
    uint32_t bar = pci_read(b, d, f, 0x10);
    if (!(bar & 1))
        return VNET_EBAR;           /* a memory BAR (uhyve 0.2.1's encoding) */
    /* BAR sizing: write all-ones, read back the size mask, restore. */
    pci_write(b, d, f, 0x10, 0xFFFFFFFFu);
    uint32_t mask = pci_read(b, d, f, 0x10) & ~3u;
    pci_write(b, d, f, 0x10, bar);
    info.bar_size = (~mask + 1) & 0xFFFF;
    info.iobase = (uint16_t)(bar & 0xFFFC);
    if (info.bar_size < 28 || info.iobase == 0)
        return VNET_EBAR;
    /* command register: I/O space decoding on */
    uint32_t cmd = pci_read(b, d, f, 0x04);
    pci_write(b, d, f, 0x04, (cmd & 0xFFFF) | 1);

    outb(IO(R_STATUS), 0);                         /* reset */
    outb(IO(R_STATUS), S_ACK);
    outb(IO(R_STATUS), S_ACK | S_DRIVER);
    info.host_features = inl(IO(R_HOST_FEATURES));
    info.features = info.host_features & (F_MAC | F_STATUS);
    outl(IO(R_GUEST_FEATURES), info.features);

    struct vqueue *qs[2] = { &rxq, &txq };
    for (uint16_t i = 0; i < 2; i++) {
        outw(IO(R_QUEUE_SEL), i);
        if (inw(IO(R_QUEUE_NUM)) != QSIZE) {
            outb(IO(R_STATUS), S_FAILED);
            return VNET_EQSIZE;
        }
        queue_setup(qs[i]);
    }
    for (uint16_t i = 0; i < VNET_RX_BUFFERS; i++) {
        struct vring_desc *dsc = &rxq.m->desc[i];
        dsc->addr = (uint64_t)(uintptr_t)rx_bufs[i];
        dsc->len = BUF_SIZE;
        dsc->flags = DESC_F_WRITE;
        dsc->next = 0;
    }
    for (uint16_t i = 0; i < VNET_TX_BUFFERS; i++) {
        struct vring_desc *dsc = &txq.m->desc[i];
        dsc->addr = (uint64_t)(uintptr_t)tx_bufs[i];
        dsc->flags = 0;
        dsc->next = 0;
        tx_busy[i] = 0;
    }
    if (info.features & F_MAC) {
        for (int i = 0; i < 6; i++)
            info.mac[i] = inb(IO(R_MAC + i));
    } else {
        static const uint8_t fallback[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
        memcpy(info.mac, fallback, 6);
    }
    outb(IO(R_STATUS), S_ACK | S_DRIVER | S_DRIVER_OK);
    /* RX buffers go in after DRIVER_OK: the device looks at them at each ISR read. */
    for (uint16_t i = 0; i < VNET_RX_BUFFERS; i++)
        rx_post(i);
    uint8_t st = inb(IO(R_STATUS));
    if (st & (S_NEEDS_RESET | S_FAILED))
        return VNET_EDEVICE;
    info.link_up = (info.features & F_STATUS) ? (inw(IO(R_NET_STATUS)) & 1) : -1;
    ready = 1;
    return 0;
}

const char *vnet_strerror(int err)
{
    switch (err) {
    case 0: return "ok";
    case VNET_ENODEV: return "no virtio-net device (1af4:1000) on PCI bus 0";
    case VNET_EBAR: return "BAR0 of the virtio-net device is not a usable I/O BAR";
    case VNET_EQSIZE: return "the device's queues are not 256 entries";
    case VNET_EDEVICE: return "the device refused the set-up (NEEDS_RESET/FAILED)";
    default: return "unknown error";
    }
}

const struct vnet_info *vnet_info(void) { return &info; }
const struct vnet_stats *vnet_stats(void) { return &stats; }

/* -- receive ------------------------------------------------------------------ */

const uint8_t *vnet_rx_next(uint32_t *len)
{
    if (!ready || rx_current >= 0)
        return NULL;
    struct vring_used *u = &rxq.m->used;
    if (rd16v(&u->idx) == rxq.used_seen) {
        stats.polls++;
        (void)inb(IO(R_ISR));   /* the delivery point: pending frames land in our buffers now */
        barrier();
        if (rd16v(&u->idx) == rxq.used_seen)
            return NULL;
    }
    struct vring_used_elem e = u->ring[rxq.used_seen % QSIZE];
    rxq.used_seen++;
    if (e.id >= VNET_RX_BUFFERS || e.len < NET_HDR || e.len > BUF_SIZE) {
        /* not one of ours, or nonsense: give it back if we can and skip it */
        if (e.id < VNET_RX_BUFFERS)
            rx_post((uint16_t)e.id);
        return NULL;
    }
    rx_current = (int)e.id;
    stats.rx++;
    *len = e.len - NET_HDR;
    return rx_bufs[e.id] + NET_HDR;
}

void vnet_rx_release(void)
{
    if (rx_current < 0)
        return;
    uint16_t d = (uint16_t)rx_current;
    rx_current = -1;
    rx_post(d);
}

int vnet_recv(void *buf, uint32_t cap)
{
    uint32_t len;
    const uint8_t *f = vnet_rx_next(&len);
    if (!f)
        return 0;
    if (len > cap)
        len = cap;
    memcpy(buf, f, len);
    vnet_rx_release();
    return (int)len;
}

/* -- transmit ------------------------------------------------------------------ */

static void tx_reclaim(void)
{
    struct vring_used *u = &txq.m->used;
    while (rd16v(&u->idx) != txq.used_seen) {
        uint32_t id = u->ring[txq.used_seen % QSIZE].id;
        if (id < VNET_TX_BUFFERS)
            tx_busy[id] = 0;
        txq.used_seen++;
    }
}

uint8_t *vnet_tx_alloc(void)
{
    if (!ready)
        return NULL;
    tx_reclaim();
    for (int i = 0; i < VNET_TX_BUFFERS; i++)
        if (!tx_busy[i])
            return tx_bufs[i] + NET_HDR;
    return NULL;
}

int vnet_tx_send(uint8_t *frame, uint32_t len)
{
    uint8_t *buf = frame - NET_HDR;
    uintptr_t off = (uintptr_t)buf - (uintptr_t)tx_bufs;
    if (!ready || (uintptr_t)buf < (uintptr_t)tx_bufs || off % BUF_SIZE || off / BUF_SIZE >= VNET_TX_BUFFERS ||
        len > VNET_MAX_FRAME)
        return -1;
    uint16_t i = (uint16_t)(off / BUF_SIZE);
    memset(buf, 0, NET_HDR);
    tx_busy[i] = 1;
    txq.m->desc[i].len = NET_HDR + len;
    struct vring_avail *a = &txq.m->avail;
    a->ring[txq.avail_idx % QSIZE] = i;
    barrier();
    txq.avail_idx++;
    *(volatile uint16_t *)&a->idx = txq.avail_idx;
    barrier();
    outw(IO(R_QUEUE_NOTIFY), TXQ);
    stats.tx++;
    return 0;
}

int vnet_send(const void *frame, uint32_t len)
{
    if (len > VNET_MAX_FRAME)
        return -1;
    uint8_t *out = vnet_tx_alloc();
    if (!out)
        return -1;
    memcpy(out, frame, len);
    return vnet_tx_send(out, len);
}
