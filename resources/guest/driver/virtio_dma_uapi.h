/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * virtio-dma: the device's wire format (feature bits, configuration layout, requests,
 * responses, status codes), as in docs/virtio-dma.md. Every field is little-endian.
 *
 * Installed into the guest kernel tree as include/uapi/linux/virtio_dma.h by
 * install-into-tree.sh, as upstream keeps each virtio device's wire format in
 * include/uapi/linux/virtio_<device>.h. The device ID is not here: upstream keeps it in
 * virtio_ids.h, and this one is not assigned yet (see the driver).
 */
#ifndef _UAPI_LINUX_VIRTIO_DMA_H
#define _UAPI_LINUX_VIRTIO_DMA_H

#include <linux/const.h>
#include <linux/types.h>

/* Feature bits */
#define VIRTIO_DMA_F_HOST_PHYS	0	/* MAP responses may carry host-physical addresses */
#define VIRTIO_DMA_F_DEADLINE	1	/* MAP honours deadline_ms */
#define VIRTIO_DMA_F_DISCARD	2	/* MAP and UNMAP honour VIRTIO_DMA_FLAG_DISCARD */
#define VIRTIO_DMA_F_SUB_GRANULE	3	/* MAP/UNMAP take whole units inside one granule */

/* With VIRTIO_DMA_F_SUB_GRANULE: the unit of a range shorter than the granule. */
#define VIRTIO_DMA_SUB_GRANULE_UNIT	4096

/* Virtqueues */
#define VIRTIO_DMA_MAPQ		0	/* MAP */
#define VIRTIO_DMA_CTRLQ	1	/* UNMAP, STAT */

struct virtio_dma_config {
	__le64 window_base;	/* guest-physical base of the DMA window */
	__le64 window_size;	/* bytes in the DMA window */
	__le32 granule;		/* MAP/UNMAP addresses and lengths are multiples of this */
	__le32 max_mappings;	/* most mappings that may exist at once */
	__le64 max_map_len;	/* largest MAP length the device can ever satisfy */
	__le64 region_size;	/* bytes of host memory behind all mappings */
};

/* Request types */
#define VIRTIO_DMA_T_MAP	1
#define VIRTIO_DMA_T_UNMAP	2
#define VIRTIO_DMA_T_STAT	3

/* Request flags */
#define VIRTIO_DMA_FLAG_FAILFAST	_BITUL(0)	/* MAP: never wait */
#define VIRTIO_DMA_FLAG_DISCARD		_BITUL(1)	/* MAP, UNMAP: contents need not be kept */

/* Device-readable request header: 32 bytes. */
struct virtio_dma_req {
	__le32 type;
	__le32 flags;
	__le64 gpa;		/* MAP, UNMAP: guest-physical start */
	__le64 len;		/* MAP, UNMAP: bytes */
	__le32 deadline_ms;	/* MAP without FAILFAST, with VIRTIO_DMA_F_DEADLINE */
	__le32 reserved;	/* 0 */
};

/* Response flags */
#define VIRTIO_DMA_RESP_HOST_PHYS	_BITUL(0)	/* host_addr is host-physical */

/* Device-writable response: 24 bytes. */
struct virtio_dma_resp {
	__le32 status;		/* VIRTIO_DMA_S_* */
	__le32 flags;		/* VIRTIO_DMA_RESP_* */
	__le64 host_addr;	/* MAP: where the range lives on the host */
	__le64 extent;		/* MAP: index of the host-contiguous extent holding it */
};

/* Device-writable, after the response of a STAT request: 64 bytes. */
struct virtio_dma_stat {
	__le64 mappings;
	__le64 mapped_bytes;
	__le64 maps_ok;
	__le64 maps_failed;
	__le64 maps_busy;
	__le64 maps_timeout;
	__le64 unmaps;
	__le64 bytes_migrated;
};

/* Status codes */
#define VIRTIO_DMA_S_OK		0
#define VIRTIO_DMA_S_INVAL	1
#define VIRTIO_DMA_S_RANGE	2
#define VIRTIO_DMA_S_UNALIGNED	3
#define VIRTIO_DMA_S_TOOBIG	4
#define VIRTIO_DMA_S_NOMEM	5
#define VIRTIO_DMA_S_BUSY	6
#define VIRTIO_DMA_S_TIMEOUT	7
#define VIRTIO_DMA_S_EXISTS	8
#define VIRTIO_DMA_S_NOENT	9
#define VIRTIO_DMA_S_IOERR	10

#endif /* _UAPI_LINUX_VIRTIO_DMA_H */
