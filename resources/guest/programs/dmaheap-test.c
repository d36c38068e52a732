// Allocates buffers from a dma-buf heap with the standard DMA_HEAP_IOCTL_ALLOC, maps them,
// checks they come zeroed, writes and reads back a pattern, frees them, and reports latency.
//
// usage: dmaheap-test HEAP_PATH SIZE COUNT [hold]
// With "hold", every buffer is kept until all COUNT were tried (to exhaust a heap).
// prints: DMAVISOR-RESULT heap=... size=... count=... ok=N failed=N errno=E verify=ok|bad
//         alloc_us_p50=... alloc_us_p99=... alloc_us_max=...
#include <errno.h>
#include <fcntl.h>
#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static int sync_buf(int fd, uint64_t flags) {
  struct dma_buf_sync s = {.flags = flags};
  return ioctl(fd, DMA_BUF_IOCTL_SYNC, &s);
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s HEAP_PATH SIZE COUNT [hold]\n", argv[0]);
    return 2;
  }
  const char *heap = argv[1];
  size_t size = strtoull(argv[2], NULL, 0);
  int count = atoi(argv[3]);
  if (size == 0 || count <= 0 || count > 100000) {
    fprintf(stderr, "size must be > 0 and count in 1..100000\n");
    return 2;
  }
  int heap_fd = open(heap, O_RDONLY | O_CLOEXEC);
  if (heap_fd < 0) {
    printf("DMAVISOR-RESULT heap=%s open=failed errno=%d\n", heap, errno);
    return 1;
  }
  int hold = argc == 5 && strcmp(argv[4], "hold") == 0;
  int *held = calloc((size_t)count, sizeof(int));
  int nheld = 0;
  uint64_t *lat = calloc((size_t)count, sizeof(uint64_t));
  int ok = 0, failed = 0, last_errno = 0, verify_bad = 0;
  for (int i = 0; i < count; i++) {
    struct dma_heap_allocation_data req = {
        .len = size, .fd_flags = O_RDWR | O_CLOEXEC, .heap_flags = 0};
    uint64_t t0 = now_ns();
    int rc = ioctl(heap_fd, DMA_HEAP_IOCTL_ALLOC, &req);
    uint64_t t1 = now_ns();
    if (rc < 0) {
      failed++;
      last_errno = errno;
      continue;
    }
    lat[ok++] = t1 - t0;
    int buf_fd = (int)req.fd;
    uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, buf_fd, 0);
    if (p == MAP_FAILED) {
      verify_bad++;
      close(buf_fd);
      continue;
    }
    sync_buf(buf_fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW);
    for (size_t off = 0; off < size; off += 512)
      if (p[off] != 0) {
        verify_bad++;
        break;
      }
    for (size_t off = 0; off < size; off += 8)
      *(uint64_t *)(p + off) = off ^ (uint64_t)i;
    for (size_t off = 0; off < size; off += 8)
      if (*(uint64_t *)(p + off) != (off ^ (uint64_t)i)) {
        verify_bad++;
        break;
      }
    sync_buf(buf_fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW);
    munmap(p, size);
    if (hold)
      held[nheld++] = buf_fd;
    else
      close(buf_fd);
  }
  const char *hold_seconds = getenv("HOLD_SECONDS");
  if (hold && hold_seconds) {
    // Keep the buffers while something outside looks at them (the VMM's control API).
    printf("DMAVISOR-RESULT holding=%d\n", nheld);
    fflush(stdout);
    sleep((unsigned)atoi(hold_seconds));
  } else if (hold && getenv("HOLD_STDIN")) {
    // Keep the buffers until the host (a test driving the control API) sends a line.
    printf("DMAVISOR-RESULT holding=%d\nDMAVISOR-WAIT holding\n", nheld);
    fflush(stdout);
    int ch;
    while ((ch = getchar()) != EOF && ch != '\n') {
    }
  }
  if (hold && count <= 8 && strstr(heap, "virtio-dma")) {
    // While every buffer is held: where the host put them (the driver's debugfs list).
    FILE *f = fopen("/sys/kernel/debug/virtio-dma/buffers", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) printf("DMAVISOR-RESULT buffer %s", line);
    if (f) fclose(f);
  }
  for (int k = 0; k < nheld; k++) close(held[k]);
  free(held);
  qsort(lat, (size_t)ok, sizeof(uint64_t), cmp_u64);
  uint64_t p50 = ok ? lat[ok / 2] : 0;
  uint64_t p99 = ok ? lat[(ok * 99) / 100 < ok ? (ok * 99) / 100 : ok - 1] : 0;
  uint64_t max = ok ? lat[ok - 1] : 0;
  printf("DMAVISOR-RESULT heap=%s size=%zu count=%d ok=%d failed=%d errno=%d verify=%s "
         "alloc_us_p50=%llu alloc_us_p99=%llu alloc_us_max=%llu\n",
         heap, size, count, ok, failed, last_errno, verify_bad ? "bad" : "ok",
         (unsigned long long)(p50 / 1000), (unsigned long long)(p99 / 1000),
         (unsigned long long)(max / 1000));
  free(lat);
  close(heap_fd);
  return failed || verify_bad ? 1 : 0;
}
