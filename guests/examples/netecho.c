/*
 * netecho: a tiny IPv4 host on the virtio-net device.
 *
 *     netecho [IP [MAXPKTS [PORT [SPIN]]]]
 *
 * Answers ARP requests for IP (default 10.0.0.2), ICMP echo requests to it,
 * and echoes UDP datagrams sent to PORT (default 7) byte for byte.  A UDP
 * datagram whose payload is "quit" (optionally followed by a newline) is
 * answered with "bye\n" and ends the program; so does reaching MAXPKTS
 * handled packets (0, the default, means no limit).  SPIN is the number of
 * idle iterations between two polls of the device (default 100).
 * Exit code 0; 2 when there is no usable network device or bad arguments.
 */
#include "tvguest.h"
#include "virtio_net.h"

#define ETH_ARP  0x0806
#define ETH_IPV4 0x0800

static uint8_t my_ip[4];
static const uint8_t *my_mac;
static unsigned echo_port = 7;
static unsigned long n_arp, n_icmp, n_udp, n_ignored;
static int quit;

static inline unsigned rd16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }
static inline void wr16(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static int parse_ip(const char *s, uint8_t out[4])
{
    for (int i = 0; i < 4; i++) {
        if (*s < '0' || *s > '9')
            return -1;
        unsigned v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4) {
            v = v * 10 + (unsigned)(*s++ - '0');
            digits++;
        }
        if (v > 255 || digits > 3)
            return -1;
        out[i] = (uint8_t)v;
        if (i < 3 && *s++ != '.')
            return -1;
    }
    return *s ? -1 : 0;
}

/* one's-complement sum of 16-bit big-endian words */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t n)
{
    while (n > 1) {
        sum += (uint32_t)p[0] << 8 | p[1];
        p += 2;
        n -= 2;
    }
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static unsigned csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return ~sum & 0xFFFF;
}

static void print_ip(const uint8_t *ip)
{
    printf("%u.%u.%u.%u", ip[0], ip[1], ip[2], ip[3]);
}

static void eth_reply_header(uint8_t *out, const uint8_t *in, unsigned type)
{
    memcpy(out, in + 6, 6);       /* to the sender */
    memcpy(out + 6, my_mac, 6);
    wr16(out + 12, type);
}

static void send_padded(uint8_t *out, uint32_t len)
{
    if (len < 60) {               /* minimum Ethernet frame (without FCS) */
        memset(out + len, 0, 60 - len);
        len = 60;
    }
    vnet_tx_send(out, len);
}

static int handle_arp(const uint8_t *f, uint32_t len)
{
    const uint8_t *a = f + 14;
    if (len < 42 || rd16(a) != 1 || rd16(a + 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4 || rd16(a + 6) != 1)
        return 0;
    if (memcmp(a + 24, my_ip, 4) != 0)
        return 0;
    uint8_t *out = vnet_tx_alloc();
    if (!out)
        return 0;
    eth_reply_header(out, f, ETH_ARP);
    uint8_t *r = out + 14;
    wr16(r, 1);
    wr16(r + 2, ETH_IPV4);
    r[4] = 6;
    r[5] = 4;
    wr16(r + 6, 2);                /* reply */
    memcpy(r + 8, my_mac, 6);
    memcpy(r + 14, my_ip, 4);
    memcpy(r + 18, a + 8, 6);      /* sender's MAC and IP become the target */
    memcpy(r + 24, a + 14, 4);
    send_padded(out, 42);
    n_arp++;
    printf("arp: who-has ");
    print_ip(my_ip);
    printf(" from ");
    print_ip(a + 14);
    printf(" -> replied\n");
    return 1;
}

/* Copy the IPv4 header with addresses swapped and a fresh checksum; returns its length. */
static uint32_t ip_reply_header(uint8_t *out, const uint8_t *ip, uint32_t total)
{
    uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
    memcpy(out, ip, ihl);
    wr16(out + 2, total);
    out[8] = 64;                   /* TTL */
    memcpy(out + 12, ip + 16, 4);
    memcpy(out + 16, ip + 12, 4);
    wr16(out + 10, 0);
    wr16(out + 10, csum_fold(csum_add(0, out, ihl)));
    return ihl;
}

static int handle_icmp(const uint8_t *f, const uint8_t *ip, uint32_t ihl, uint32_t total)
{
    const uint8_t *icmp = ip + ihl;
    uint32_t n = total - ihl;
    if (n < 8 || icmp[0] != 8 || icmp[1] != 0 || csum_fold(csum_add(0, icmp, n)) != 0)
        return 0;
    uint8_t *out = vnet_tx_alloc();
    if (!out)
        return 0;
    eth_reply_header(out, f, ETH_IPV4);
    uint32_t h = ip_reply_header(out + 14, ip, total);
    uint8_t *r = out + 14 + h;
    memcpy(r, icmp, n);
    r[0] = 0;                      /* echo reply */
    wr16(r + 2, 0);
    wr16(r + 2, csum_fold(csum_add(0, r, n)));
    send_padded(out, 14 + total);
    n_icmp++;
    printf("icmp: echo seq=%u from ", rd16(icmp + 6));
    print_ip(ip + 12);
    printf(" (%u bytes) -> replied\n", n);
    return 1;
}

static int handle_udp(const uint8_t *f, const uint8_t *ip, uint32_t ihl, uint32_t total)
{
    const uint8_t *udp = ip + ihl;
    uint32_t n = total - ihl;
    if (n < 8 || rd16(udp + 2) != echo_port || rd16(udp + 4) < 8 || rd16(udp + 4) > n)
        return 0;
    n = rd16(udp + 4);
    const uint8_t *payload = udp + 8;
    uint32_t plen = n - 8;
    int is_quit = (plen == 4 || (plen == 5 && payload[4] == '\n')) && memcmp(payload, "quit", 4) == 0;
    uint8_t *out = vnet_tx_alloc();
    if (!out)
        return 0;
    eth_reply_header(out, f, ETH_IPV4);
    uint32_t rlen = is_quit ? 8 + 4 : n;
    uint32_t h = ip_reply_header(out + 14, ip, ihl + rlen);
    uint8_t *r = out + 14 + h;
    wr16(r, rd16(udp + 2));
    wr16(r + 2, rd16(udp));
    wr16(r + 4, rlen);
    wr16(r + 6, 0);
    if (is_quit)
        memcpy(r + 8, "bye\n", 4);
    else
        memcpy(r + 8, payload, plen);
    /* checksum over the pseudo-header (addresses, protocol, length) and the datagram */
    uint32_t sum = csum_add(0, out + 14 + 12, 8);
    sum += 17 + rlen;
    unsigned c = csum_fold(csum_add(sum, r, rlen));
    wr16(r + 6, c ? c : 0xFFFF);
    send_padded(out, 14 + h + rlen);
    n_udp++;
    printf("udp: ");
    print_ip(ip + 12);
    printf(":%u -> %u, %u bytes -> %s\n", rd16(udp), echo_port, plen, is_quit ? "quit" : "echoed");
    if (is_quit)
        quit = 1;
    return 1;
}

static int handle_ipv4(const uint8_t *f, uint32_t len)
{
    const uint8_t *ip = f + 14;
    if (len < 34 || ip[0] >> 4 != 4)
        return 0;
    uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
    uint32_t total = rd16(ip + 2);
    if (ihl < 20 || total < ihl || total > len - 14 || memcmp(ip + 16, my_ip, 4) != 0)
        return 0;
    if (rd16(ip + 6) & 0x3FFF)     /* a fragment: not handled */
        return 0;
    if (csum_fold(csum_add(0, ip, ihl)) != 0)
        return 0;
    if (ip[9] == 1)
        return handle_icmp(f, ip, ihl, total);
    if (ip[9] == 17)
        return handle_udp(f, ip, ihl, total);
    return 0;
}

int main(int argc, char **argv, char **envp)
{
    (void)envp;
    const char *ip = argc > 1 ? argv[1] : "10.0.0.2";
    long max = argc > 2 ? strtol(argv[2], NULL, 10) : 0;
    long port = argc > 3 ? strtol(argv[3], NULL, 10) : 7;
    long spin = argc > 4 ? strtol(argv[4], NULL, 10) : 100;
    if (parse_ip(ip, my_ip) < 0 || port < 1 || port > 65535 || max < 0 || spin < 0) {
        eprintf("usage: netecho [IP [MAXPKTS [PORT [SPIN]]]]  (e.g. netecho 10.0.0.2 0 7)\n");
        return 2;
    }
    echo_port = (unsigned)port;
    int err = vnet_init();
    if (err < 0) {
        eprintf("netecho: %s\n", vnet_strerror(err));
        return 2;
    }
    const struct vnet_info *nic = vnet_info();
    my_mac = nic->mac;
    printf("netecho: ");
    print_ip(my_ip);
    printf(" at %02x:%02x:%02x:%02x:%02x:%02x (virtio-net %02x:%02x.%x, io %#x), udp echo port %u\n",
           my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5], nic->bus, nic->dev, nic->fn,
           nic->iobase, echo_port);
    printf("netecho: ready\n");

    unsigned long handled = 0;
    while (!quit && (max == 0 || handled < (unsigned long)max)) {
        uint32_t len;
        const uint8_t *f = vnet_rx_next(&len);
        if (!f) {
            for (volatile long i = 0; i < spin; i++)
                ;
            continue;
        }
        static const uint8_t broadcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
        int done = 0;
        if (len >= 14) {
            unsigned type = rd16(f + 12);
            int to_me = memcmp(f, my_mac, 6) == 0;
            if (type == ETH_ARP && (to_me || memcmp(f, broadcast, 6) == 0))
                done = handle_arp(f, len);
            else if (type == ETH_IPV4 && to_me)
                done = handle_ipv4(f, len);
        }
        vnet_rx_release();
        if (done)
            handled++;
        else
            n_ignored++;
    }
    printf("netecho: handled %lu packets (arp %lu, icmp %lu, udp %lu), ignored %lu; bye\n",
           handled, n_arp, n_icmp, n_udp, n_ignored);
    return 0;
}
