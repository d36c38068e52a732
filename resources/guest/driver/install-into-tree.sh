#!/usr/bin/env bash
# Puts the virtio-dma guest driver into a Linux source tree as drivers/virtio/virtio_dma.c with
# its Kconfig symbol (CONFIG_VIRTIO_DMA). Built in, not a module: cma_alloc, cma_release and
# dma_heap_add are not exported to modules in 6.12. Idempotent.
set -euo pipefail
tree=$1
here=$(cd "$(dirname "$0")" && pwd)
cp "$here/virtio_dma.c" "$tree/drivers/virtio/virtio_dma.c"
grep -q 'virtio_dma.o' "$tree/drivers/virtio/Makefile" ||
  echo 'obj-$(CONFIG_VIRTIO_DMA) += virtio_dma.o' >>"$tree/drivers/virtio/Makefile"
if ! grep -q 'config VIRTIO_DMA$' "$tree/drivers/virtio/Kconfig"; then
  # Insert before the file's closing `endif # VIRTIO_MENU`.
  python3 - "$tree/drivers/virtio/Kconfig" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
entry = """config VIRTIO_DMA
	bool "virtio-dma: host-contiguous DMA buffers from the guest's CMA area"
	depends on VIRTIO && DMA_CMA && DMABUF_HEAPS
	help
	  Driver for dmavisor's virtio-dma device (device ID 200). Allocates
	  buffers with cma_alloc() on the CMA area that is the VMM's DMA
	  window, asks the host to back them with host-contiguous pinned
	  memory, and exports them as the dma-buf heaps "virtio-dma" and
	  "virtio-dma-failfast".

"""
i = s.rindex("endif # VIRTIO_MENU")
open(p, "w").write(s[:i] + entry + s[i:])
PY
fi
