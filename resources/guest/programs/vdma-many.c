// Holds many dma-buf heap buffers at once, then closes them all at once (by exiting).
//
// usage: vdma-many HEAP_PATH SIZE COUNT [WAITFILE]
// Allocates COUNT buffers of SIZE bytes and writes a pattern into each. With WAITFILE, reports
// many_holding=N and waits until WAITFILE exists (something else happens meanwhile: an unbind
// attempt, a stalled device). Then checks every buffer's pattern and exits, which closes them
// all at once.
// prints: DMAVISOR-RESULT many_heap=... size=... count=... ok=N failed=N errno=E
//         first_fail_ms=T max_ms=T verify=ok|bad wrong_size=N (dma-bufs not SIZE page-aligned)
#include <errno.h>
#include <fcntl.h>
#include <linux/dma-heap.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

// Writes (check=0) or checks (check=1) buffer i's pattern: one word per 512 bytes.
static int pattern(int fd, size_t size, int i, int check) {
  uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return -1;
  int bad = 0;
  for (size_t off = 0; off + 8 <= size; off += 512) {
    uint64_t want = off ^ ((uint64_t)i << 32) ^ 0x5a5a5a5aull;
    if (!check)
      *(uint64_t *)(p + off) = want;
    else if (*(uint64_t *)(p + off) != want)
      bad = 1;
  }
  munmap(p, size);
  return bad;
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s HEAP_PATH SIZE COUNT [WAITFILE]\n", argv[0]);
    return 2;
  }
  const char *heap = argv[1];
  size_t size = strtoull(argv[2], NULL, 0);
  int count = atoi(argv[3]);
  if (size == 0 || count <= 0 || count > 100000) return 2;
  struct rlimit rl = {.rlim_cur = (rlim_t)count + 64, .rlim_max = (rlim_t)count + 64};
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0) perror("setrlimit");
  int heap_fd = open(heap, O_RDONLY | O_CLOEXEC);
  if (heap_fd < 0) {
    printf("DMAVISOR-RESULT many_heap=%s open=failed errno=%d\n", heap, errno);
    return 1;
  }
  int *fds = calloc((size_t)count, sizeof(int));
  int ok = 0, failed = 0, last_errno = 0, bad = 0, wrong_size = 0;
  size_t page = (size_t)sysconf(_SC_PAGESIZE), want_size = (size + page - 1) / page * page;
  uint64_t first_fail_ms = 0, max_ms = 0;
  for (int i = 0; i < count; i++) {
    struct dma_heap_allocation_data req = {.len = size, .fd_flags = O_RDWR | O_CLOEXEC};
    uint64_t t0 = now_ms();
    int rc = ioctl(heap_fd, DMA_HEAP_IOCTL_ALLOC, &req);
    uint64_t ms = now_ms() - t0;
    if (ms > max_ms) max_ms = ms;
    if (rc < 0) {
      if (!failed) first_fail_ms = ms;
      failed++;
      last_errno = errno;
      continue;
    }
    fds[ok] = (int)req.fd;
    // The dma-buf is as long as asked for, page-aligned (as the kernel's CMA heap exports).
    if (lseek(fds[ok], 0, SEEK_END) != (off_t)want_size) wrong_size++;
    if (pattern(fds[ok], size, ok, 0)) bad++;
    ok++;
  }
  if (argc == 5) {
    printf("DMAVISOR-RESULT many_holding=%d\n", ok);
    fflush(stdout);
    while (access(argv[4], F_OK) != 0) usleep(20000);
  }
  for (int i = 0; i < ok; i++)
    if (pattern(fds[i], size, i, 1)) bad++;
  printf("DMAVISOR-RESULT many_heap=%s size=%zu count=%d ok=%d failed=%d errno=%d "
         "first_fail_ms=%llu max_ms=%llu verify=%s wrong_size=%d\n",
         heap, size, count, ok, failed, last_errno, (unsigned long long)first_fail_ms,
         (unsigned long long)max_ms, bad ? "bad" : "ok", wrong_size);
  fflush(stdout);
  return 0;  // exiting closes every buffer at once
}
