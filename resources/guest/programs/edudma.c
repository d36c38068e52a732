// Drives QEMU's edu PCI device through the edu-dma driver (/dev/edu-dma, ioctls in
// resources/guest/driver/edu_dma_uapi.h) with buffers from a dma-buf heap.
//
// usage: edudma info
//        edudma roundtrip HEAP PASSES   every transfer size and offset case, PASSES times
//        edudma blocked HEAP            device -> a page of ours that no dma-buf covers
//        edudma after-unmap HEAP        device -> a 4 MiB buffer before and after it is freed
// prints DMAVISOR-RESULT lines; exit status 1 when something failed, 2 on bad usage.
//
// The edu device moves at most 4096 bytes per transfer through its own buffer (the driver
// allows max_len, 4095 by default: QEMU 7.2's edu aborts on a transfer that reaches the last
// byte) and takes about 100 ms of (QEMU virtual) time per transfer, so one round trip (in and
// out) costs 200 ms.
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

#include "../driver/edu_dma_uapi.h"

#define DEV "/dev/edu-dma"
#define VDMA_STATS "/sys/kernel/debug/virtio-dma/stats"
#define PAGE 4096u
// Round-trip buffers: several pages (offsets cross page boundaries) in one piece even from the
// system heap, which hands out 64 KiB as one order-4 page when it can.
#define BUF_SIZE (64u * 1024)
#define BIG_SIZE (4u * 1024 * 1024)  // a virtio-dma buffer with a chunk of its own

static int edu_fd = -1;
static uint32_t max_len;  // the longest transfer the driver allows (edu_dma_info.max_len)

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int open_edu(struct edu_dma_info *in) {
  edu_fd = open(DEV, O_RDWR | O_CLOEXEC);
  if (edu_fd < 0) {
    printf("DMAVISOR-RESULT edu_dev=missing errno=%d\n", errno);
    return -1;
  }
  if (ioctl(edu_fd, EDU_DMA_IOC_INFO, in) < 0) {
    printf("DMAVISOR-RESULT edu_info=failed errno=%d\n", errno);
    return -1;
  }
  max_len = in->max_len;
  return 0;
}

static int open_heap(const char *heap) {
  int fd = open(heap, O_RDONLY | O_CLOEXEC);
  if (fd < 0) printf("DMAVISOR-RESULT edu_heap=%s open=failed errno=%d\n", heap, errno);
  return fd;
}

// A dma-buf of size bytes from the heap, mapped into us at *map. Returns its fd or -1.
static int buf_alloc(int heap_fd, size_t size, uint8_t **map) {
  struct dma_heap_allocation_data req = {.len = size, .fd_flags = O_RDWR | O_CLOEXEC};
  if (ioctl(heap_fd, DMA_HEAP_IOCTL_ALLOC, &req) < 0) return -1;
  int fd = (int)req.fd;
  *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (*map == MAP_FAILED) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

static void buf_free(int fd, uint8_t *map, size_t size) {
  munmap(map, size);
  close(fd);
}

// CPU access brackets, as dma-buf asks of every user (no-ops for cache-coherent x86).
static void cpu_begin(int fd) {
  struct dma_buf_sync s = {.flags = DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW};
  ioctl(fd, DMA_BUF_IOCTL_SYNC, &s);
}
static void cpu_end(int fd) {
  struct dma_buf_sync s = {.flags = DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW};
  ioctl(fd, DMA_BUF_IOCTL_SYNC, &s);
}

static uint8_t pattern(uint32_t seed, uint32_t i) {
  uint32_t x = seed * 0x9e3779b9u ^ i * 0x85ebca6bu;
  x ^= x >> 15;
  x *= 0xc2b2ae35u;
  return (uint8_t)(x ^ x >> 13);
}

// ---------------------------------------------------------------- info
static int cmd_info(struct edu_dma_info in) {
  printf("DMAVISOR-RESULT edu_ident=0x%08x edu_version=%u.%u edu_live=%s edu_msi=%u "
         "edu_msi_selftest=%s edu_irq=%u\n",
         in.ident, in.ident >> 24, (in.ident >> 16) & 0xff, in.live_ok ? "ok" : "bad",
         in.msi_vectors, in.msi_selftest_ok ? "ok" : "lost", in.irq);
  printf("DMAVISOR-RESULT edu_bar0=0x%llx edu_bar0_len=0x%llx edu_interrupts=%llu edu_dmas=%llu "
         "edu_timeouts_total=%llu edu_dead=%u edu_max_len=%u\n",
         (unsigned long long)in.bar0_start, (unsigned long long)in.bar0_len,
         (unsigned long long)in.interrupts, (unsigned long long)in.dmas,
         (unsigned long long)in.timeouts, in.dead, in.max_len);
  return !in.live_ok || !in.msi_selftest_ok || in.dead;
}

// ---------------------------------------------------------------- roundtrip
static const uint32_t sizes[] = {1, 2, 3, 7, 64, 511, 512, 4095, 4096};
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))
#define NOFFSETS 4

// Offset case k for a transfer of len bytes: the start, odd, across a page boundary, the end.
static uint32_t offset_case(int k, uint32_t len) {
  switch (k) {
    case 0: return 0;
    case 1: return 1;
    case 2: return 2 * PAGE - (len + 1) / 2;
    default: return BUF_SIZE - len;
  }
}

// Whether [off, off + len) of a buffer is one bus-contiguous run (a system-heap buffer can be
// pieces); also where the device will see it.
static int contiguous(int fd, uint32_t off, uint32_t len, uint64_t *bus) {
  struct edu_dma_addr a = {.fd = fd, .offset = off};
  if (ioctl(edu_fd, EDU_DMA_IOC_ADDR, &a) < 0) return -1;
  *bus = a.bus;
  return a.contig >= len;
}

struct totals {
  unsigned roundtrips, mismatches, timeouts, errors, skipped, bus_wrong;
  unsigned long long bytes, bad_bytes;
  int reported_error, reported_mismatch;
};

// One round trip between two fresh buffers of size bytes:
// src [src_off, +len) -> device [dev_off, +len) -> dst [dst_off, +len).
static void roundtrip_one(int heap_fd, uint32_t size, uint32_t seed, uint32_t len,
                          uint32_t src_off, uint32_t dst_off, uint32_t dev_off, struct totals *t) {
  uint8_t *src, *dst;
  int sfd = buf_alloc(heap_fd, size, &src);
  if (sfd < 0) {
    t->errors++;
    if (!t->reported_error++) printf("DMAVISOR-RESULT edu_first_error=alloc errno=%d\n", errno);
    return;
  }
  int dfd = buf_alloc(heap_fd, size, &dst);
  if (dfd < 0) {
    t->errors++;
    if (!t->reported_error++) printf("DMAVISOR-RESULT edu_first_error=alloc errno=%d\n", errno);
    buf_free(sfd, src, size);
    return;
  }
  uint64_t sbus = 0, dbus = 0;
  int sc = contiguous(sfd, src_off, len, &sbus), dc = contiguous(dfd, dst_off, len, &dbus);
  if (sc < 0 || dc < 0) {
    t->errors++;
    if (!t->reported_error++) printf("DMAVISOR-RESULT edu_first_error=addr errno=%d\n", errno);
    goto out;
  }
  if (!sc || !dc) {
    t->skipped++;
    goto out;
  }
  cpu_begin(sfd);
  for (uint32_t i = 0; i < size; i++) src[i] = pattern(seed, i);
  cpu_end(sfd);
  // Every byte of dst differs from what a correct transfer leaves there.
  cpu_begin(dfd);
  for (uint32_t i = 0; i < size; i++) {
    int in = i >= dst_off && i < dst_off + len;
    dst[i] = in ? (uint8_t)~src[src_off + (i - dst_off)] : (uint8_t)(0x5a ^ i * 7);
  }
  cpu_end(dfd);

  struct edu_dma_copy c = {.src_fd = sfd, .dst_fd = dfd, .src_offset = src_off,
                           .dst_offset = dst_off, .len = len, .dev_offset = dev_off};
  if (ioctl(edu_fd, EDU_DMA_IOC_COPY, &c) < 0) {
    int e = errno;
    if (e == ETIMEDOUT) t->timeouts++; else t->errors++;
    if (!t->reported_error++)
      printf("DMAVISOR-RESULT edu_first_error=copy errno=%d len=%u src_off=%u dst_off=%u "
             "dev_off=%u\n", e, len, src_off, dst_off, dev_off);
    goto out;
  }
  t->roundtrips++;
  t->bytes += len;
  if (c.src_bus != sbus || c.dst_bus != dbus) t->bus_wrong++;

  cpu_begin(dfd);
  unsigned long long bad = 0;
  uint32_t first = 0;
  uint8_t want_first = 0, got_first = 0;
  for (uint32_t i = 0; i < size; i++) {
    int in = i >= dst_off && i < dst_off + len;
    uint8_t want = in ? src[src_off + (i - dst_off)] : (uint8_t)(0x5a ^ i * 7);
    if (dst[i] != want && !bad++) {
      first = i;
      want_first = want;
      got_first = dst[i];
    }
  }
  cpu_end(dfd);
  if (bad) {
    t->mismatches++;
    t->bad_bytes += bad;
    if (!t->reported_mismatch++)
      printf("DMAVISOR-RESULT edu_first_mismatch seed=%u size=%u len=%u src_off=%u dst_off=%u "
             "dev_off=%u at=%u inside=%d want=0x%02x got=0x%02x bad_bytes=%llu src_bus=0x%llx "
             "dst_bus=0x%llx\n",
             seed, size, len, src_off, dst_off, dev_off, first, first >= dst_off && first < dst_off + len,
             want_first, got_first, bad, (unsigned long long)c.src_bus,
             (unsigned long long)c.dst_bus);
  }
out:
  buf_free(dfd, dst, size);
  buf_free(sfd, src, size);
}

static int cmd_roundtrip(const char *heap, int passes) {
  int heap_fd = open_heap(heap);
  if (heap_fd < 0) return 1;
  struct totals t = {0};
  uint64_t t0 = now_ms();
  uint32_t seed = 1;
  unsigned cases = 0;
  for (int p = 0; p < passes; p++) {
    for (unsigned s = 0; s < NSIZES; s++) {
      uint32_t len = sizes[s];
      if (len > max_len) continue;  // 4096 only where the driver allows it
      for (int k = 0; k < NOFFSETS; k++, seed++) {
        // The destination takes the next offset case, the device buffer a wandering one.
        roundtrip_one(heap_fd, BUF_SIZE, seed, len, offset_case(k, len),
                      offset_case((k + 1) % NOFFSETS, len), (seed * 97u) % (max_len - len + 1),
                      &t);
        cases += p == 0;
      }
    }
    // Buffers with host mappings of their own, DMAed the moment they exist: the IOMMU must map
    // a range when it is MAPped. Odd and across a page in the upper half, to the very end.
    roundtrip_one(heap_fd, BIG_SIZE, seed++, max_len, BIG_SIZE / 2 + 3 * PAGE - 3,
                  BIG_SIZE - max_len, 0, &t);
    cases += p == 0;
  }
  printf("DMAVISOR-RESULT edu_roundtrips=%u edu_bytes=%llu edu_mismatches=%u edu_timeouts=%u "
         "edu_errors=%u edu_skipped=%u edu_bad_bytes=%llu edu_bus_wrong=%u edu_cases=%u "
         "edu_passes=%d edu_max_len=%u edu_ms=%llu heap=%s\n",
         t.roundtrips, t.bytes, t.mismatches, t.timeouts, t.errors, t.skipped, t.bad_bytes,
         t.bus_wrong, cases, passes, max_len,
         (unsigned long long)(now_ms() - t0), heap);
  close(heap_fd);
  return t.mismatches || t.timeouts || t.errors || t.bus_wrong;
}

// ---------------------------------------------------------------- raw DMA to RAM
// A source buffer whose every byte is nonzero and differs from target_byte(i).
static uint8_t source_byte(uint32_t i) { return (uint8_t)(0x80 | (i * 7 & 0x7f)); }
static uint8_t target_byte(uint32_t i) { return (uint8_t)(i * 7 & 0x7f); }

static int source_alloc(int heap_fd, uint8_t **map) {
  int fd = buf_alloc(heap_fd, BUF_SIZE, map);
  if (fd < 0) return -1;
  cpu_begin(fd);
  for (uint32_t i = 0; i < BUF_SIZE; i++) (*map)[i] = source_byte(i % PAGE);
  cpu_end(fd);
  return fd;
}

// The device writes a page of the source (or max_len bytes) to guest physical address phys.
static int raw_to_ram(int src_fd, uint64_t phys, struct edu_dma_raw *r) {
  memset(r, 0, sizeof(*r));
  r->src_fd = src_fd;
  r->len = max_len < PAGE ? max_len : PAGE;
  r->phys = phys;
  return ioctl(edu_fd, EDU_DMA_IOC_RAW_TO_RAM, r);
}

// Our page's physical address, from /proc/self/pagemap (needs CAP_SYS_ADMIN); 0 if unknown.
static uint64_t phys_of(void *p) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  uint64_t e = 0;
  off_t at = (off_t)((uintptr_t)p / PAGE * sizeof(e));
  ssize_t n = pread(fd, &e, sizeof(e), at);
  close(fd);
  if (n != sizeof(e) || !(e >> 63 & 1)) return 0;
  uint64_t pfn = e & ((1ull << 55) - 1);
  return pfn * PAGE;
}

static int cmd_blocked(const char *heap) {
  int heap_fd = open_heap(heap);
  if (heap_fd < 0) return 1;
  uint8_t *src;
  int sfd = source_alloc(heap_fd, &src);
  if (sfd < 0) {
    printf("DMAVISOR-RESULT edu_blocked=alloc_failed errno=%d\n", errno);
    return 1;
  }
  // Ordinary anonymous memory of ours: no dma-buf, so on the host no IOMMU mapping.
  uint8_t *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED || mlock(page, PAGE) < 0) {
    printf("DMAVISOR-RESULT edu_blocked=page_failed errno=%d\n", errno);
    return 1;
  }
  for (uint32_t i = 0; i < PAGE; i++) page[i] = target_byte(i);
  uint64_t phys = phys_of(page);
  if (!phys) {
    printf("DMAVISOR-RESULT edu_blocked=no_phys\n");
    return 1;
  }
  struct edu_dma_raw r;
  if (raw_to_ram(sfd, phys, &r) < 0) {
    printf("DMAVISOR-RESULT edu_blocked=failed errno=%d phys=0x%llx\n", errno,
           (unsigned long long)phys);
    return 1;
  }
  // What we see in our own page, independently of the driver's snapshot.
  unsigned seen = 0;
  for (uint32_t i = 0; i < PAGE; i++) seen += page[i] != target_byte(i);
  uint64_t phys_after = phys_of(page);
  printf("DMAVISOR-RESULT edu_blocked_changed=%llu edu_blocked_now_src=%llu "
         "edu_blocked_seen_changed=%u edu_blocked_phys=0x%llx edu_blocked_bus=0x%llx "
         "edu_blocked_moved=%d edu_raw_len=%u src_bus=0x%llx heap=%s\n",
         (unsigned long long)r.changed, (unsigned long long)r.now_src, seen,
         (unsigned long long)phys, (unsigned long long)r.dst_bus, phys_after != phys, r.len,
         (unsigned long long)r.src_bus, heap);
  buf_free(sfd, src, BUF_SIZE);
  close(heap_fd);
  return 0;
}

// The device's UNMAP counter from the virtio-dma driver's debugfs (-1 without virtio-dma).
static long long vdma_unmaps(void) {
  FILE *f = fopen(VDMA_STATS, "r");
  if (!f) return -1;
  char line[1024];
  long long n = -1;
  if (fgets(line, sizeof(line), f)) {
    char *p = strstr(line, " unmaps=");
    if (p) n = atoll(p + 8);
  }
  fclose(f);
  return n;
}

static int cmd_after_unmap(const char *heap) {
  int heap_fd = open_heap(heap);
  if (heap_fd < 0) return 1;
  // The source first: allocated later, it could land on the range we free.
  uint8_t *src;
  int sfd = source_alloc(heap_fd, &src);
  uint8_t *big;
  int bfd = sfd < 0 ? -1 : buf_alloc(heap_fd, BIG_SIZE, &big);
  if (bfd < 0) {
    printf("DMAVISOR-RESULT edu_after_unmap=alloc_failed errno=%d\n", errno);
    return 1;
  }
  struct edu_dma_addr a = {.fd = bfd, .offset = 0};
  if (ioctl(edu_fd, EDU_DMA_IOC_ADDR, &a) < 0) {
    printf("DMAVISOR-RESULT edu_after_unmap=addr_failed errno=%d\n", errno);
    return 1;
  }
  cpu_begin(bfd);
  for (uint32_t i = 0; i < BIG_SIZE; i++) big[i] = target_byte(i % PAGE);
  cpu_end(bfd);

  // Control: while the buffer is ours (MAPped), the same DMA reaches it.
  struct edu_dma_raw r;
  if (raw_to_ram(sfd, a.bus, &r) < 0) {
    printf("DMAVISOR-RESULT edu_after_unmap=mapped_raw_failed errno=%d\n", errno);
    return 1;
  }
  cpu_begin(bfd);
  unsigned seen = 0;
  for (uint32_t i = 0; i < PAGE; i++) seen += big[i] == source_byte(i);
  cpu_end(bfd);
  printf("DMAVISOR-RESULT edu_mapped_changed=%llu edu_mapped_now_src=%llu edu_mapped_seen=%u "
         "edu_big_bus=0x%llx edu_big_segments=%u edu_big_size=%llu\n",
         (unsigned long long)r.changed, (unsigned long long)r.now_src, seen,
         (unsigned long long)a.bus, a.segments, (unsigned long long)a.size);

  // Free it: the virtio-dma driver UNMAPs its chunk; wait until the device counted the UNMAP.
  long long before = vdma_unmaps(), after = before;
  buf_free(bfd, big, BIG_SIZE);
  if (before < 0) {
    // Another heap's pages go straight back to the kernel, and without an IOMMU to stop it
    // the DMA would land in whatever took them.
    printf("DMAVISOR-RESULT edu_after_unmap=skipped reason=no_virtio_dma heap=%s\n", heap);
    buf_free(sfd, src, BUF_SIZE);
    return 0;
  }
  uint64_t t0 = now_ms();
  while (after <= before && now_ms() - t0 < 5000) {
    usleep(10000);
    after = vdma_unmaps();
  }
  if (raw_to_ram(sfd, a.bus, &r) < 0) {
    printf("DMAVISOR-RESULT edu_after_unmap=failed errno=%d\n", errno);
    return 1;
  }
  printf("DMAVISOR-RESULT edu_after_unmap_changed=%llu edu_after_unmap_now_src=%llu "
         "edu_after_unmap_phys=0x%llx edu_unmaps_before=%lld edu_unmaps_after=%lld "
         "edu_unmap_wait_ms=%llu heap=%s\n",
         (unsigned long long)r.changed, (unsigned long long)r.now_src,
         (unsigned long long)a.bus, before, after, (unsigned long long)(now_ms() - t0), heap);
  buf_free(sfd, src, BUF_SIZE);
  close(heap_fd);
  return after <= before;
}

static int usage(const char *argv0) {
  fprintf(stderr,
          "usage: %s info | roundtrip HEAP PASSES | blocked HEAP | after-unmap HEAP\n", argv0);
  return 2;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) return usage(argv[0]);
  const char *cmd = argv[1];
  int ok_args = (!strcmp(cmd, "info") && argc == 2) ||
                (!strcmp(cmd, "roundtrip") && argc == 4) ||
                ((!strcmp(cmd, "blocked") || !strcmp(cmd, "after-unmap")) && argc == 3);
  if (!ok_args) return usage(argv[0]);
  struct edu_dma_info info;
  if (open_edu(&info) < 0) return 1;
  if (!strcmp(cmd, "info")) return cmd_info(info);
  if (!strcmp(cmd, "roundtrip")) {
    int passes = atoi(argv[3]);
    if (passes <= 0 || passes > 100000) return usage(argv[0]);
    return cmd_roundtrip(argv[2], passes);
  }
  if (!strcmp(cmd, "blocked")) return cmd_blocked(argv[2]);
  return cmd_after_unmap(argv[2]);
}
