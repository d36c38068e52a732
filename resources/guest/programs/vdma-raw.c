// A misbehaving guest program: sends malformed and hostile virtio-dma requests through the
// driver's raw debugfs file and prints the status the device returned for each.
//
// usage: vdma-raw   (reads the window from /sys/kernel/debug/virtio-dma/stats)
// prints: DMAVISOR-RESULT raw_case=NAME status=N
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DIR "/sys/kernel/debug/virtio-dma/"

struct req {
  uint32_t type, flags;
  uint64_t gpa, len;
  uint32_t deadline_ms, reserved;
} __attribute__((packed));

static int send(struct req r) {
  int fd = open(DIR "raw", O_RDWR);
  if (fd < 0) return -1;
  (void)!write(fd, &r, sizeof r);  // the device's status is read back below either way
  char buf[32] = {0};
  lseek(fd, 0, SEEK_SET);
  int n = read(fd, buf, sizeof buf - 1);
  close(fd);
  unsigned status = 999;
  if (n > 0) sscanf(buf, "status=%u", &status);
  return (int)status;
}

static void report(const char *name, struct req r) {
  printf("DMAVISOR-RESULT raw_case=%s status=%d\n", name, send(r));
}

int main(void) {
  FILE *f = fopen(DIR "stats", "r");
  if (!f) {
    printf("DMAVISOR-RESULT raw_case=open status=-1\n");
    return 1;
  }
  char line[512] = {0};
  if (!fgets(line, sizeof line, f)) line[0] = 0;
  fclose(f);
  char *b = strstr(line, "window_base="), *s = strstr(line, "window_size="), *g = strstr(line, "granule=");
  char *m = strstr(line, "max_map_len=");
  if (!b || !s || !g || !m) return 1;
  uint64_t base = strtoull(b + 12, NULL, 0), size = strtoull(s + 12, NULL, 0), gran = strtoull(g + 8, NULL, 0);
  uint64_t max_map = strtoull(m + 12, NULL, 0);
  uint64_t top = base + size - gran;  // the window's last granule: CMA hands it out last

  report("unknown_type", (struct req){.type = 9});
  report("map_bad_flags", (struct req){.type = 1, .flags = 1u << 9, .gpa = top, .len = gran});
  report("map_reserved_set", (struct req){.type = 1, .gpa = top, .len = gran, .reserved = 1});
  report("map_outside_window", (struct req){.type = 1, .gpa = 0, .len = gran});
  report("map_past_window_end", (struct req){.type = 1, .gpa = top, .len = 2 * gran});
  report("map_wrapping", (struct req){.type = 1, .gpa = UINT64_MAX - gran + 1, .len = 2 * gran});
  report("map_unaligned", (struct req){.type = 1, .gpa = top - gran + 1, .len = gran});
  report("map_zero_len", (struct req){.type = 1, .gpa = top, .len = 0});
  report("unmap_never_mapped", (struct req){.type = 2, .gpa = top, .len = gran});
  report("unmap_bad_flags", (struct req){.type = 2, .flags = 1, .gpa = top, .len = gran});
  report("stat_with_args", (struct req){.type = 3, .gpa = top});
  // No DISCARD: the range may hold this guest's own pages, and MAP and UNMAP keep them intact.
  report("map_ok", (struct req){.type = 1, .flags = 1, .gpa = top, .len = gran});
  report("map_overlap", (struct req){.type = 1, .flags = 1, .gpa = top, .len = gran});
  report("unmap_wrong_len", (struct req){.type = 2, .gpa = top - gran, .len = 2 * gran});
  report("unmap_ok", (struct req){.type = 2, .gpa = top, .len = gran});
  report("unmap_double", (struct req){.type = 2, .gpa = top, .len = gran});
  // Larger than any host-contiguous extent (only possible when the window is larger).
  if (max_map + gran <= size)
    report("map_larger_than_extent", (struct req){.type = 1, .flags = 3, .gpa = base, .len = max_map + gran});
  return 0;
}
