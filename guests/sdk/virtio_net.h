/*
 * virtio_net.h - a polling driver for the legacy virtio-net device of
 * tracevisor (docs/network.md), part of the guest SDK.
 *
 * Link guests/sdk/virtio_net.c with the program (guestbuild does it for
 * the netecho example).  The driver finds the device with a PCI scan
 * (configuration mechanism #1, ports 0xCF8/0xCFC), talks to its registers
 * through I/O BAR0, keeps both queues (256 entries each) and all buffers
 * in static page-aligned memory (identity mapped, so their addresses are
 * physical addresses), and never uses interrupts: the program polls.
 *
 *     if (vnet_init() < 0) ...                  (vnet_strerror() says why)
 *     for (;;) {
 *         uint32_t len;
 *         const uint8_t *frame = vnet_rx_next(&len);   (NULL: nothing yet)
 *         if (frame) { ...; vnet_rx_release(); }
 *     }
 *     uint8_t *out = vnet_tx_alloc();           (room for VNET_MAX_FRAME bytes)
 *     ... build the frame in out ...; vnet_tx_send(out, len);
 *
 * Frames are Ethernet frames without the 10-byte virtio-net header (the
 * driver adds and strips it).  One vCPU only: no locking.
 */
#ifndef TV_VIRTIO_NET_H
#define TV_VIRTIO_NET_H

#include <stddef.h>
#include <stdint.h>

#define VNET_MAX_FRAME 1514  /* Ethernet header + 1500-byte MTU */
#define VNET_RX_BUFFERS 16
#define VNET_TX_BUFFERS 16

/* Errors returned by vnet_init (negative). */
#define VNET_ENODEV  (-1)   /* no 1AF4:1000 network function on bus 0 */
#define VNET_EBAR    (-2)   /* BAR0 is not a usable I/O BAR */
#define VNET_EQSIZE  (-3)   /* a queue size other than 256, or a missing queue */
#define VNET_EDEVICE (-4)   /* the device set NEEDS_RESET/FAILED during set-up */

struct vnet_info {
    uint8_t  bus, dev, fn;
    uint16_t iobase;       /* BAR0 */
    uint32_t bar_size;     /* from BAR sizing */
    uint32_t host_features;
    uint32_t features;     /* what the driver enabled */
    uint8_t  mac[6];
    int      link_up;      /* -1: the device does not report it */
};

int  vnet_init(void);
const char *vnet_strerror(int err);
const struct vnet_info *vnet_info(void);

/* The oldest received frame, or NULL when none is waiting.  When the used
 * ring is empty it reads the ISR register once: that access is when the
 * device delivers what the host received (no interrupts). */
const uint8_t *vnet_rx_next(uint32_t *len);
/* Give the buffer of the frame vnet_rx_next returned back to the device. */
void vnet_rx_release(void);

/* A free transmit buffer (VNET_MAX_FRAME bytes), or NULL if all are in flight. */
uint8_t *vnet_tx_alloc(void);
/* Send len bytes of a buffer from vnet_tx_alloc (one notify = one exit). */
int vnet_tx_send(uint8_t *frame, uint32_t len);
/* Copying variants. */
int vnet_send(const void *frame, uint32_t len);
int vnet_recv(void *buf, uint32_t cap);

/* Counters. */
struct vnet_stats { uint64_t rx, tx, polls; };
const struct vnet_stats *vnet_stats(void);

#endif /* TV_VIRTIO_NET_H */
