// Fills anonymous memory with a pattern and checks it over and over: the guest side of the
// migration tests (every byte must survive the host moving the pages behind it) and the
// memory-heavy background load of the seed scenarios.
//
// usage: memfill MIB SECONDS   (SIGTERM ends it early: after the current round and one more
// whole round, which checks every word once whatever woke it is over)
// Prints "memfill ready" once the memory is filled, then
// "DMAVISOR-RESULT memfill_mib=M rounds=R bad_words=B" when the time is up (exit 1 if B > 0).
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static volatile sig_atomic_t stop;
static void on_term(int sig) {
  (void)sig;
  stop = 1;
}

static uint64_t word(uint64_t i, uint64_t round) {
  uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ round * 0xc2b2ae3d27d4eb4full;
  return x ^ (x >> 29);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MIB SECONDS\n", argv[0]);
    return 2;
  }
  size_t mib = strtoull(argv[1], NULL, 0);
  double seconds = atof(argv[2]);
  size_t words = mib << 17;
  uint64_t *m = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    printf("DMAVISOR-RESULT memfill_mib=%zu mmap=failed\n", mib);
    return 1;
  }
  for (size_t i = 0; i < words; i++) m[i] = word(i, 0);
  printf("memfill ready mib=%zu\n", mib);
  fflush(stdout);
  signal(SIGTERM, on_term);
  double end = now() + seconds;
  uint64_t round = 0, bad = 0;
  // After SIGTERM, one more whole round: every word is checked once the host's work is over,
  // however far the round under way had got when it came.
  int last = 0;
  do {
    last = stop;
    for (size_t i = 0; i < words; i++) {
      if (m[i] != word(i, round)) {
        if (bad < 5) printf("memfill: word %zu round %llu is %#llx, want %#llx\n", i,
                            (unsigned long long)round, (unsigned long long)m[i],
                            (unsigned long long)word(i, round));
        bad++;
      }
      m[i] = word(i, round + 1);
    }
    round++;
  } while (now() < end && !last);
  printf("DMAVISOR-RESULT memfill_mib=%zu rounds=%llu bad_words=%llu\n", mib,
         (unsigned long long)round, (unsigned long long)bad);
  return bad != 0;
}
