#!/bin/sh
# One guest run for resources/bench/pins.sh (runs where dmavisor runs: here or in the sandbox).
# usage: pins-session.sh MODE KERNEL INITRD   (MODE: seed001, seed004, seed001-ab (SEGMENTS=N
# interleaved segments, see resources/bench/seed001-tail.sh) or migrate; CHURN=0: no
# host pin churn; WINDOW=SIZE: the seeds' window, 56M by default; MEMCPY=1: end the seeds with a
# one-frame forced migration, whose reply carries this VMM's memcpy speed)
# Prints the guest console and the control API's replies ("API ... => JSON").
mode=$1 kernel=$2 initrd=$3
trap "" PIPE
out=/tmp/dmavisor-bench.out sock=/tmp/dmavisor-bench.sock in=/tmp/dmavisor-bench.in
rm -f $out $sock $in
mkfifo $in
dd if=/dev/zero of=/tmp/dmavisor-bench.img bs=1M count=64 2>/dev/null
dev=$(losetup -f) && losetup "$dev" /tmp/dmavisor-bench.img || { echo "losetup failed"; exit 1; }
case $mode in
  seed001|seed004) scenario="$mode dmavisor.seconds=${SECONDS_PER_HEAP:-20}" window=${WINDOW:-56M} ;;
  seed001-ab) scenario="$mode dmavisor.seconds=${SECONDS_PER_HEAP:-8} dmavisor.segments=${SEGMENTS:-3}"
    window=${WINDOW:-56M} ;;
  migrate) scenario=migrate-verify window=64M ;;
esac
# REGION=SIZE: a region of that size instead of the window's (e.g. headroom for moves).
# BACKING: the region's backing, 2 MiB huge pages by default: host pin churn does O_DIRECT from
# region frames, which the kernel cannot pin in a dma-buf (the CMA heap's) region.
dmavisor run --api-sock $sock --test-commands --pin-target "$dev" --memory size=256M --dma-window size=$window \
  --region ${REGION:+size=$REGION,}backing=${BACKING:-hugetlb} \
  --kernel "$kernel" --initrd "$initrd" \
  --cmdline "console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=$scenario" <$in >$out 2>&1 &
vmm=$!
exec 3>$in
waitfor() { n=0; until grep -q "$1" $out || ! kill -0 $vmm 2>/dev/null || [ $n -gt 6000 ]; do sleep 0.1; n=$((n+1)); done; }
api() { echo "API $* => $(dmavisor api --api-sock $sock "$@" 2>&1)"; }
waitfor DMAVISOR-SCENARIO
n=0; until dmavisor stat --api-sock $sock | grep -q lending || [ $n -gt 600 ]; do sleep 0.1; n=$((n+1)); done
case $mode in
  seed001|seed004|seed001-ab)
    [ "${CHURN:-1}" = 1 ] && api pin-churn io_kib=64 hold_us=200
    waitfor 'DMAVISOR-WAIT loaded'; echo go >&3
    waitfor 'DMAVISOR-WAIT done'
    [ "${CHURN:-1}" = 1 ] && api pin-churn-stop
    api stat
    # The memcpy baseline of this VMM (a region that never moves refuses and has none).
    [ "${MEMCPY:-0}" = 1 ] && api migrate frames=1 ;;
  migrate)
    waitfor 'DMAVISOR-WAIT filled'
    for r in 1 2 3 4 5; do api migrate frames=32; done
    api stat ;;
esac
echo go >&3
wait $vmm
echo "VMM-RC=$?"
losetup -d "$dev"
cat $out
