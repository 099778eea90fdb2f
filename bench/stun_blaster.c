/*
 * Closed-loop STUN Binding load generator for bench/stun_bench.py.
 *
 * Keeps WINDOW requests (Binding + FINGERPRINT, 28 bytes) outstanding on each
 * of SOCKETS connected UDP sockets, with recvmmsg/sendmmsg so that the
 * generator costs little more than the kernel's own work and the server under
 * test is the bottleneck.  It busy-polls its own core; "busy" in the output
 * is the time it spent on responses rather than on polling empty sockets.  Every response is checked cheaply (length equal to
 * the first one's, Binding success type, magic cookie, one of our
 * transaction ids); SAMPLES of them are printed in hex with the socket's
 * local port so that the Python side decodes them with the real codec.
 *
 * usage: stun_blaster HOST PORT SOCKETS WINDOW WARMUP_S DURATION_S
 * prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXSOCK 64
#define BATCH 64
#define NREQ 64
#define SAMPLES 32
#define SAMPLE_EVERY 4096

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static int nsock, window;
static int fds[MAXSOCK], outstanding[MAXSOCK], local_port[MAXSOCK];
static unsigned next_req[MAXSOCK];
static unsigned char req[MAXSOCK][NREQ][28];

static void refill(int i, int n) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    while (n > 0) {
        int k = n < BATCH ? n : BATCH;
        for (int j = 0; j < k; j++) {
            iov[j].iov_base = req[i][(next_req[i] + j) % NREQ];
            iov[j].iov_len = 28;
            memset(&msgs[j], 0, sizeof msgs[j]);
            msgs[j].msg_hdr.msg_iov = &iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
        }
        int sent = sendmmsg(fds[i], msgs, k, 0);
        if (sent <= 0) return;
        next_req[i] += sent;
        outstanding[i] += sent;
        n -= sent;
    }
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT SOCKETS WINDOW WARMUP DURATION\n", argv[0]);
        return 2;
    }
    crc_init();
    struct sockaddr_in target = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &target.sin_addr);
    nsock = atoi(argv[3]);
    window = atoi(argv[4]);
    double warmup = atof(argv[5]), duration = atof(argv[6]);
    if (nsock < 1 || nsock > MAXSOCK) return 2;
    int ep = epoll_create1(0);
    srand((unsigned)time(NULL) ^ getpid());
    for (int i = 0; i < nsock; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        int buf = 1 << 20;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
        struct sockaddr_in local = {.sin_family = AF_INET};
        inet_pton(AF_INET, argv[1], &local.sin_addr);
        if (bind(fds[i], (struct sockaddr *)&local, sizeof local) ||
            connect(fds[i], (struct sockaddr *)&target, sizeof target)) {
            perror("socket");
            return 1;
        }
        socklen_t len = sizeof local;
        getsockname(fds[i], (struct sockaddr *)&local, &len);
        local_port[i] = ntohs(local.sin_port);
        for (int r = 0; r < NREQ; r++) {
            unsigned char *p = req[i][r];
            p[0] = 0; p[1] = 1; p[2] = 0; p[3] = 8;               /* Binding request, length 8 */
            p[4] = 0x21; p[5] = 0x12; p[6] = 0xA4; p[7] = 0x42;    /* magic cookie */
            p[8] = 0x4E; p[9] = 0x42; p[10] = i; p[11] = r;         /* txid: "NB", socket, index */
            for (int b = 12; b < 20; b++) p[b] = rand() & 0xFF;
            p[20] = 0x80; p[21] = 0x28; p[22] = 0; p[23] = 4;       /* FINGERPRINT */
            uint32_t fp = crc32(p, 20) ^ 0x5354554Eu;
            p[24] = fp >> 24; p[25] = fp >> 16; p[26] = fp >> 8; p[27] = fp;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    for (int i = 0; i < nsock; i++) refill(i, window);

    static unsigned char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long long valid = 0, invalid = 0, valid0 = 0, invalid0 = 0, refills = 0;
    int expected = 0, nsamples = 0;
    static char samples[SAMPLES][2 * 2048 + 1];
    int sample_port[SAMPLES];
    /* busy_time: time spent handling responses and sending, i.e. not
     * polling an empty socket set; its share of the run says how close the
     * generator came to being the bottleneck. */
    double start = now(), t0 = 0, cpu0 = 0, last = start, busy_time = 0;
    int measuring = 0;
    for (;;) {
        double t = now();
        if (!measuring && t >= start + warmup) {
            measuring = 1;
            t0 = t;
            cpu0 = cpu();
            valid0 = valid;
            invalid0 = invalid;
        }
        if (measuring && t >= t0 + duration) break;
        struct epoll_event events[MAXSOCK];
        /* Busy-poll: the generator never sleeps, so the server's sends never
         * pay for waking it up (a cross-CPU interrupt, costly in a VM) --
         * as with real clients on other machines. */
        int n = epoll_wait(ep, events, MAXSOCK, 0);
        if (n <= 0) {
            if (now() - last > 0.2) {
                for (int i = 0; i < nsock; i++) {
                    outstanding[i] = 0;
                    refill(i, window);
                }
                refills++;
                last = now();
            }
            continue;
        }
        last = t;
        for (int e = 0; e < n; e++) {
            int i = events[e].data.u32;
            for (;;) {
                for (int j = 0; j < BATCH; j++) {
                    iov[j].iov_base = bufs[j];
                    iov[j].iov_len = sizeof bufs[j];
                    memset(&msgs[j], 0, sizeof msgs[j]);
                    msgs[j].msg_hdr.msg_iov = &iov[j];
                    msgs[j].msg_hdr.msg_iovlen = 1;
                }
                int got = recvmmsg(fds[i], msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0) break;
                for (int j = 0; j < got; j++) {
                    unsigned char *p = bufs[j];
                    int len = msgs[j].msg_len;
                    int ok = len >= 20 && p[0] == 1 && p[1] == 1 && p[4] == 0x21 &&
                             p[5] == 0x12 && p[6] == 0xA4 && p[7] == 0x42 && p[8] == 0x4E &&
                             p[9] == 0x42 && p[10] == i && p[11] < NREQ &&
                             ((p[2] << 8) | p[3]) == len - 20;
                    if (ok && expected == 0) expected = len;
                    if (ok && len == expected) {
                        valid++;
                        if (valid % SAMPLE_EVERY == 1 && nsamples < SAMPLES) {
                            for (int b = 0; b < len; b++) sprintf(samples[nsamples] + 2 * b, "%02x", p[b]);
                            sample_port[nsamples++] = local_port[i];
                        }
                    } else {
                        invalid++;
                    }
                }
                outstanding[i] -= got;
                if (got < BATCH) break;
            }
            if (outstanding[i] < 0) outstanding[i] = 0;
            refill(i, window - outstanding[i]);
        }
        if (measuring) busy_time += now() - t;
    }
    double elapsed = now() - t0, used = cpu() - cpu0;
    printf("{\"valid\": %lld, \"invalid\": %lld, \"seconds\": %.6f, \"cpu\": %.6f, "
           "\"busy\": %.6f, \"refills\": %lld, \"response_bytes\": %d, \"samples\": [",
           valid - valid0, invalid - invalid0, elapsed, used, busy_time, refills, expected);
    for (int s = 0; s < nsamples; s++)
        printf("%s[%d, \"%s\"]", s ? ", " : "", sample_port[s], samples[s]);
    printf("]}\n");
    return 0;
}
