#!/usr/bin/env bash
# Sets everything up and runs every test: unit, property and concurrency tests of each crate,
# and the integration tests that boot real Linux guests on real KVM (directly, or inside the
# sandbox host where this host's KVM cannot run stock guests).
#
# A run the harness had to retry (a stalled sandbox host) is a failure deferred: every retry is
# listed at the end, pass or fail, and counted against the suite.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
./resources/setup.sh
export DMAVISOR_RETRY_LOG="$ROOT/target/harness-retries.log"
: > "$DMAVISOR_RETRY_LOG"
echo "==> cargo test --workspace"
status=0
cargo test --workspace || status=$?
retries=$(grep -c . "$DMAVISOR_RETRY_LOG" || true)
echo "==> harness retries: $retries (each one a guest run that stalled or hit its limit and ran again)"
sed 's/^/    retry: /' "$DMAVISOR_RETRY_LOG"
if [ "$status" -ne 0 ]; then
  echo "==> tests FAILED (cargo test exit status $status)"
elif [ "$retries" -gt 0 ]; then
  echo "==> tests passed, with $retries retried run(s) counted against the suite: see above"
else
  echo "==> tests passed with no retries"
fi
exit "$status"
