// Runs a VMM, timestamps the first console line containing MARKER (the guest init's first
// line), measures the VMM's resident memory outside guest memory at that moment, and reports:
//   BENCH label=L run=N first_line_ms=T exit=S rss_total_kb=A rss_guest_kb=G rss_overhead_kb=O
//         locked_kb=K pinned_kb=P
// (locked_kb: VmLck, where VFIO's type1 IOMMU accounts the pages it pins; pinned_kb: VmPin.)
//
// usage: firstline --label L --run N --marker M --guest-min-kb KB [--timeout S] -- CMD...
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// Mappings at least this large are guest memory: nothing else in a VMM is (glibc arenas are
// 64 MiB, thread stacks 8 MiB), and adjacent guest regions may be merged into one mapping.
static void rss(pid_t pid, unsigned long guest_min_kb, unsigned long *total, unsigned long *guest) {
  char path[64], line[512];
  snprintf(path, sizeof path, "/proc/%d/smaps", pid);
  FILE *f = fopen(path, "r");
  *total = *guest = 0;
  if (!f) return;
  int in_guest = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long start, end, kb;
    if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, '-') < strchr(line, ' ')) {
      in_guest = (end - start) / 1024 >= guest_min_kb;
    } else if (sscanf(line, "Rss: %lu kB", &kb) == 1) {
      *total += kb;
      if (in_guest) *guest += kb;
    }
  }
  fclose(f);
}

// A "Key:   N kB" line of /proc/PID/status.
static unsigned long status_kb(pid_t pid, const char *key) {
  char path[64], line[256];
  unsigned long kb = 0;
  snprintf(path, sizeof path, "/proc/%d/status", pid);
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  size_t n = strlen(key);
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, key, n) && line[n] == ':') sscanf(line + n + 1, "%lu", &kb);
  fclose(f);
  return kb;
}

int main(int argc, char **argv) {
  const char *label = "vmm", *marker = NULL;
  unsigned long guest_min_kb = 96 * 1024;
  int run = 0, timeout = 120, i;
  for (i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--")) { i++; break; }
    if (i + 1 >= argc) break;
    if (!strcmp(argv[i], "--label")) label = argv[++i];
    else if (!strcmp(argv[i], "--marker")) marker = argv[++i];
    else if (!strcmp(argv[i], "--guest-min-kb")) guest_min_kb = strtoul(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--run")) run = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--timeout")) timeout = atoi(argv[++i]);
    else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
  }
  if (!marker || i >= argc) {
    fprintf(stderr, "usage: firstline --label L --marker M --guest-min-kb KB -- CMD...\n");
    return 2;
  }
  int fds[2];
  if (pipe(fds)) { perror("pipe"); return 1; }
  double t0 = now_ms();
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    execvp(argv[i], &argv[i]);
    perror("exec");
    _exit(127);
  }
  close(fds[1]);
  // Keep the child's last lines, to show where it was when it never printed the marker.
  enum { TAIL = 30 };
  static char tail[TAIL][512];
  int ntail = 0;
  char buf[65536];
  size_t have = 0;
  double first = -1, deadline = t0 + timeout * 1e3;
  unsigned long total = 0, guest = 0, locked = 0, pinned = 0;
  int timed_out = 0;
  for (;;) {
    double left = deadline - now_ms();
    if (left <= 0) {
      timed_out = 1;
      kill(pid, SIGKILL);
      break;
    }
    struct pollfd p = {.fd = fds[0], .events = POLLIN};
    if (poll(&p, 1, (int)left) <= 0) continue;
    ssize_t n = read(fds[0], buf + have, sizeof buf - 1 - have);
    if (n <= 0) break;
    have += (size_t)n;
    buf[have] = 0;
    char *start = buf, *nl;
    while ((nl = strchr(start, '\n'))) {
      *nl = 0;
      if (first < 0 && strstr(start, marker)) {
        first = now_ms() - t0;
        rss(pid, guest_min_kb, &total, &guest);
        locked = status_kb(pid, "VmLck");
        pinned = status_kb(pid, "VmPin");
      }
      snprintf(tail[ntail++ % TAIL], sizeof tail[0], "%s", start);
      start = nl + 1;
    }
    have = strlen(start);
    memmove(buf, start, have + 1);
    if (have == sizeof buf - 1) have = 0;  // an endless line: drop it
  }
  if (first < 0 || timed_out) {
    fprintf(stderr, "firstline: %s %s; its last lines:\n", label,
            timed_out ? "timed out and was killed" : "never printed the marker");
    for (int k = ntail > TAIL ? ntail - TAIL : 0; k < ntail; k++) fprintf(stderr, "  | %s\n", tail[k % TAIL]);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  printf("BENCH label=%s run=%d first_line_ms=%.1f exit=%d rss_total_kb=%lu rss_guest_kb=%lu "
         "rss_overhead_kb=%lu locked_kb=%lu pinned_kb=%lu\n",
         label, run, first, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status),
         total, guest, total - guest, locked, pinned);
  fflush(stdout);
  return first < 0;
}
