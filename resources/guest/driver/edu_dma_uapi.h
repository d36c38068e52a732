/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * /dev/edu-dma: ioctls of the edu-dma test driver (edu_dma.c), shared with the guest program
 * resources/guest/programs/edudma.c.
 *
 * A buffer's DMA address: the guest has no IOMMU, so the DMA API hands the device the guest
 * physical address of a buffer, and on the host the IOMMU maps IOVA = guest physical address
 * for every range virtio-dma MAPped. EDU_DMA_IOC_ADDR tells a program that address for any
 * dma-buf (the driver attaches the buffer to the device and maps it, as a real importer does);
 * it is not a way to choose addresses: every DMA the driver starts uses the address the DMA
 * API gave it, except EDU_DMA_IOC_RAW_TO_RAM, which exists to aim at memory nobody mapped.
 */
#ifndef EDU_DMA_UAPI_H
#define EDU_DMA_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

/*
 * The device's own buffer: every DMA goes through it, so one transfer is at most 4096 bytes,
 * and at most edu_dma_info.max_len (4095 by default: see the driver's dev_buf_bytes).
 */
#define EDU_DMA_DEV_BUF_SIZE 4096

struct edu_dma_info {
	__u32 ident;		/* register 0x00: 0xMMmm00ed (major, minor version) */
	__u32 live_ok;		/* register 0x04 read back the complement of what was written */
	__u32 msi_vectors;	/* MSI vectors allocated (1) */
	__u32 msi_selftest_ok;	/* an interrupt raised through register 0x60 arrived at probe */
	__u64 interrupts;	/* interrupts handled since probe */
	__u64 dmas;		/* DMA transfers started */
	__u64 timeouts;		/* DMA transfers whose interrupt did not come in time */
	__u64 bar0_start;	/* BAR0 as the guest sees it */
	__u64 bar0_len;
	__u32 irq;		/* the Linux IRQ number of the MSI vector */
	__u32 dead;		/* a DMA never finished: the driver refuses further DMA */
	__u32 max_len;		/* the longest transfer; dev_offset + len <= max_len */
	__u32 reserved;
};

/* dma-buf [src_offset, +len) -> device buffer [dev_offset, +len) -> dma-buf [dst_offset, +len). */
struct edu_dma_copy {
	__s32 src_fd;
	__s32 dst_fd;
	__u64 src_offset;
	__u64 dst_offset;
	__u32 len;		/* 1..max_len */
	__u32 dev_offset;	/* dev_offset + len <= max_len */
	__u64 src_bus;		/* out: the bus addresses the device was given */
	__u64 dst_bus;
};

/* The bus address of a dma-buf at an offset, as the DMA API maps it for the device. */
struct edu_dma_addr {
	__s32 fd;
	__u32 segments;		/* out: DMA segments of the whole mapping */
	__u64 offset;
	__u64 bus;		/* out: bus address at offset (== guest physical address) */
	__u64 contig;		/* out: bytes bus-contiguous from offset */
	__u64 size;		/* out: the buffer's size */
};

/*
 * Test hook: DMA dma-buf [src_offset, +len) into the device, then from the device straight to
 * guest physical address phys, bypassing the DMA API. [phys, +len) must be ordinary RAM within
 * one page. The driver snapshots that RAM before the second DMA and compares after it: with the
 * host IOMMU blocking the write, changed stays 0.
 */
struct edu_dma_raw {
	__s32 src_fd;
	__u32 len;		/* 1..max_len */
	__u64 src_offset;
	__u64 phys;
	__u64 changed;		/* out: bytes at phys that differ from the snapshot */
	__u64 now_src;		/* out: of those, bytes that now equal the source's */
	__u64 src_bus;		/* out: the bus addresses the device was given */
	__u64 dst_bus;		/* out: phys as the DMA API maps it (no guest IOMMU: phys) */
};

#define EDU_DMA_IOC_MAGIC 0xed
#define EDU_DMA_IOC_INFO _IOR(EDU_DMA_IOC_MAGIC, 0, struct edu_dma_info)
#define EDU_DMA_IOC_COPY _IOWR(EDU_DMA_IOC_MAGIC, 1, struct edu_dma_copy)
#define EDU_DMA_IOC_ADDR _IOWR(EDU_DMA_IOC_MAGIC, 2, struct edu_dma_addr)
#define EDU_DMA_IOC_RAW_TO_RAM _IOWR(EDU_DMA_IOC_MAGIC, 3, struct edu_dma_raw)

#endif /* EDU_DMA_UAPI_H */
