// Host-side checks of where a process's memory is in physical memory, independent of dmavisor's
// own code: the tests compare what dmavisor reports against what the host kernel says.
//
// usage: physmap pagemap PID ADDR LEN
//          Reads /proc/PID/pagemap for [ADDR, ADDR+LEN) and prints
//          PHYSMAP pages=N present=N extents=N first_phys=0x...
//          extents counts the physically contiguous runs among the present pages (1 = one
//          extent). A VM_PFNMAP mapping (a dma-buf) shows no present pages: the kernel's page
//          walker skips such VMAs (mm/pagewalk.c walk_page_test()).
//        physmap cma AREA PHYS LEN
//          Checks that [PHYS, PHYS+LEN) lies inside CMA area AREA and that every page of it is
//          allocated there, from /sys/kernel/debug/cma/AREA/{base_pfn,count,order_per_bit,bitmap}:
//          PHYSMAP cma=AREA base_pfn=N count=N inside=0|1 allocated=0|1
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096ull

static int usage(void) {
  fprintf(stderr, "usage: physmap pagemap PID ADDR LEN | physmap cma AREA PHYS LEN\n");
  return 2;
}

static int pagemap(const char *pid, uint64_t addr, uint64_t len) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/%s/pagemap", pid);
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    fprintf(stderr, "physmap: %s: %s\n", path, strerror(errno));
    return 1;
  }
  uint64_t pages = len / PAGE, present = 0, extents = 0, first = 0, prev = 0;
  uint64_t buf[512];
  for (uint64_t done = 0; done < pages;) {
    uint64_t n = pages - done < 512 ? pages - done : 512;
    ssize_t got = pread(fd, buf, n * 8, (off_t)((addr / PAGE + done) * 8));
    if (got != (ssize_t)(n * 8)) {
      fprintf(stderr, "physmap: reading %s: %s\n", path, got < 0 ? strerror(errno) : "short read");
      return 1;
    }
    for (uint64_t i = 0; i < n; i++) {
      uint64_t e = buf[i], pfn = e & ((1ull << 55) - 1);
      if (!(e >> 63) || pfn == 0) {
        prev = 0;
        continue;
      }
      if (present == 0) first = pfn * PAGE;
      if (prev == 0 || pfn != prev + 1) extents++;
      present++;
      prev = pfn;
    }
    done += n;
  }
  printf("PHYSMAP pages=%" PRIu64 " present=%" PRIu64 " extents=%" PRIu64 " first_phys=0x%" PRIx64 "\n",
         pages, present, extents, first);
  return 0;
}

static int read_u64(const char *area, const char *name, uint64_t *out) {
  char path[256];
  snprintf(path, sizeof(path), "/sys/kernel/debug/cma/%s/%s", area, name);
  FILE *f = fopen(path, "r");
  if (!f || fscanf(f, "%" SCNu64, out) != 1) {
    fprintf(stderr, "physmap: cannot read %s (debugfs mounted? CONFIG_CMA_DEBUGFS?)\n", path);
    if (f) fclose(f);
    return -1;
  }
  fclose(f);
  return 0;
}

static int cma(const char *area, uint64_t phys, uint64_t len) {
  uint64_t base, count, order;
  if (read_u64(area, "base_pfn", &base) || read_u64(area, "count", &count) ||
      read_u64(area, "order_per_bit", &order))
    return 1;
  char path[256];
  snprintf(path, sizeof(path), "/sys/kernel/debug/cma/%s/bitmap", area);
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "physmap: %s: %s\n", path, strerror(errno));
    return 1;
  }
  uint64_t nwords = ((count >> order) + 31) / 32;
  uint32_t *words = calloc(nwords ? nwords : 1, sizeof(uint32_t));
  for (uint64_t i = 0; i < nwords; i++) {
    if (fscanf(f, "%" SCNu32, &words[i]) != 1) {
      fprintf(stderr, "physmap: %s: short bitmap\n", path);
      return 1;
    }
  }
  fclose(f);
  uint64_t first = phys / PAGE, last = (phys + len + PAGE - 1) / PAGE;
  int inside = len > 0 && first >= base && last <= base + count;
  int allocated = inside;
  for (uint64_t p = first; inside && p < last; p++) {
    uint64_t bit = (p - base) >> order;
    if (!(words[bit / 32] & (1u << (bit % 32)))) {
      allocated = 0;
      break;
    }
  }
  printf("PHYSMAP cma=%s base_pfn=%" PRIu64 " count=%" PRIu64 " inside=%d allocated=%d\n", area, base,
         count, inside, allocated);
  free(words);
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 5) return usage();
  uint64_t a = strtoull(argv[3], NULL, 0), len = strtoull(argv[4], NULL, 0);
  if (strcmp(argv[1], "pagemap") == 0) return pagemap(argv[2], a, len);
  if (strcmp(argv[1], "cma") == 0) return cma(argv[2], a, len);
  return usage();
}
