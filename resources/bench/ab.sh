#!/usr/bin/env bash
# Same-run comparison of a benchmark between an earlier revision and this checkout: builds REV
# in its own worktree (target/ab/REV, with its own guest kernel, sandbox host and dmavisor, as
# that revision's setup.sh makes them), then runs BENCH from each tree in turn, ROUNDS times,
# alternating (REV first), so both see the same machine. Each run's table is printed under a
# heading that says which tree it came from.
#
# usage: resources/bench/ab.sh REV BENCH [ROUNDS]   e.g. resources/bench/ab.sh 34d5ed5 dma-heap.sh 2
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
rev=${1:?"usage: $0 REV BENCH [ROUNDS]"}
bench=${2:?"usage: $0 REV BENCH [ROUNDS]"}
rounds=${3:-1}
short=$(git rev-parse --short "$rev")
wt=$ROOT/target/ab/$short
if [ ! -d "$wt" ]; then
  echo "==> [ab] checking out $short into $wt" >&2
  git worktree add --detach "$wt" "$rev" >&2
fi
[ -x "$wt/resources/bench/$bench" ] || { echo "error: $short has no resources/bench/$bench" >&2; exit 2; }
head=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!target' || echo "+changes")
for r in $(seq "$rounds"); do
  for side in "$short:$wt" "$head:$ROOT"; do
    name=${side%%:*} dir=${side#*:}
    echo "==> [ab] round $r of $rounds: $bench on $name" >&2
    echo
    echo "### $bench, $name, round $r"
    (cd "$dir" && "./resources/bench/$bench")
  done
done
