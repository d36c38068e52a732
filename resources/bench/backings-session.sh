#!/bin/sh
# One guest run for resources/bench/backings.sh: a region of SIZE with BACKING behind a window of
# the same size, and the guest asks virtio-dma for one buffer of each size in SIZES in turn (the
# `contig` scenario), largest first; prints `STAT SIZE JSON` for each while the guest holds it.
# usage: backings-session.sh BACKING SIZE SIZES KERNEL INITRD
backing=$1 size=$2 sizes=$3 kernel=$4 initrd=$5
trap "" PIPE
out=/tmp/dmavisor-backings.out sock=/tmp/dmavisor-backings.sock in=/tmp/dmavisor-backings.in
rm -f $out $sock $in
mkfifo $in
[ "$backing" = hugetlb ] && echo 320 > /proc/sys/vm/nr_hugepages
dmavisor run --api-sock $sock --memory size=256M --dma-window size=$size --region size=$size,backing=$backing \
  --kernel "$kernel" --initrd "$initrd" \
  --cmdline "console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=contig dmavisor.sizes=$(echo $sizes | tr ' ' ,)" \
  <$in >$out 2>&1 &
vmm=$!
exec 3>$in
i=0
for s in $sizes; do
  i=$((i + 1)) n=0
  until [ "$(grep -c 'DMAVISOR-WAIT holding' $out)" -ge $i ] || ! kill -0 $vmm 2>/dev/null || [ $n -gt 3000 ]; do sleep 0.1; n=$((n + 1)); done
  echo "STAT $s $(dmavisor stat --api-sock $sock --json)"
  echo go >&3
done
wait $vmm
echo "VMM-RC=$?"
cat $out
