// Guest-side transient pins, the failure mode of seed 001: something in the guest holds extra
// references on movable pages that live in the CMA area (there, buffer heads on the bh LRU; here,
// pages spliced into a pipe with vmsplice(), as zero-copy I/O does), so that cma_alloc() cannot
// migrate them for a while and gives up on that range.
//
// usage: guestpin SECONDS HOLD_US INFLIGHT   (SIGTERM ends it early)
// Allocates memory (which lands in the CMA area once most free memory is there), finds through
// /proc/self/pagemap which of its pages are in the area (cma=SIZE@BASE on the command line), and
// keeps INFLIGHT of them referenced by a pipe, each for HOLD_US, until SECONDS have passed.
// Prints "DMAVISOR-RESULT guestpin pins=N cma_pages=M".
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BUF_MIB 32
#define PAGE 4096ul

static volatile sig_atomic_t stop;
static void on_term(int sig) {
  (void)sig;
  stop = 1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t parse_size(const char *s, char **end) {
  uint64_t v = strtoull(s, end, 0);
  switch (**end) {
  case 'G': v <<= 10; /* fall through */
  case 'M': v <<= 10; /* fall through */
  case 'K': v <<= 10; (*end)++;
  }
  return v;
}

// The CMA area from cma=SIZE@BASE, in page frame numbers.
static int cma_area(uint64_t *first, uint64_t *end) {
  char line[4096] = {0};
  FILE *f = fopen("/proc/cmdline", "r");
  if (!f || !fgets(line, sizeof line, f)) return -1;
  fclose(f);
  char *p = strstr(line, "cma=");
  if (!p) return -1;
  char *e;
  uint64_t size = parse_size(p + 4, &e);
  if (*e != '@') return -1;
  uint64_t base = parse_size(e + 1, &e);
  *first = base / PAGE;
  *end = (base + size) / PAGE;
  return 0;
}

// Indices of buf's pages whose frames are in [first, end).
static size_t pages_in_area(uint8_t *buf, size_t pages, uint64_t first, uint64_t end, size_t *out) {
  static uint64_t *entries;
  if (!entries) entries = calloc(pages, sizeof *entries);
  int fd = open("/proc/self/pagemap", O_RDONLY);
  size_t n = 0;
  off_t at = (off_t)((uintptr_t)buf / PAGE * sizeof *entries);
  ssize_t got = fd < 0 ? -1 : pread(fd, entries, pages * sizeof *entries, at);
  for (size_t i = 0; got > 0 && i < (size_t)got / sizeof *entries; i++) {
    uint64_t pfn = entries[i] & ((1ull << 55) - 1);
    if ((entries[i] >> 63) && pfn >= first && pfn < end) out[n++] = i;
  }
  if (fd >= 0) close(fd);
  return n;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s SECONDS HOLD_US INFLIGHT\n", argv[0]);
    return 2;
  }
  double end_time = now() + atof(argv[1]);
  useconds_t hold = (useconds_t)atoi(argv[2]);
  int inflight = atoi(argv[3]);
  uint64_t first, end;
  if (cma_area(&first, &end) != 0 || inflight < 1 || inflight > 16) {
    printf("DMAVISOR-RESULT guestpin error=no_cma_area_or_bad_args\n");
    return 1;
  }
  size_t pages = (BUF_MIB << 20) / PAGE;
  uint8_t *buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (buf == MAP_FAILED) return 1;
  memset(buf, 0x5a, pages * PAGE);
  size_t *in_area = calloc(pages, sizeof *in_area);
  int fds[2];
  if (pipe(fds) != 0) return 1;
  uint8_t sink[PAGE];
  unsigned long pins = 0, seen = 0;
  size_t n = 0;
  double refresh = 0;
  signal(SIGTERM, on_term);
  while (now() < end_time && !stop) {
    if (now() >= refresh) {
      // The kernel migrates our pages out of the area when it can: look again now and then,
      // and when few are left, take fresh memory (the kernel puts new movable pages in the
      // area whenever it holds more than half of the free memory).
      n = pages_in_area(buf, pages, first, end, in_area);
      if (n < 64) {
        munmap(buf, pages * PAGE);
        buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (buf == MAP_FAILED) return 1;
        memset(buf, 0x5a, pages * PAGE);
        n = pages_in_area(buf, pages, first, end, in_area);
      }
      if (n > seen) seen = n;
      refresh = now() + 0.1;
    }
    if (n == 0) {
      usleep(hold);
      continue;
    }
    int k = 0;
    for (; k < inflight; k++) {
      struct iovec iov = {buf + in_area[(size_t)rand() % n] * PAGE, PAGE};
      if (vmsplice(fds[1], &iov, 1, 0) != (ssize_t)PAGE) break;
      pins++;
    }
    usleep(hold);
    for (int j = 0; j < k; j++)
      if (read(fds[0], sink, PAGE) != (ssize_t)PAGE) break;
  }
  printf("DMAVISOR-RESULT guestpin pins=%lu cma_pages=%lu\n", pins, seen);
  return 0;
}
