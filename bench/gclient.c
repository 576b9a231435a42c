/* The benchmarks' Gearman client in C (raw sockets, no libgearman), so that the client
 * costs as little CPU as Perl's Gearman::XS client did. Same modes and JSON output as
 * gclient.py:
 *
 *   gclient pipelined|sequential PORT FUNCTION COUNT WINDOW WORKLOAD CHECK WARMUP
 *
 * pipelined: up to WINDOW SUBMIT_JOB in flight (0 = all); sequential: one at a time.
 * CHECK 1 counts results that differ from the workload. WARMUP jobs run first, untimed.
 * Built by bench/run.py with `gcc -O2`.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    long created, completed, failed, mismatched;
} counts_t;

static unsigned char *rbuf;
static size_t rlen, rcap;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "gclient: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint32_t be32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

static void parse(counts_t *c, const unsigned char *expect, size_t elen) {
    size_t pos = 0;
    while (rlen - pos >= 12) {
        if (memcmp(rbuf + pos, "\0RES", 4) != 0) {
            fprintf(stderr, "gclient: malformed reply\n");
            exit(2);
        }
        uint32_t type = be32(rbuf + pos + 4), size = be32(rbuf + pos + 8);
        if (rlen - pos - 12 < size)
            break;
        unsigned char *body = rbuf + pos + 12;
        switch (type) {
        case 13: /* WORK_COMPLETE */
            c->completed++;
            if (expect) {
                unsigned char *z = memchr(body, 0, size);
                size_t off = z ? (size_t)(z - body) + 1 : size;
                if (!z || size - off != elen || memcmp(body + off, expect, elen) != 0)
                    c->mismatched++;
            }
            break;
        case 8: /* JOB_CREATED */
            c->created++;
            break;
        case 14: /* WORK_FAIL */
        case 19: /* ERROR */
        case 25: /* WORK_EXCEPTION */
            c->failed++;
            break;
        default:
            break;
        }
        pos += 12 + size;
    }
    memmove(rbuf, rbuf + pos, rlen - pos);
    rlen -= pos;
}

static int receive(int fd) {
    if (rcap - rlen < 65536) {
        rcap = rcap * 2 + 65536;
        rbuf = realloc(rbuf, rcap);
        if (!rbuf)
            die("realloc");
    }
    ssize_t n = recv(fd, rbuf + rlen, rcap - rlen, 0);
    if (n == 0) {
        fprintf(stderr, "gclient: gearmand closed the connection\n");
        exit(2);
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        die("recv");
    }
    rlen += (size_t)n;
    return 1;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static unsigned char *make_packet(const char *fn, const char *w, size_t *len) {
    size_t fl = strlen(fn), wl = strlen(w), body = fl + 2 + wl;
    unsigned char *p = malloc(12 + body);
    uint32_t t = htonl(7), s = htonl((uint32_t)body); /* SUBMIT_JOB */
    memcpy(p, "\0REQ", 4);
    memcpy(p + 4, &t, 4);
    memcpy(p + 8, &s, 4);
    memcpy(p + 12, fn, fl);
    p[12 + fl] = 0;
    p[13 + fl] = 0;
    memcpy(p + 14 + fl, w, wl);
    *len = 12 + body;
    return p;
}

static double pipelined(int fd, const unsigned char *pkt, size_t plen, long count, long window,
                        counts_t *c, const unsigned char *expect, size_t elen) {
    if (window <= 0)
        window = count;
    size_t ocap = plen * 2048, olen = 0, opos = 0;
    unsigned char *out = malloc(ocap);
    long sent = 0;
    memset(c, 0, sizeof *c);
    double start = now();
    while (c->completed + c->failed < count) {
        long inflight = sent - c->completed - c->failed;
        if (opos == olen && sent < count && inflight < window) {
            long k = count - sent;
            if (k > window - inflight)
                k = window - inflight;
            if (k > 2048)
                k = 2048;
            for (long i = 0; i < k; i++)
                memcpy(out + i * plen, pkt, plen);
            olen = (size_t)k * plen;
            opos = 0;
            sent += k;
        }
        struct pollfd pfd = {fd, POLLIN | (opos < olen ? POLLOUT : 0), 0};
        if (poll(&pfd, 1, 5000) < 0 && errno != EINTR)
            die("poll");
        if (pfd.revents & POLLOUT) {
            ssize_t n = send(fd, out + opos, olen - opos, MSG_DONTWAIT);
            if (n < 0 && errno != EAGAIN && errno != EINTR)
                die("send");
            if (n > 0)
                opos += (size_t)n;
        }
        if (pfd.revents & (POLLIN | POLLERR | POLLHUP)) {
            if (receive(fd))
                parse(c, expect, elen);
        }
    }
    double seconds = now() - start;
    free(out);
    return seconds;
}

static double sequential(int fd, const unsigned char *pkt, size_t plen, long count, counts_t *c,
                         const unsigned char *expect, size_t elen) {
    memset(c, 0, sizeof *c);
    double start = now();
    for (long i = 0; i < count; i++) {
        if (send(fd, pkt, plen, 0) != (ssize_t)plen)
            die("send");
        while (c->completed + c->failed <= i) {
            if (receive(fd))
                parse(c, expect, elen);
        }
    }
    return now() - start;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: gclient pipelined|sequential PORT FUNCTION COUNT WINDOW "
                        "WORKLOAD CHECK WARMUP\n");
        return 64;
    }
    int seq = strcmp(argv[1], "sequential") == 0;
    int port = atoi(argv[2]);
    const char *fn = argv[3];
    long count = atol(argv[4]), window = atol(argv[5]);
    const char *w = argv[6];
    int check = atoi(argv[7]);
    long warmup = atol(argv[8]);
    size_t plen, elen = strlen(w);
    unsigned char *pkt = make_packet(fn, w, &plen);
    const unsigned char *expect = check ? (const unsigned char *)w : NULL;
    int fd = connect_to(port);
    counts_t c;
    if (warmup > 0)
        pipelined(fd, pkt, plen, warmup, 0, &c, NULL, 0);
    double seconds = seq ? sequential(fd, pkt, plen, count, &c, expect, elen)
                         : pipelined(fd, pkt, plen, count, window, &c, expect, elen);
    close(fd);
    printf("{\"jobs\": %ld, \"completed\": %ld, \"failed\": %ld, \"mismatched\": %ld, "
           "\"errors\": [], \"seconds\": %.6f, \"rate\": %.3f}\n",
           count, c.completed, c.failed, c.mismatched, seconds,
           seconds > 0 ? c.completed / seconds : 0.0);
    return 0;
}
