// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dma guest driver (dmavisor, docs/virtio-dma.md).
 *
 * Buffers come from the guest kernel's own CMA area (cma_alloc() on the area that is the
 * VMM's DMA window); the device is then asked to MAP them, which makes them host-contiguous
 * and pinned on the host. They are exported as the dma-buf heaps "virtio-dma" (MAP retries
 * within a deadline) and "virtio-dma-failfast" (MAP never waits). Buffers smaller than 2 MiB
 * share MAPped 2 MiB chunks. Ending a mapping sends UNMAP without waiting; the pages return to
 * CMA once the device has answered.
 *
 * debugfs (virtio-dma/): buffers (gpa, length, host address of every live buffer), stats
 * (the device's counters), raw (send one request header verbatim and read its status: for
 * testing how the device treats malformed requests), timer_free (allocate a buffer and drop
 * the last reference from a timer callback).
 */
#include <linux/cma.h>
#include <linux/debugfs.h>
#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <linux/dma-map-ops.h>
#include <linux/highmem.h>
#include <linux/iosys-map.h>
#include <linux/mm.h>
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/timer.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/workqueue.h>

#define VIRTIO_ID_DMA 60

#define VIRTIO_DMA_F_HOST_PHYS 0
#define VIRTIO_DMA_F_DEADLINE 1
#define VIRTIO_DMA_F_DISCARD 2

#define REQ_MAP 1
#define REQ_UNMAP 2
#define REQ_STAT 3
#define MAP_FAILFAST (1u << 0)
#define MAP_DISCARD (1u << 1)
#define RESP_HOST_PHYS (1u << 0)

enum vdma_status {
	VDMA_OK = 0, VDMA_INVAL, VDMA_RANGE, VDMA_UNALIGNED, VDMA_TOOBIG, VDMA_NOMEM,
	VDMA_BUSY, VDMA_TIMEOUT, VDMA_EXISTS, VDMA_NOENT, VDMA_IOERR,
};

struct virtio_dma_config {
	__le64 window_base;
	__le64 window_size;
	__le32 granule;
	__le32 max_mappings;
	__le64 max_map_len;
	__le64 region_size;
};

struct virtio_dma_req {
	__le32 type;
	__le32 flags;
	__le64 gpa;
	__le64 len;
	__le32 deadline_ms;
	__le32 reserved;
};

struct virtio_dma_resp {
	__le32 status;
	__le32 flags;
	__le64 host_addr;
	__le64 extent;
	__le64 stat[8]; /* only STAT fills these */
};

static unsigned int deadline_ms = 1000;
module_param(deadline_ms, uint, 0644);
MODULE_PARM_DESC(deadline_ms, "How long a (non-failfast) MAP may retry on the host");

struct vdma;
struct vdma_buffer;

struct vdma_chunk;

/* One request in flight. Either waited for (done) or finished by a work item (work). */
struct vdma_request {
	struct virtio_dma_req req;
	struct virtio_dma_resp resp;
	unsigned int resp_len;
	struct completion done;
	struct work_struct work;
	bool async;
	struct vdma_chunk *chunk;
};

/*
 * Buffers smaller than a chunk share 2 MiB chunks: one cma_alloc() and one MAP per chunk, and
 * a buffer is a run of pages in it (seed 004's "chunk heap"). Larger buffers get a chunk of
 * their own. At most one empty chunk is kept mapped for the next small buffer.
 */
#define POOL_CHUNK_ORDER 9
#define POOL_CHUNK_PAGES (1UL << POOL_CHUNK_ORDER)

/* A host mapping: guest pages from cma_alloc() that the device has MAPped. */
struct vdma_chunk {
	struct vdma *v;
	struct list_head node; /* in v->pool, for pooled chunks */
	struct page *pages;
	unsigned long pagecount;
	u64 host_addr;
	u32 resp_flags;
	u64 extent;
	bool pooled;
	unsigned long used; /* pages handed out, for pooled chunks; under v->pool_lock */
	DECLARE_BITMAP(map, POOL_CHUNK_PAGES);
	struct vdma_request *unmap; /* preallocated: ending a mapping never allocates */
};

struct vdma {
	struct virtio_device *vdev;
	struct virtqueue *mapq, *ctrlq;
	spinlock_t mapq_lock, ctrlq_lock; /* serialise virtqueue_add/get on each queue */
	struct cma *cma;
	u64 window_base, window_size, granule, max_map_len;
	struct dma_heap *heap, *heap_failfast;
	spinlock_t buffers_lock; /* protects buffers */
	struct list_head buffers;
	spinlock_t pool_lock; /* protects pool and every pooled chunk's map and used */
	struct list_head pool;
	struct dentry *debugfs;
	struct mutex raw_lock; /* one raw request at a time */
	u32 raw_status;
	atomic64_t unmaps_sent;
	atomic64_t cma_retries;
	atomic64_t host_busy_skips;
};

/* Only one device is expected; the heaps and debugfs are per device, named for the first. */
static struct vdma *vdma_global;

struct vdma_heap_priv {
	struct vdma *v;
	bool failfast;
};

static struct vdma_heap_priv heap_retry, heap_failfast;

struct vdma_buffer {
	struct vdma *v;
	struct list_head node; /* in v->buffers */
	struct list_head attachments;
	struct mutex lock; /* protects attachments */
	struct vdma_chunk *chunk;
	unsigned long first; /* page index in the chunk */
	struct page *pages;
	unsigned long pagecount;
	size_t size;
	bool failfast;
};

struct vdma_attachment {
	struct device *dev;
	struct sg_table table;
	struct list_head list;
	bool mapped;
};

static struct virtqueue *vdma_queue(struct vdma *v, u32 type, spinlock_t **lock)
{
	if (type == REQ_MAP) {
		*lock = &v->mapq_lock;
		return v->mapq;
	}
	*lock = &v->ctrlq_lock;
	return v->ctrlq;
}

static int vdma_send(struct vdma *v, struct vdma_request *r, gfp_t gfp)
{
	struct scatterlist out, in, *sgs[2];
	unsigned int in_len = le32_to_cpu(r->req.type) == REQ_STAT ?
		sizeof(r->resp) : offsetof(struct virtio_dma_resp, stat);
	struct virtqueue *vq;
	spinlock_t *lock;
	unsigned long flags;
	int err;

	vq = vdma_queue(v, le32_to_cpu(r->req.type), &lock);
	sg_init_one(&out, &r->req, sizeof(r->req));
	sg_init_one(&in, &r->resp, in_len);
	sgs[0] = &out;
	sgs[1] = &in;
	spin_lock_irqsave(lock, flags);
	err = virtqueue_add_sgs(vq, sgs, 1, 1, r, gfp);
	if (!err)
		virtqueue_kick(vq);
	spin_unlock_irqrestore(lock, flags);
	return err;
}

static void vdma_vq_done(struct virtqueue *vq)
{
	struct vdma *v = vq->vdev->priv;
	spinlock_t *lock = vq == v->mapq ? &v->mapq_lock : &v->ctrlq_lock;
	struct vdma_request *r;
	unsigned long flags;
	unsigned int len;

	spin_lock_irqsave(lock, flags);
	do {
		virtqueue_disable_cb(vq);
		while ((r = virtqueue_get_buf(vq, &len))) {
			r->resp_len = len;
			if (r->async)
				schedule_work(&r->work);
			else
				complete(&r->done);
		}
	} while (!virtqueue_enable_cb(vq));
	spin_unlock_irqrestore(lock, flags);
}

/* Sends a request and waits for its answer; returns the device's status or -errno. */
static int vdma_request_sync(struct vdma *v, struct vdma_request *r)
{
	int err;

	init_completion(&r->done);
	r->async = false;
	err = vdma_send(v, r, GFP_KERNEL);
	if (err)
		return err;
	wait_for_completion(&r->done);
	if (r->resp_len < offsetof(struct virtio_dma_resp, stat))
		return -EIO;
	return le32_to_cpu(r->resp.status);
}

static void vdma_fill(struct virtio_dma_req *req, u32 type, u32 flags, u64 gpa, u64 len, u32 deadline)
{
	memset(req, 0, sizeof(*req));
	req->type = cpu_to_le32(type);
	req->flags = cpu_to_le32(flags);
	req->gpa = cpu_to_le64(gpa);
	req->len = cpu_to_le64(len);
	req->deadline_ms = cpu_to_le32(deadline);
}

/* ---- dma-buf ops: one physically contiguous range, as the kernel's CMA heap ---- */

static int vdma_attach(struct dma_buf *dmabuf, struct dma_buf_attachment *attachment)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	struct vdma_attachment *a;

	a = kzalloc(sizeof(*a), GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	if (sg_alloc_table(&a->table, 1, GFP_KERNEL)) {
		kfree(a);
		return -ENOMEM;
	}
	sg_set_page(a->table.sgl, buffer->pages, buffer->size, 0);
	a->dev = attachment->dev;
	INIT_LIST_HEAD(&a->list);
	attachment->priv = a;
	mutex_lock(&buffer->lock);
	list_add(&a->list, &buffer->attachments);
	mutex_unlock(&buffer->lock);
	return 0;
}

static void vdma_detach(struct dma_buf *dmabuf, struct dma_buf_attachment *attachment)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	struct vdma_attachment *a = attachment->priv;

	mutex_lock(&buffer->lock);
	list_del(&a->list);
	mutex_unlock(&buffer->lock);
	sg_free_table(&a->table);
	kfree(a);
}

static struct sg_table *vdma_map_dma_buf(struct dma_buf_attachment *attachment,
					 enum dma_data_direction direction)
{
	struct vdma_attachment *a = attachment->priv;
	int ret = dma_map_sgtable(attachment->dev, &a->table, direction, 0);

	if (ret)
		return ERR_PTR(-ENOMEM);
	a->mapped = true;
	return &a->table;
}

static void vdma_unmap_dma_buf(struct dma_buf_attachment *attachment, struct sg_table *table,
			       enum dma_data_direction direction)
{
	struct vdma_attachment *a = attachment->priv;

	a->mapped = false;
	dma_unmap_sgtable(attachment->dev, table, direction, 0);
}

static int vdma_begin_cpu_access(struct dma_buf *dmabuf, enum dma_data_direction direction)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	struct vdma_attachment *a;

	mutex_lock(&buffer->lock);
	list_for_each_entry(a, &buffer->attachments, list)
		if (a->mapped)
			dma_sync_sgtable_for_cpu(a->dev, &a->table, direction);
	mutex_unlock(&buffer->lock);
	return 0;
}

static int vdma_end_cpu_access(struct dma_buf *dmabuf, enum dma_data_direction direction)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	struct vdma_attachment *a;

	mutex_lock(&buffer->lock);
	list_for_each_entry(a, &buffer->attachments, list)
		if (a->mapped)
			dma_sync_sgtable_for_device(a->dev, &a->table, direction);
	mutex_unlock(&buffer->lock);
	return 0;
}

static int vdma_mmap(struct dma_buf *dmabuf, struct vm_area_struct *vma)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	unsigned long len = vma->vm_end - vma->vm_start;

	if ((vma->vm_flags & (VM_SHARED | VM_MAYSHARE)) == 0)
		return -EINVAL;
	if (vma->vm_pgoff > buffer->pagecount || len > (buffer->pagecount - vma->vm_pgoff) << PAGE_SHIFT)
		return -EINVAL;
	return remap_pfn_range(vma, vma->vm_start, page_to_pfn(buffer->pages) + vma->vm_pgoff,
			       len, vma->vm_page_prot);
}

static int vdma_vmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vdma_buffer *buffer = dmabuf->priv;

	/* CMA pages on x86-64 are in the direct map. */
	iosys_map_set_vaddr(map, page_address(buffer->pages));
	return 0;
}

static void vdma_vunmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
}

/* The device has answered our UNMAP: the pages are ours again, return them to CMA. */
static void vdma_unmap_done(struct work_struct *work)
{
	struct vdma_request *r = container_of(work, struct vdma_request, work);
	struct vdma_chunk *c = r->chunk;
	struct vdma *v = c->v;
	int status = r->resp_len >= offsetof(struct virtio_dma_resp, stat) ?
		le32_to_cpu(r->resp.status) : -EIO;

	if (status != VDMA_OK)
		dev_warn(&v->vdev->dev, "UNMAP of %lu pages at %pa: status %d\n", c->pagecount,
			 &(phys_addr_t){ page_to_phys(c->pages) }, status);
	cma_release(v->cma, c->pages, c->pagecount);
	kfree(r);
	kfree(c);
}

/* Ends a chunk's mapping without waiting; the pages go back to CMA once the device answers. */
static void vdma_chunk_destroy(struct vdma_chunk *c)
{
	struct vdma *v = c->v;
	struct vdma_request *r = c->unmap;

	/* DISCARD: the pages go back to CMA; nobody needs what is in them. */
	vdma_fill(&r->req, REQ_UNMAP, MAP_DISCARD, page_to_phys(c->pages), c->pagecount << PAGE_SHIFT, 0);
	r->async = true;
	r->chunk = c;
	INIT_WORK(&r->work, vdma_unmap_done);
	atomic64_inc(&v->unmaps_sent);
	if (vdma_send(v, r, GFP_ATOMIC)) {
		/* The ring is full: the pages stay mapped on the host, so they must not go back. */
		dev_err(&v->vdev->dev, "cannot queue UNMAP; %lu pages leaked\n", c->pagecount);
	}
}

static int vdma_status_errno(struct vdma *v, int status);

/* Gives the ranges a MAP found busy back to the CMA area. */
static void vdma_release_aside(struct vdma *v, struct page **busy, unsigned int *nbusy,
			       unsigned long pagecount)
{
	while (*nbusy > 0)
		cma_release(v->cma, busy[--*nbusy], pagecount);
}

/* cma_alloc() + MAP: a new host-contiguous chunk of pagecount pages. */
static struct vdma_chunk *vdma_chunk_create(struct vdma *v, unsigned long pagecount, bool failfast)
{
	struct vdma_request *r = kzalloc(sizeof(*r), GFP_KERNEL);
	struct vdma_chunk *c = kzalloc(sizeof(*c), GFP_KERNEL);
	struct page *busy[8];
	unsigned int nbusy = 0;
	unsigned long until;
	unsigned int align;
	int ret = -ENOMEM;

	if (!r || !c)
		goto free;
	c->unmap = kzalloc(sizeof(*c->unmap), GFP_KERNEL);
	if (!c->unmap)
		goto free;
	c->v = v;
	c->pagecount = pagecount;
	INIT_LIST_HEAD(&c->node);
	align = max_t(unsigned int, get_order(pagecount << PAGE_SHIFT), get_order(v->granule));
	if (align > CONFIG_CMA_ALIGNMENT)
		align = max_t(unsigned int, CONFIG_CMA_ALIGNMENT, get_order(v->granule));
	/*
	 * Linux's cma_alloc() gives up when a page of the area cannot be migrated right now (it
	 * is pinned, or locked for I/O: seeds 000 and 001). Without FAILFAST, try again until the
	 * request's deadline, as the host does for its part of the MAP.
	 */
	until = jiffies + msecs_to_jiffies(failfast ? 0 : deadline_ms);
	for (;;) {
		int status;

		c->pages = cma_alloc(v->cma, pagecount, align, !failfast);
		if (!c->pages) {
			if (failfast || time_after(jiffies, until))
				break;
			/*
			 * Nothing free but the ranges kept aside: let them go (their pins may end, and
			 * buffers freed meanwhile come back) and look again in a moment.
			 */
			vdma_release_aside(v, busy, &nbusy, pagecount);
			atomic64_inc(&v->cma_retries);
			msleep(1);
			continue;
		}
		/* DISCARD: buffers are zeroed through the new host-contiguous backing. */
		vdma_fill(&r->req, REQ_MAP, MAP_DISCARD | (failfast ? MAP_FAILFAST : 0),
			  page_to_phys(c->pages), pagecount << PAGE_SHIFT, failfast ? 0 : deadline_ms);
		status = vdma_request_sync(v, r);
		/*
		 * BUSY without FAILFAST: the host holds a page of this range with a long-term pin
		 * (it waits out short ones itself). Keep the range aside so that the next cma_alloc()
		 * looks elsewhere, as Linux's cma_alloc() moves past a range it cannot migrate.
		 */
		if (status == VDMA_BUSY && !failfast && !time_after(jiffies, until)) {
			if (nbusy == ARRAY_SIZE(busy))
				vdma_release_aside(v, busy, &nbusy, pagecount);
			busy[nbusy++] = c->pages;
			c->pages = NULL;
			atomic64_inc(&v->host_busy_skips);
			continue;
		}
		ret = vdma_status_errno(v, status);
		if (ret) {
			cma_release(v->cma, c->pages, pagecount);
			c->pages = NULL;
		}
		break;
	}
	vdma_release_aside(v, busy, &nbusy, pagecount);
	if (!c->pages)
		goto free;
	c->host_addr = le64_to_cpu(r->resp.host_addr);
	c->resp_flags = le32_to_cpu(r->resp.flags);
	c->extent = le64_to_cpu(r->resp.extent);
	kfree(r);
	return c;
free:
	if (c)
		kfree(c->unmap);
	kfree(c);
	kfree(r);
	return ERR_PTR(ret);
}

/* A run of n pages, aligned to align_mask + 1, in a pooled chunk; NULL if none has room. */
static struct vdma_chunk *vdma_pool_take(struct vdma *v, unsigned long n, unsigned long align_mask,
					 unsigned long *first)
{
	struct vdma_chunk *c;
	unsigned long i;

	spin_lock_irq(&v->pool_lock);
	list_for_each_entry(c, &v->pool, node) {
		i = bitmap_find_next_zero_area(c->map, POOL_CHUNK_PAGES, 0, n, align_mask);
		if (i < POOL_CHUNK_PAGES) {
			bitmap_set(c->map, i, n);
			c->used += n;
			*first = i;
			spin_unlock_irq(&v->pool_lock);
			return c;
		}
	}
	spin_unlock_irq(&v->pool_lock);
	return NULL;
}

/* Gives a pooled buffer's pages back to its chunk; a second empty chunk is unmapped. */
static void vdma_pool_put(struct vdma *v, struct vdma_chunk *c, unsigned long first, unsigned long n)
{
	struct vdma_chunk *other, *drop = NULL;
	unsigned long flags;

	spin_lock_irqsave(&v->pool_lock, flags);
	bitmap_clear(c->map, first, n);
	c->used -= n;
	if (!c->used) {
		list_for_each_entry(other, &v->pool, node)
			if (other != c && !other->used) {
				drop = c;
				list_del(&c->node);
				break;
			}
	}
	spin_unlock_irqrestore(&v->pool_lock, flags);
	if (drop)
		vdma_chunk_destroy(drop);
}

/* Never blocks and never allocates. */
static void vdma_release(struct dma_buf *dmabuf)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	struct vdma *v = buffer->v;
	unsigned long flags;

	spin_lock_irqsave(&v->buffers_lock, flags);
	list_del(&buffer->node);
	spin_unlock_irqrestore(&v->buffers_lock, flags);
	if (buffer->chunk->pooled)
		vdma_pool_put(v, buffer->chunk, buffer->first, buffer->pagecount);
	else
		vdma_chunk_destroy(buffer->chunk);
	kfree(buffer);
}

static const struct dma_buf_ops vdma_buf_ops = {
	.attach = vdma_attach,
	.detach = vdma_detach,
	.map_dma_buf = vdma_map_dma_buf,
	.unmap_dma_buf = vdma_unmap_dma_buf,
	.begin_cpu_access = vdma_begin_cpu_access,
	.end_cpu_access = vdma_end_cpu_access,
	.mmap = vdma_mmap,
	.vmap = vdma_vmap,
	.vunmap = vdma_vunmap,
	.release = vdma_release,
};

static int vdma_status_errno(struct vdma *v, int status)
{
	switch (status) {
	case VDMA_OK:
		return 0;
	case VDMA_NOMEM:
	case VDMA_TOOBIG:
	case VDMA_BUSY:
	case VDMA_TIMEOUT:
		return -ENOMEM;
	default:
		if (status > 0)
			dev_warn(&v->vdev->dev, "MAP refused with status %d\n", status);
		return status < 0 ? status : -EIO;
	}
}

static struct dma_buf *vdma_allocate(struct dma_heap *heap, unsigned long len, u32 fd_flags,
				     u64 heap_flags)
{
	struct vdma_heap_priv *hp = dma_heap_get_drvdata(heap);
	struct vdma *v = hp->v;
	DEFINE_DMA_BUF_EXPORT_INFO(exp_info);
	struct vdma_buffer *buffer;
	struct vdma_chunk *c;
	struct dma_buf *dmabuf;
	unsigned long n, first = 0;
	size_t size;
	bool pooled;
	int tries;

	size = PAGE_ALIGN(len);
	n = size >> PAGE_SHIFT;
	pooled = v->granule <= (POOL_CHUNK_PAGES << PAGE_SHIFT) && n < POOL_CHUNK_PAGES;
	if (!pooled)
		size = ALIGN(size, v->granule);
	if (!len || size > v->max_map_len)
		return ERR_PTR(-ENOMEM);
	buffer = kzalloc(sizeof(*buffer), GFP_KERNEL);
	if (!buffer)
		return ERR_PTR(-ENOMEM);
	INIT_LIST_HEAD(&buffer->attachments);
	mutex_init(&buffer->lock);
	buffer->v = v;
	buffer->size = size;
	buffer->pagecount = size >> PAGE_SHIFT;
	buffer->failfast = hp->failfast;

	if (pooled) {
		/* Naturally aligned within the chunk, as cma_alloc() would align it. */
		unsigned long align_mask = (1UL << get_order(size)) - 1;

		for (tries = 0; !(c = vdma_pool_take(v, n, align_mask, &first)); tries++) {
			struct vdma_chunk *fresh;

			if (tries == 3) {
				kfree(buffer);
				return ERR_PTR(-ENOMEM);
			}
			fresh = vdma_chunk_create(v, POOL_CHUNK_PAGES, hp->failfast);
			if (IS_ERR(fresh)) {
				kfree(buffer);
				return ERR_CAST(fresh);
			}
			fresh->pooled = true;
			spin_lock_irq(&v->pool_lock);
			list_add_tail(&fresh->node, &v->pool);
			spin_unlock_irq(&v->pool_lock);
		}
	} else {
		c = vdma_chunk_create(v, buffer->pagecount, hp->failfast);
		if (IS_ERR(c)) {
			kfree(buffer);
			return ERR_CAST(c);
		}
	}
	buffer->chunk = c;
	buffer->first = first;
	buffer->pages = c->pages + first;
	memset(page_address(buffer->pages), 0, size);

	exp_info.exp_name = dma_heap_get_name(heap);
	exp_info.ops = &vdma_buf_ops;
	exp_info.size = size;
	exp_info.flags = fd_flags;
	exp_info.priv = buffer;
	dmabuf = dma_buf_export(&exp_info);
	if (IS_ERR(dmabuf)) {
		if (c->pooled)
			vdma_pool_put(v, c, first, n);
		else
			vdma_chunk_destroy(c);
		kfree(buffer);
		return dmabuf;
	}
	spin_lock_irq(&v->buffers_lock);
	list_add(&buffer->node, &v->buffers);
	spin_unlock_irq(&v->buffers_lock);
	return dmabuf;
}

static const struct dma_heap_ops vdma_heap_ops = {
	.allocate = vdma_allocate,
};

/* ---- debugfs ---- */

static int vdma_buffers_show(struct seq_file *s, void *unused)
{
	struct vdma *v = s->private;
	struct vdma_buffer *b;

	spin_lock_irq(&v->buffers_lock);
	list_for_each_entry(b, &v->buffers, node)
		seq_printf(s, "gpa=%#llx len=%zu host_addr=%#llx host=%s extent=%llu failfast=%d pooled=%d\n",
			   (u64)page_to_phys(b->pages), b->size,
			   b->chunk->host_addr + (b->first << PAGE_SHIFT),
			   b->chunk->resp_flags & RESP_HOST_PHYS ? "phys" : "region-offset",
			   b->chunk->extent, b->failfast, b->chunk->pooled);
	spin_unlock_irq(&v->buffers_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vdma_buffers);

static int vdma_stats_show(struct seq_file *s, void *unused)
{
	static const char *const names[] = { "mappings", "mapped_bytes", "maps_ok", "maps_failed",
					     "maps_busy", "maps_timeout", "unmaps", "bytes_migrated" };
	struct vdma *v = s->private;
	struct vdma_request *r = kzalloc(sizeof(*r), GFP_KERNEL);
	int status, i;

	if (!r)
		return -ENOMEM;
	vdma_fill(&r->req, REQ_STAT, 0, 0, 0, 0);
	status = vdma_request_sync(v, r);
	seq_printf(s, "status=%d", status);
	if (status == VDMA_OK && r->resp_len >= sizeof(r->resp))
		for (i = 0; i < ARRAY_SIZE(names); i++)
			seq_printf(s, " %s=%llu", names[i], le64_to_cpu(r->resp.stat[i]));
	seq_printf(s, " unmaps_sent=%lld cma_retries=%lld host_busy_skips=%lld window_base=%#llx window_size=%llu granule=%llu max_map_len=%llu\n",
		   (long long)atomic64_read(&v->unmaps_sent),
		   (long long)atomic64_read(&v->cma_retries),
		   (long long)atomic64_read(&v->host_busy_skips), v->window_base, v->window_size,
		   v->granule, v->max_map_len);
	kfree(r);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vdma_stats);

/* raw: write exactly one 32-byte request header; read "status=N". */
static ssize_t vdma_raw_write(struct file *file, const char __user *buf, size_t count, loff_t *ppos)
{
	struct vdma *v = file->private_data;
	struct vdma_request *r;
	int status;

	if (count != sizeof(struct virtio_dma_req))
		return -EINVAL;
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	if (copy_from_user(&r->req, buf, count)) {
		kfree(r);
		return -EFAULT;
	}
	mutex_lock(&v->raw_lock);
	status = vdma_request_sync(v, r);
	v->raw_status = status;
	mutex_unlock(&v->raw_lock);
	kfree(r);
	return status < 0 ? status : count;
}

static ssize_t vdma_raw_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct vdma *v = file->private_data;
	char line[32];
	int n = scnprintf(line, sizeof(line), "status=%u\n", v->raw_status);

	return simple_read_from_buffer(buf, count, ppos, line, n);
}

static const struct file_operations vdma_raw_fops = {
	.open = simple_open,
	.write = vdma_raw_write,
	.read = vdma_raw_read,
};

/* timer_free: allocate a buffer of the written size and drop it from a timer callback. */
struct vdma_timer_free {
	struct timer_list timer;
	struct dma_buf *dmabuf;
};

static void vdma_timer_free_fn(struct timer_list *t)
{
	struct vdma_timer_free *tf = from_timer(tf, t, timer);

	/* Atomic context: dma_buf_put defers the final release; vdma_release never sleeps. */
	dma_buf_put(tf->dmabuf);
	kfree(tf);
}

static ssize_t vdma_timer_free_write(struct file *file, const char __user *buf, size_t count,
				     loff_t *ppos)
{
	struct vdma *v = file->private_data;
	struct vdma_timer_free *tf;
	struct dma_buf *dmabuf;
	unsigned long size;
	int ret = kstrtoul_from_user(buf, count, 0, &size);

	if (ret)
		return ret;
	dmabuf = vdma_allocate(v->heap, size, O_RDWR, 0);
	if (IS_ERR(dmabuf))
		return PTR_ERR(dmabuf);
	tf = kzalloc(sizeof(*tf), GFP_KERNEL);
	if (!tf) {
		dma_buf_put(dmabuf);
		return -ENOMEM;
	}
	tf->dmabuf = dmabuf;
	timer_setup(&tf->timer, vdma_timer_free_fn, 0);
	mod_timer(&tf->timer, jiffies + msecs_to_jiffies(10));
	return count;
}

static const struct file_operations vdma_timer_free_fops = {
	.open = simple_open,
	.write = vdma_timer_free_write,
};

/* ---- probe ---- */

static int vdma_probe(struct virtio_device *vdev)
{
	struct virtqueue_info vqs_info[] = {
		{ "mapq", vdma_vq_done },
		{ "ctrlq", vdma_vq_done },
	};
	struct dma_heap_export_info exp = { .ops = &vdma_heap_ops };
	struct virtqueue *vqs[2];
	struct vdma *v;
	int err;

	if (vdma_global) {
		dev_err(&vdev->dev, "only one virtio-dma device is supported\n");
		return -EBUSY;
	}
	v = devm_kzalloc(&vdev->dev, sizeof(*v), GFP_KERNEL);
	if (!v)
		return -ENOMEM;
	v->vdev = vdev;
	vdev->priv = v;
	spin_lock_init(&v->mapq_lock);
	spin_lock_init(&v->ctrlq_lock);
	spin_lock_init(&v->buffers_lock);
	INIT_LIST_HEAD(&v->buffers);
	spin_lock_init(&v->pool_lock);
	INIT_LIST_HEAD(&v->pool);
	mutex_init(&v->raw_lock);

	v->window_base = virtio_cread64(vdev, offsetof(struct virtio_dma_config, window_base));
	v->window_size = virtio_cread64(vdev, offsetof(struct virtio_dma_config, window_size));
	v->granule = virtio_cread32(vdev, offsetof(struct virtio_dma_config, granule));
	v->max_map_len = virtio_cread64(vdev, offsetof(struct virtio_dma_config, max_map_len));
	if (!v->granule || !is_power_of_2(v->granule) || v->granule < PAGE_SIZE) {
		dev_err(&vdev->dev, "bad granule %llu\n", v->granule);
		return -EINVAL;
	}

	/* The window must be exactly this kernel's default CMA area (cma=SIZE@BASE). */
	v->cma = dev_get_cma_area(NULL);
	if (!v->cma || cma_get_base(v->cma) != v->window_base ||
	    cma_get_size(v->cma) != v->window_size) {
		dev_err(&vdev->dev, "DMA window %#llx+%#llx is not the CMA area (%pa+%#lx)\n",
			v->window_base, v->window_size,
			v->cma ? &(phys_addr_t){ cma_get_base(v->cma) } : &(phys_addr_t){ 0 },
			v->cma ? cma_get_size(v->cma) : 0);
		return -ENODEV;
	}

	err = virtio_find_vqs(vdev, 2, vqs, vqs_info, NULL);
	if (err)
		return err;
	v->mapq = vqs[0];
	v->ctrlq = vqs[1];
	virtio_device_ready(vdev);

	heap_retry = (struct vdma_heap_priv){ .v = v, .failfast = false };
	heap_failfast = (struct vdma_heap_priv){ .v = v, .failfast = true };
	exp.name = "virtio-dma";
	exp.priv = &heap_retry;
	v->heap = dma_heap_add(&exp);
	exp.name = "virtio-dma-failfast";
	exp.priv = &heap_failfast;
	v->heap_failfast = IS_ERR(v->heap) ? v->heap : dma_heap_add(&exp);
	if (IS_ERR(v->heap) || IS_ERR(v->heap_failfast)) {
		err = PTR_ERR(IS_ERR(v->heap) ? v->heap : v->heap_failfast);
		virtio_reset_device(vdev);
		vdev->config->del_vqs(vdev);
		return err;
	}

	v->debugfs = debugfs_create_dir("virtio-dma", NULL);
	debugfs_create_file("buffers", 0444, v->debugfs, v, &vdma_buffers_fops);
	debugfs_create_file("stats", 0444, v->debugfs, v, &vdma_stats_fops);
	debugfs_create_file("raw", 0600, v->debugfs, v, &vdma_raw_fops);
	debugfs_create_file("timer_free", 0200, v->debugfs, v, &vdma_timer_free_fops);
	vdma_global = v;
	dev_info(&vdev->dev, "window %#llx+%#llx, granule %llu, largest MAP %llu bytes\n",
		 v->window_base, v->window_size, v->granule, v->max_map_len);
	return 0;
}

static void vdma_remove(struct virtio_device *vdev)
{
	/* dma-buf heaps cannot be removed in 6.12; a built-in driver is never unbound here. */
	dev_warn(&vdev->dev, "virtio-dma cannot be unbound while its heaps exist\n");
}

static const struct virtio_device_id id_table[] = {
	{ VIRTIO_ID_DMA, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static unsigned int features[] = {
	VIRTIO_DMA_F_HOST_PHYS, VIRTIO_DMA_F_DEADLINE, VIRTIO_DMA_F_DISCARD,
};

static struct virtio_driver virtio_dma_driver = {
	.feature_table = features,
	.feature_table_size = ARRAY_SIZE(features),
	.driver.name = KBUILD_MODNAME,
	.id_table = id_table,
	.probe = vdma_probe,
	.remove = vdma_remove,
};

module_virtio_driver(virtio_dma_driver);
MODULE_DEVICE_TABLE(virtio, id_table);
MODULE_DESCRIPTION("virtio-dma: host-contiguous DMA buffers from the guest's CMA area");
MODULE_LICENSE("GPL");
