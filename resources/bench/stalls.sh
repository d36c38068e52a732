#!/usr/bin/env bash
# Counts sandbox-host stalls (issue: a real host CMA region, item 6): RUNS guest runs of the seed
# scenarios under host pin churn (resources/bench/pins-session.sh), each in a fresh sandbox host,
# and classifies every run by what the sandbox's console shows:
#   clean     dmavisor exited 0
#   stall     the sandbox kernel reported an RCU stall or a soft lockup
#   oops      the sandbox kernel oopsed (e.g. a stack overflow in a vCPU thread)
#   triple    the guest triple-faulted (dmavisor exit 4)
#   timeout   the sandbox run hit its time limit with neither report
#   failed    anything else
# usage: resources/bench/stalls.sh [RUNS]   (default 40)
# env:   DMAVISOR_SANDBOX_KERNEL=project|debian  the sandbox host kernel (default project)
#        CHURN=0                                 no host pin churn (a control)
#        BACKING=hugetlb|hugetlb-1g|memfd        the region (default hugetlb; churn needs frames
#                                                the kernel can pin). hugetlb-1g with WINDOW=1G:
#                                                a region that never moves (a control)
#        SECONDS_PER_HEAP=N                      per heap per run (default 10)
#        DMAVISOR_SANDBOX_TCG=single             QEMU's single-threaded TCG (a control)
# Prints one line per run and a summary table; console logs in target/bench/stalls/.
# The sandbox kernel panics at a soft lockup, an oops or an RCU stall (resources/sandbox/run.sh),
# which ends the run at once; here it also prints the stack of every CPU at a soft lockup, and
# loglevel=5 shows the stacks under `quiet`.
export DMAVISOR_SANDBOX_APPEND=${DMAVISOR_SANDBOX_APPEND:-loglevel=5 softlockup_all_cpu_backtrace=1}
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
runs=${1:-40}
kernel=${DMAVISOR_SANDBOX_KERNEL:-project}
export SECONDS_PER_HEAP=${SECONDS_PER_HEAP:-10}
./resources/sandbox/build.sh "$kernel" >/dev/null
logs=target/bench/stalls/$kernel-churn${CHURN:-1}-${BACKING:-hugetlb}-${WINDOW:-56M}-tcg${DMAVISOR_SANDBOX_TCG:-multi}
rm -rf "$logs" && mkdir -p "$logs"
declare -A count=([clean]=0 [stall]=0 [oops]=0 [triple]=0 [timeout]=0 [failed]=0)
start=$(date +%s)
for i in $(seq "$runs"); do
  mode=seed001
  [ $((i % 2)) -eq 0 ] && mode=seed004
  log="$logs/run$i-$mode.log"
  t0=$(date +%s)
  rc=0
  DMAVISOR_SANDBOX_KERNEL=$kernel ./resources/sandbox/run.sh --timeout 420 --log "$log" -- \
    env SECONDS_PER_HEAP="$SECONDS_PER_HEAP" CHURN="${CHURN:-1}" BACKING="${BACKING:-hugetlb}" WINDOW="${WINDOW:-56M}" \
    sh resources/bench/pins-session.sh $mode target/guest/kernel target/guest/initramfs.cpio.gz \
    >/dev/null 2>&1 || rc=$?
  if grep -aqE 'rcu: INFO|self-detected stall|detected stalls on CPUs|soft lockup' "$log"; then
    what=stall
  elif grep -aqE 'Oops:|BUG: ' "$log"; then
    what=oops
  elif grep -aq 'TripleFault' "$log"; then
    what=triple
  elif grep -aq 'VMM-RC=0' "$log"; then
    what=clean
  elif [ "$rc" = 124 ]; then
    what=timeout
  else
    what=failed
  fi
  count[$what]=$((count[$what] + 1))
  echo "run $i ($mode): $what in $(($(date +%s) - t0)) s (sandbox rc $rc)"
done
echo
echo "Sandbox host kernel: $kernel ($(tr -d '\r' <"$logs/run1-seed001.log" | sed -n 's/.*SANDBOX-READY.*kernel=[a-z]* \([^ ]*\).*/\1/p' | head -n 1)); TCG: ${DMAVISOR_SANDBOX_TCG:-multi}; host pin churn: ${CHURN:-1}; region: ${BACKING:-hugetlb}, window ${WINDOW:-56M}; $runs runs in $(( ($(date +%s) - start) / 60 )) min"
echo
echo "| runs | clean | stall | host oops | guest triple fault | timeout | failed |"
echo "|---|---|---|---|---|---|---|"
echo "| $runs | ${count[clean]} | ${count[stall]} | ${count[oops]} | ${count[triple]} | ${count[timeout]} | ${count[failed]} |"
