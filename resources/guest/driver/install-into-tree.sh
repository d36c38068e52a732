#!/usr/bin/env bash
# Puts the guest drivers into a Linux source tree, each with its Kconfig symbol. Idempotent.
#  - virtio-dma (drivers/virtio/virtio_dma.c, CONFIG_VIRTIO_DMA). Built in, not a module:
#    cma_alloc, cma_release and dma_heap_add are not exported to modules in 6.12. Its wire format
#    (virtio_dma_uapi.h) becomes include/uapi/linux/virtio_dma.h; CONFIG_VIRTIO_DMA_TEST_HOOKS
#    adds its debugfs test hooks.
#  - edu-dma (drivers/misc/edu_dma.c, CONFIG_DMAVISOR_EDU): the test driver for QEMU's edu PCI
#    device passed through with VFIO; its ioctls are in edu_dma_uapi.h, which the guest program
#    resources/guest/programs/edudma.c includes too.
set -euo pipefail
tree=$1
here=$(cd "$(dirname "$0")" && pwd)

# Inserts a Kconfig entry (stdin) into FILE before the last line equal to MARKER, unless a
# "config SYMBOL" entry is already there.
add_kconfig() {
  local file=$1 symbol=$2 marker=$3
  grep -q "^config $symbol\$" "$file" && return
  python3 -c '
import sys
path, marker, entry = sys.argv[1], sys.argv[2], sys.stdin.read()
s = open(path).read()
i = s.rindex(marker + "\n")
open(path, "w").write(s[:i] + entry + "\n" + s[i:])
' "$file" "$marker"
}

cp "$here/virtio_dma.c" "$tree/drivers/virtio/virtio_dma.c"
# The wire format, where upstream keeps each virtio device's: include/uapi/linux/virtio_*.h.
cp "$here/virtio_dma_uapi.h" "$tree/include/uapi/linux/virtio_dma.h"
grep -q 'virtio_dma.o' "$tree/drivers/virtio/Makefile" ||
  echo 'obj-$(CONFIG_VIRTIO_DMA) += virtio_dma.o' >>"$tree/drivers/virtio/Makefile"
add_kconfig "$tree/drivers/virtio/Kconfig" VIRTIO_DMA "endif # VIRTIO_MENU" <<'KCONFIG'
config VIRTIO_DMA
	bool "virtio-dma: host-contiguous DMA buffers from the guest's CMA area"
	depends on VIRTIO && DMA_CMA && DMABUF_HEAPS
	help
	  Driver for dmavisor's virtio-dma device (device ID 60). Allocates
	  buffers with cma_alloc() on the CMA area that is the VMM's DMA
	  window, asks the host to back them with host-contiguous pinned
	  memory, and exports them as the dma-buf heaps "virtio-dma" and
	  "virtio-dma-failfast".
KCONFIG
add_kconfig "$tree/drivers/virtio/Kconfig" VIRTIO_DMA_TEST_HOOKS "endif # VIRTIO_MENU" <<'KCONFIG'
config VIRTIO_DMA_TEST_HOOKS
	bool "virtio-dma: debugfs test hooks"
	depends on VIRTIO_DMA && DEBUG_FS
	help
	  Adds debugfs files for testing the virtio-dma device and driver:
	  raw (sends a request header verbatim, to test how the device
	  treats malformed requests) and timer_free (drops a buffer's last
	  reference from a timer callback). For test kernels only.
KCONFIG

cp "$here/edu_dma.c" "$here/edu_dma_uapi.h" "$tree/drivers/misc/"
grep -q 'edu_dma.o' "$tree/drivers/misc/Makefile" ||
  echo 'obj-$(CONFIG_DMAVISOR_EDU) += edu_dma.o' >>"$tree/drivers/misc/Makefile"
add_kconfig "$tree/drivers/misc/Kconfig" DMAVISOR_EDU "endmenu" <<'KCONFIG'

config DMAVISOR_EDU
	bool "edu-dma: DMA test driver for QEMU's edu PCI device (dmavisor)"
	depends on PCI_MSI && DMA_SHARED_BUFFER && 64BIT
	help
	  Drives QEMU's educational PCI device (1234:11e8) as dmavisor's
	  VFIO passthrough tests need: checks its registers, imports
	  dma-bufs and has the device DMA them through its 4 KiB buffer,
	  waiting for its MSI. /dev/edu-dma takes the ioctls in
	  edu_dma_uapi.h. For testing only.
KCONFIG
