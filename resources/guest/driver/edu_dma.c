// SPDX-License-Identifier: GPL-2.0
/*
 * edu-dma: test driver for QEMU's "edu" PCI device (1234:11e8), the device dmavisor passes
 * through with VFIO. It treats a buffer the way a real DMA-capable driver does: it imports a
 * dma-buf (attach, map), has the device DMA it through the device's own 4 KiB buffer, and
 * waits for the MSI the device raises when a transfer completes.
 *
 * /dev/edu-dma: the ioctls in edu_dma_uapi.h. One transfer at a time per device.
 *
 * edu's registers (BAR0, QEMU's hw/misc/edu.c): 0x00 identification, 0x04 liveness (reads back
 * the complement of what was written), 0x24 interrupt status, 0x60 raise, 0x64 acknowledge,
 * 0x80 and 0x88 DMA source and destination (64 bits: one 8-byte write each; a 4-byte write
 * sets the whole address), 0x90 count, 0x98 command. The device's buffer is at device address
 * 0x40000, reachable only by DMA. A DMA blocked by an IOMMU still completes and interrupts.
 */
#include <linux/completion.h>
#include <linux/dma-buf.h>
#include <linux/dma-mapping.h>
#include <linux/highmem.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/iopoll.h>
#include <linux/iosys-map.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "edu_dma_uapi.h"

#define EDU_REG_IDENT		0x00
#define EDU_REG_LIVE		0x04
#define EDU_REG_IRQ_STATUS	0x24
#define EDU_REG_IRQ_RAISE	0x60
#define EDU_REG_IRQ_ACK		0x64
#define EDU_REG_DMA_SRC		0x80
#define EDU_REG_DMA_DST		0x88
#define EDU_REG_DMA_COUNT	0x90
#define EDU_REG_DMA_CMD		0x98

#define EDU_DMA_RUN		BIT(0)	/* cleared by the device when the transfer is done */
#define EDU_DMA_TO_RAM		BIT(1)	/* 0: RAM -> device buffer, 1: device buffer -> RAM */
#define EDU_DMA_IRQ		BIT(2)	/* raise EDU_IRQ_DMA when done */

#define EDU_IRQ_DMA		0x100
#define EDU_IRQ_SELFTEST	0x10000	/* raised by hand through EDU_REG_IRQ_RAISE */

#define EDU_DEV_BUF		0x40000

static unsigned int timeout_ms = 2000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "How long one DMA transfer may take before it fails with ETIMEDOUT");

/*
 * QEMU's edu before its range-check fix (7.2, this project's sandbox host) stops the whole VM
 * with hw_error() on a transfer that reaches the last byte of its buffer.
 */
static unsigned int dev_buf_bytes = EDU_DMA_DEV_BUF_SIZE - 1;
module_param(dev_buf_bytes, uint, 0644);
MODULE_PARM_DESC(dev_buf_bytes,
		 "Bytes of edu's 4 KiB buffer that transfers use (4096 only with a fixed QEMU)");

static bool intx;
module_param(intx, bool, 0444);
MODULE_PARM_DESC(intx, "Use the legacy INTx line instead of MSI");

/*
 * A device whose DMA segments are at most this long (dma_set_max_seg_size()); 0 keeps the PCI
 * default (64 KiB) unchecked. When set, importing a dma-buf whose mapping has a longer segment
 * fails with EINVAL, as such a device could not be programmed with it: a test of exporters.
 */
static unsigned int max_seg_kib;
module_param(max_seg_kib, uint, 0444);
MODULE_PARM_DESC(max_seg_kib, "Largest DMA segment the device takes, in KiB (0: PCI default)");

static DEFINE_IDA(edu_ida);

struct edu {
	struct pci_dev *pdev;
	void __iomem *bar;
	int irq;
	int index;
	char name[16];
	struct miscdevice misc;
	struct kref ref;	/* the PCI binding and each open file */
	struct mutex lock;	/* one transfer at a time; protects gone, dead, dmas, timeouts */
	bool gone;		/* unbound: the BAR and the interrupt are no longer ours */
	bool dead;		/* a transfer never finished: the device may still write memory */
	struct completion dma_done;
	struct completion selftest_done;
	u32 ident;
	bool live_ok;
	bool msi_selftest_ok;
	atomic64_t interrupts;
	u64 dmas;
	u64 timeouts;
};

static irqreturn_t edu_irq(int irq, void *data)
{
	struct edu *edu = data;
	u32 status = readl(edu->bar + EDU_REG_IRQ_STATUS);

	if (!status)
		return IRQ_NONE;
	writel(status, edu->bar + EDU_REG_IRQ_ACK);
	atomic64_inc(&edu->interrupts);
	if (status & EDU_IRQ_DMA)
		complete(&edu->dma_done);
	if (status & EDU_IRQ_SELFTEST)
		complete(&edu->selftest_done);
	return IRQ_HANDLED;
}

/*
 * Runs one transfer and waits for its interrupt. On failure the transfer may have outlived the
 * wait; if it is still running after a further second the device is marked dead and the caller
 * must keep the memory involved (it may still be written).
 */
static int edu_dma(struct edu *edu, u64 src, u64 dst, u32 len, u32 dir)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	long left = 0;
	u32 cmd;

	lockdep_assert_held(&edu->lock);
	reinit_completion(&edu->dma_done);
	writeq(src, edu->bar + EDU_REG_DMA_SRC);
	writeq(dst, edu->bar + EDU_REG_DMA_DST);
	writel(len, edu->bar + EDU_REG_DMA_COUNT);
	writel(EDU_DMA_RUN | EDU_DMA_IRQ | dir, edu->bar + EDU_REG_DMA_CMD);
	edu->dmas++;
	while (time_before(jiffies, deadline)) {
		left = wait_for_completion_killable_timeout(&edu->dma_done, deadline - jiffies);
		if (left <= 0)
			break;
		/* A late interrupt from a transfer that timed out earlier: ours still runs. */
		if (!(readl(edu->bar + EDU_REG_DMA_CMD) & EDU_DMA_RUN))
			return 0;
	}
	if (left == 0)
		edu->timeouts++;
	if (readl_poll_timeout(edu->bar + EDU_REG_DMA_CMD, cmd, !(cmd & EDU_DMA_RUN),
			       1000, USEC_PER_SEC)) {
		edu->dead = true;
		dev_err(&edu->pdev->dev,
			"DMA %#llx -> %#llx (%u bytes) never finished; no more DMA, its buffers stay held\n",
			src, dst, len);
		return -EIO;
	}
	if (left == 0)
		dev_warn_ratelimited(&edu->pdev->dev,
				     "DMA %#llx -> %#llx (%u bytes): no interrupt in %u ms\n",
				     src, dst, len, timeout_ms);
	return left < 0 ? -EINTR : -ETIMEDOUT;
}

/* A dma-buf imported for the device: attached and mapped, as any DMA-capable importer does. */
struct edu_import {
	struct dma_buf *buf;
	struct dma_buf_attachment *att;
	struct sg_table *sgt;
};

static int edu_import(struct edu *edu, int fd, struct edu_import *imp)
{
	int ret;

	imp->buf = dma_buf_get(fd);
	if (IS_ERR(imp->buf))
		return PTR_ERR(imp->buf);
	imp->att = dma_buf_attach(imp->buf, &edu->pdev->dev);
	if (IS_ERR(imp->att)) {
		ret = PTR_ERR(imp->att);
		goto put;
	}
	imp->sgt = dma_buf_map_attachment_unlocked(imp->att, DMA_BIDIRECTIONAL);
	if (IS_ERR(imp->sgt)) {
		ret = PTR_ERR(imp->sgt);
		goto detach;
	}
	if (max_seg_kib) {
		unsigned int max = dma_get_max_seg_size(&edu->pdev->dev), i;
		struct scatterlist *sg;

		for_each_sgtable_dma_sg(imp->sgt, sg, i) {
			if (sg_dma_len(sg) > max) {
				dev_warn(&edu->pdev->dev, "dma-buf segment of %u bytes, longer than %u\n",
					 sg_dma_len(sg), max);
				ret = -EINVAL;
				goto unmap;
			}
		}
	}
	return 0;
unmap:
	dma_buf_unmap_attachment_unlocked(imp->att, imp->sgt, DMA_BIDIRECTIONAL);
detach:
	dma_buf_detach(imp->buf, imp->att);
put:
	dma_buf_put(imp->buf);
	return ret;
}

static void edu_unimport(struct edu_import *imp)
{
	dma_buf_unmap_attachment_unlocked(imp->att, imp->sgt, DMA_BIDIRECTIONAL);
	dma_buf_detach(imp->buf, imp->att);
	dma_buf_put(imp->buf);
}

/*
 * The bus address at @offset of a mapped dma-buf and how many bytes from there are contiguous
 * on the bus (segments whose addresses follow on from each other are one run for the device).
 */
static int edu_bus_at(struct sg_table *sgt, u64 offset, u64 *bus, u64 *contig)
{
	struct scatterlist *sg;
	u64 start = 0, next = 0;
	bool found = false;
	unsigned int i;

	for_each_sgtable_dma_sg(sgt, sg, i) {
		u64 addr = sg_dma_address(sg), len = sg_dma_len(sg);

		if (found) {
			if (addr != next)
				break;
			*contig += len;
			next += len;
		} else if (offset < start + len) {
			found = true;
			*bus = addr + (offset - start);
			*contig = start + len - offset;
			next = addr + len;
		}
		start += len;
	}
	return found ? 0 : -EINVAL;
}

/* [offset, offset + len) must be one bus-contiguous run: the device takes one address. */
static int edu_bus_range(struct sg_table *sgt, u64 offset, u32 len, u64 *bus)
{
	u64 contig;
	int ret = edu_bus_at(sgt, offset, bus, &contig);

	if (ret)
		return ret;
	return contig >= len ? 0 : -EINVAL;
}

static u32 edu_max_len(void)
{
	return clamp(READ_ONCE(dev_buf_bytes), 1U, EDU_DMA_DEV_BUF_SIZE);
}

static bool edu_len_ok(u32 len, u32 dev_offset)
{
	u32 max = edu_max_len();

	return len && len <= max && dev_offset <= max - len;
}

static long edu_ioctl_info(struct edu *edu, void __user *uarg)
{
	struct edu_dma_info info = {
		.ident = edu->ident,
		.live_ok = edu->live_ok,
		.msi_vectors = edu->pdev->msi_enabled ? 1 : 0,
		.msi_selftest_ok = edu->msi_selftest_ok,
		.interrupts = atomic64_read(&edu->interrupts),
		.dmas = edu->dmas,
		.timeouts = edu->timeouts,
		.bar0_start = pci_resource_start(edu->pdev, 0),
		.bar0_len = pci_resource_len(edu->pdev, 0),
		.irq = edu->irq,
		.dead = edu->dead,
		.max_len = edu_max_len(),
	};

	return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
}

static long edu_ioctl_copy(struct edu *edu, void __user *uarg)
{
	struct edu_import src, dst;
	struct edu_dma_copy c;
	u64 dev;
	int ret;

	if (copy_from_user(&c, uarg, sizeof(c)))
		return -EFAULT;
	if (!edu_len_ok(c.len, c.dev_offset))
		return -EINVAL;
	dev = EDU_DEV_BUF + c.dev_offset;
	ret = edu_import(edu, c.src_fd, &src);
	if (ret)
		return ret;
	ret = edu_import(edu, c.dst_fd, &dst);
	if (ret)
		goto src;
	ret = edu_bus_range(src.sgt, c.src_offset, c.len, &c.src_bus);
	if (!ret)
		ret = edu_bus_range(dst.sgt, c.dst_offset, c.len, &c.dst_bus);
	if (!ret)
		ret = edu_dma(edu, c.src_bus, dev, c.len, 0);
	if (!ret)
		ret = edu_dma(edu, dev, c.dst_bus, c.len, EDU_DMA_TO_RAM);
	if (ret && edu->dead)
		return ret;	/* the device may still write: both buffers stay held */
	edu_unimport(&dst);
src:
	edu_unimport(&src);
	if (ret)
		return ret;
	return copy_to_user(uarg, &c, sizeof(c)) ? -EFAULT : 0;
}

static long edu_ioctl_addr(struct edu *edu, void __user *uarg)
{
	struct edu_import imp;
	struct edu_dma_addr a;
	int ret;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	ret = edu_import(edu, a.fd, &imp);
	if (ret)
		return ret;
	ret = edu_bus_at(imp.sgt, a.offset, &a.bus, &a.contig);
	a.segments = imp.sgt->nents;
	a.size = imp.buf->size;
	edu_unimport(&imp);
	if (ret)
		return ret;
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

/* The source's bytes, read by the CPU: what the device buffer holds once they are DMAed in. */
static int edu_read_source(struct dma_buf *buf, u64 offset, u32 len, u8 *out)
{
	struct iosys_map map;
	int ret;

	if (offset > buf->size || len > buf->size - offset)
		return -EINVAL;
	ret = dma_buf_begin_cpu_access(buf, DMA_FROM_DEVICE);
	if (ret)
		return ret;
	ret = dma_buf_vmap_unlocked(buf, &map);
	if (!ret) {
		iosys_map_memcpy_from(out, &map, offset, len);
		dma_buf_vunmap_unlocked(buf, &map);
	}
	dma_buf_end_cpu_access(buf, DMA_FROM_DEVICE);
	return ret;
}

/*
 * The target is mapped with the DMA API like any buffer, but it is no dma-buf: on the host
 * nothing maps it into the IOMMU, so the write is expected to be blocked.
 */
static long edu_ioctl_raw(struct edu *edu, void __user *uarg)
{
	unsigned int page_off;
	struct edu_import src;
	struct edu_dma_raw r;
	struct page *page;
	u8 *before, *expect, *va;
	dma_addr_t bus;
	unsigned long pfn;
	u32 i;
	int ret;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	page_off = offset_in_page(r.phys);
	if (!edu_len_ok(r.len, 0) || page_off + r.len > PAGE_SIZE)
		return -EINVAL;
	pfn = PHYS_PFN(r.phys);
	if (!pfn_valid(pfn) || !page_is_ram(pfn))
		return -EINVAL;
	page = pfn_to_page(pfn);
	before = kmalloc_array(2, r.len, GFP_KERNEL);
	if (!before)
		return -ENOMEM;
	expect = before + r.len;
	ret = edu_import(edu, r.src_fd, &src);
	if (ret)
		goto free;
	ret = edu_bus_range(src.sgt, r.src_offset, r.len, &r.src_bus);
	if (!ret)
		ret = edu_read_source(src.buf, r.src_offset, r.len, expect);
	if (!ret)
		ret = edu_dma(edu, r.src_bus, EDU_DEV_BUF, r.len, 0);
	if (ret)
		goto unimport;

	bus = dma_map_page(&edu->pdev->dev, page, page_off, r.len, DMA_FROM_DEVICE);
	ret = dma_mapping_error(&edu->pdev->dev, bus);
	if (ret)
		goto unimport;
	va = kmap_local_page(page);
	memcpy(before, va + page_off, r.len);
	kunmap_local(va);
	ret = edu_dma(edu, EDU_DEV_BUF, bus, r.len, EDU_DMA_TO_RAM);
	if (!(ret && edu->dead))
		dma_unmap_page(&edu->pdev->dev, bus, r.len, DMA_FROM_DEVICE);
	if (ret)
		goto unimport;

	r.changed = 0;
	r.now_src = 0;
	va = kmap_local_page(page);
	for (i = 0; i < r.len; i++) {
		u8 now = va[page_off + i];

		if (now != before[i]) {
			r.changed++;
			r.now_src += now == expect[i];
		}
	}
	kunmap_local(va);
	r.dst_bus = bus;
unimport:
	/* A transfer that never finished may still read the source: it stays held. */
	if (!(ret && edu->dead))
		edu_unimport(&src);
free:
	kfree(before);
	if (ret)
		return ret;
	return copy_to_user(uarg, &r, sizeof(r)) ? -EFAULT : 0;
}

static int edu_open(struct inode *inode, struct file *file)
{
	struct edu *edu = container_of(file->private_data, struct edu, misc);

	/* misc_open() holds misc_mtx, which misc_deregister() takes: edu is still alive. */
	kref_get(&edu->ref);
	file->private_data = edu;
	return 0;
}

static void edu_free(struct kref *ref)
{
	struct edu *edu = container_of(ref, struct edu, ref);

	ida_free(&edu_ida, edu->index);
	kfree(edu);
}

static int edu_release(struct inode *inode, struct file *file)
{
	struct edu *edu = file->private_data;

	kref_put(&edu->ref, edu_free);
	return 0;
}

static long edu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct edu *edu = file->private_data;
	void __user *uarg = (void __user *)arg;
	long ret;

	if (mutex_lock_killable(&edu->lock))
		return -EINTR;
	if (edu->gone) {
		ret = -ENODEV;
		goto out;
	}
	switch (cmd) {
	case EDU_DMA_IOC_INFO:
		ret = edu_ioctl_info(edu, uarg);
		break;
	case EDU_DMA_IOC_ADDR:
		ret = edu_ioctl_addr(edu, uarg);
		break;
	case EDU_DMA_IOC_COPY:
		ret = edu->dead ? -EIO : edu_ioctl_copy(edu, uarg);
		break;
	case EDU_DMA_IOC_RAW_TO_RAM:
		ret = edu->dead ? -EIO : edu_ioctl_raw(edu, uarg);
		break;
	default:
		ret = -ENOTTY;
	}
out:
	mutex_unlock(&edu->lock);
	return ret;
}

static const struct file_operations edu_fops = {
	.owner = THIS_MODULE,
	.open = edu_open,
	.release = edu_release,
	.unlocked_ioctl = edu_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

/* The identification and liveness registers: is BAR0 really this device's? */
static int edu_check_registers(struct edu *edu)
{
	struct device *dev = &edu->pdev->dev;
	u32 probe = 0x5aa50000 | (edu->index & 0xffff), back;

	edu->ident = readl(edu->bar + EDU_REG_IDENT);
	if ((edu->ident & 0xffff) != 0x00ed) {
		dev_err(dev, "identification register reads %#010x, not 0xMMmm00ed\n", edu->ident);
		return -ENODEV;
	}
	writel(probe, edu->bar + EDU_REG_LIVE);
	back = readl(edu->bar + EDU_REG_LIVE);
	edu->live_ok = back == ~probe;
	if (!edu->live_ok) {
		dev_err(dev, "liveness register: wrote %#010x, read %#010x, not %#010x\n",
			probe, back, ~probe);
		return -ENODEV;
	}
	return 0;
}

/* An interrupt raised by hand: MSI delivery is known before any DMA waits on it. */
static void edu_msi_selftest(struct edu *edu)
{
	writel(EDU_IRQ_SELFTEST, edu->bar + EDU_REG_IRQ_RAISE);
	edu->msi_selftest_ok = wait_for_completion_timeout(&edu->selftest_done, HZ) > 0;
	if (!edu->msi_selftest_ok)
		dev_warn(&edu->pdev->dev, "the interrupt raised at probe did not arrive in 1 s\n");
}

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct edu *edu;
	int ret;

	ret = pcim_enable_device(pdev);
	if (ret)
		return dev_err_probe(dev, ret, "cannot enable the device\n");
	pci_set_master(pdev);
	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret)
		return dev_err_probe(dev, ret, "no 64-bit DMA\n");
	if (max_seg_kib)
		dma_set_max_seg_size(dev, max_seg_kib << 10);

	edu = kzalloc(sizeof(*edu), GFP_KERNEL);
	if (!edu)
		return -ENOMEM;
	edu->pdev = pdev;
	kref_init(&edu->ref);
	mutex_init(&edu->lock);
	init_completion(&edu->dma_done);
	init_completion(&edu->selftest_done);
	edu->index = ida_alloc(&edu_ida, GFP_KERNEL);
	if (edu->index < 0) {
		ret = edu->index;
		kfree(edu);
		return ret;
	}

	edu->bar = pcim_iomap_region(pdev, 0, "edu-dma");
	if (IS_ERR(edu->bar)) {
		ret = dev_err_probe(dev, PTR_ERR(edu->bar), "cannot map BAR0 %pR\n",
				    &pdev->resource[0]);
		goto put;
	}
	ret = edu_check_registers(edu);
	if (ret)
		goto put;

	ret = pci_alloc_irq_vectors(pdev, 1, 1, intx ? PCI_IRQ_INTX : PCI_IRQ_MSI);
	if (ret < 0) {
		dev_err_probe(dev, ret, "no %s interrupt\n", intx ? "INTx" : "MSI");
		goto put;
	}
	edu->irq = pci_irq_vector(pdev, 0);
	ret = request_irq(edu->irq, edu_irq, intx ? IRQF_SHARED : 0, "edu-dma", edu);
	if (ret) {
		dev_err_probe(dev, ret, "cannot request IRQ %d\n", edu->irq);
		goto put;
	}
	edu_msi_selftest(edu);

	if (edu->index)
		snprintf(edu->name, sizeof(edu->name), "edu-dma%d", edu->index);
	else
		strscpy(edu->name, "edu-dma", sizeof(edu->name));
	edu->misc.minor = MISC_DYNAMIC_MINOR;
	edu->misc.name = edu->name;
	edu->misc.fops = &edu_fops;
	edu->misc.parent = dev;
	edu->misc.mode = 0600;
	ret = misc_register(&edu->misc);
	if (ret) {
		dev_err_probe(dev, ret, "cannot register /dev/%s\n", edu->name);
		goto irq;
	}
	pci_set_drvdata(pdev, edu);
	dev_info(dev, "edu %u.%u, BAR0 %pR, %s IRQ %d%s: /dev/%s\n", edu->ident >> 24,
		 (edu->ident >> 16) & 0xff, &pdev->resource[0], intx ? "INTx" : "MSI", edu->irq,
		 edu->msi_selftest_ok ? "" : " (self-test interrupt lost)", edu->name);
	return 0;

irq:
	free_irq(edu->irq, edu);
put:
	kref_put(&edu->ref, edu_free);
	return ret;
}

static void edu_remove(struct pci_dev *pdev)
{
	struct edu *edu = pci_get_drvdata(pdev);

	misc_deregister(&edu->misc);
	mutex_lock(&edu->lock);
	edu->gone = true;
	mutex_unlock(&edu->lock);
	free_irq(edu->irq, edu);
	kref_put(&edu->ref, edu_free);
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DEVICE(0x1234, 0x11e8) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static struct pci_driver edu_driver = {
	.name = "edu-dma",
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
};
module_pci_driver(edu_driver);

MODULE_IMPORT_NS(DMA_BUF);
MODULE_DESCRIPTION("edu-dma: DMA through QEMU's edu PCI device, for dmavisor's VFIO tests");
MODULE_LICENSE("GPL");
