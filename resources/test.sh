#!/usr/bin/env bash
# Sets everything up and runs every test: unit, property and concurrency tests of each crate,
# and the integration tests that boot real Linux guests on real KVM (directly, or inside the
# sandbox host where this host's KVM cannot run stock guests).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
./resources/setup.sh
echo "==> cargo test --workspace"
cargo test --workspace
