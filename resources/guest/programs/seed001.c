// The seed 001 loop (LKML, "CMA page migration failure due to buffers on bh_lru"): allocate
// COUNT buffers of SIZE from a dma-buf heap, then free them all; repeat for SECONDS. A loop
// fails if any allocation in it failed.
//
// usage: seed001 HEAP_PATH SECONDS SIZE COUNT [LABEL]
// Prints "DMAVISOR-RESULT seed001 heap=H loops=L failed_loops=F failed_allocs=A allocs=N
// p50_us=.. p99_us=.. max_us=.. last_errno=E wall_ms=W cpu_ms=C", with " label=LABEL" if given.
// cpu_ms is the CPU time the loop used (user + system, so the kernel's cma_alloc() work), and
// wall_ms the time it took: the difference is time spent waiting or preempted.
#include <errno.h>
#include <fcntl.h>
#include <linux/dma-heap.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc != 5 && argc != 6) {
    fprintf(stderr, "usage: %s HEAP_PATH SECONDS SIZE COUNT [LABEL]\n", argv[0]);
    return 2;
  }
  const char *heap = argv[1];
  uint64_t deadline = now_ns() + (uint64_t)(atof(argv[2]) * 1e9);
  size_t size = strtoull(argv[3], NULL, 0);
  int count = atoi(argv[4]);
  int heap_fd = open(heap, O_RDONLY | O_CLOEXEC);
  if (heap_fd < 0 || size == 0 || count <= 0 || count > 4096) {
    printf("DMAVISOR-RESULT seed001 heap=%s open=failed errno=%d\n", heap, errno);
    return 1;
  }
  int *fds = calloc((size_t)count, sizeof(int));
  size_t cap = 1 << 16, n = 0;
  uint64_t *lat = calloc(cap, sizeof(uint64_t));
  long loops = 0, failed_loops = 0, failed = 0;
  int last_errno = 0;
  struct rusage ru0, ru1;
  uint64_t start = now_ns();
  getrusage(RUSAGE_SELF, &ru0);
  do {
    int loop_failed = 0;
    for (int i = 0; i < count; i++) {
      struct dma_heap_allocation_data req = {.len = size, .fd_flags = O_RDWR | O_CLOEXEC};
      uint64_t t0 = now_ns();
      int rc = ioctl(heap_fd, DMA_HEAP_IOCTL_ALLOC, &req);
      uint64_t t = now_ns() - t0;
      if (n < cap) lat[n++] = t;
      if (rc < 0) {
        fds[i] = -1;
        loop_failed = 1;
        failed++;
        last_errno = errno;
      } else {
        fds[i] = (int)req.fd;
      }
    }
    for (int i = 0; i < count; i++)
      if (fds[i] >= 0) close(fds[i]);
    loops++;
    failed_loops += loop_failed;
  } while (now_ns() < deadline);
  getrusage(RUSAGE_SELF, &ru1);
  uint64_t wall_ms = (now_ns() - start) / 1000000;
#define TV_MS(tv) ((uint64_t)(tv).tv_sec * 1000 + (uint64_t)(tv).tv_usec / 1000)
  uint64_t cpu_ms = TV_MS(ru1.ru_utime) + TV_MS(ru1.ru_stime) - TV_MS(ru0.ru_utime) - TV_MS(ru0.ru_stime);
  qsort(lat, n, sizeof(uint64_t), cmp);
  printf("DMAVISOR-RESULT seed001 heap=%s loops=%ld failed_loops=%ld failed_allocs=%ld allocs=%zu "
         "p50_us=%llu p99_us=%llu max_us=%llu last_errno=%d wall_ms=%llu cpu_ms=%llu%s%s\n",
         heap, loops, failed_loops, failed, n, (unsigned long long)lat[n / 2] / 1000,
         (unsigned long long)lat[(n * 99) / 100] / 1000, (unsigned long long)lat[n - 1] / 1000,
         last_errno, (unsigned long long)wall_ms, (unsigned long long)cpu_ms,
         argc == 6 ? " label=" : "", argc == 6 ? argv[5] : "");
  return 0;
}
