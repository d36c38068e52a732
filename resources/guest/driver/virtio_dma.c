// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dma guest driver (dmavisor, docs/virtio-dma.md).
 *
 * Buffers come from the guest kernel's own CMA area (cma_alloc() on the area that is the
 * VMM's DMA window); the device is then asked to MAP them, which makes them host-contiguous
 * and pinned on the host. They are exported as the dma-buf heaps "virtio-dma" (MAP retries
 * within a deadline) and "virtio-dma-failfast" (MAP never waits). Buffers smaller than 2 MiB
 * share MAPped 2 MiB chunks. Ending a mapping sends UNMAP without waiting (queued while the
 * ring is full); the pages return to CMA once the device has answered OK. Pages whose UNMAP
 * failed stay out of CMA, since the host may still map them, until the device is reset.
 *
 * Every request waits at most its deadline plus a margin, and a fatal signal ends the wait.
 * A request given up on keeps its memory (and a MAP its pages) until the device answers or
 * is reset.
 *
 * System sleep: freeze waits for the device to answer what it holds, then resets it (which
 * ends every mapping; the pages keep their contents); restore MAPs every live chunk again, so
 * that live buffers are host-contiguous again (docs/virtio-dma.md §7.1.1).
 *
 * dma-buf heaps cannot be removed in Linux 6.12, so the heaps are added once and outlive the
 * device: without a device, allocations fail with -ENODEV and live buffers stay usable memory.
 *
 * debugfs (virtio-dma/): buffers (gpa, length, host address of every live buffer), stats
 * (the device's counters and the driver's). With CONFIG_VIRTIO_DMA_TEST_HOOKS: raw (send one
 * request header verbatim and read its status) and timer_free (allocate a buffer and drop
 * the last reference from a timer callback).
 */
#include <linux/cma.h>
#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <linux/dma-map-ops.h>
#include <linux/highmem.h>
#include <linux/iosys-map.h>
#include <linux/kref.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/timer.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_dma.h>
#include <linux/workqueue.h>

#define VIRTIO_ID_DMA 60

static unsigned int deadline_ms = 1000;
module_param(deadline_ms, uint, 0644);
MODULE_PARM_DESC(deadline_ms, "How long a (non-failfast) allocation may retry");

static unsigned int reply_margin_ms = 1000;
module_param(reply_margin_ms, uint, 0644);
MODULE_PARM_DESC(reply_margin_ms,
		 "How long past its deadline a request may go unanswered before it fails");

static unsigned int idle_chunk_ms = 1000;
module_param(idle_chunk_ms, uint, 0644);
MODULE_PARM_DESC(idle_chunk_ms, "How long an empty shared chunk stays mapped for reuse");

/*
 * By default a chunk is shared when at least two buffers fit in it: above half a chunk, sharing
 * saves no cma_alloc() or MAP, and the rest of the chunk would go unused.
 */
static unsigned int pool_max_kib = 1024;
module_param(pool_max_kib, uint, 0644);
MODULE_PARM_DESC(pool_max_kib,
		 "Buffers up to this size share 2 MiB chunks (one cma_alloc() and MAP per chunk)");

/* Pause between cma_alloc() retries: about the length of the pins that make it fail. */
#define VDMA_RETRY_MIN_US 100
#define VDMA_RETRY_MAX_US 300

/*
 * Small buffers (up to pool_max_kib, or any buffer smaller than the smallest MAP the device
 * takes) share 2 MiB chunks: one cma_alloc() and one MAP per chunk, and a buffer is a run of
 * pages in it. Other buffers get a chunk of their own, of the size asked for where the device
 * allows it, as the kernel's CMA heap allocates them. At most one empty chunk stays mapped, for
 * idle_chunk_ms.
 */
#define POOL_CHUNK_ORDER 9
#define POOL_CHUNK_PAGES BIT(POOL_CHUNK_ORDER)
#define POOL_CHUNK_BYTES (POOL_CHUNK_PAGES << PAGE_SHIFT)

struct vdma;
struct vdma_chunk;

enum vdma_req_kind {
	VDMA_WAITED,	/* a task waits on done */
	VDMA_ASYNC,	/* an UNMAP: finished by work */
	VDMA_ABANDONED,	/* its waiter gave up: finished by work */
};

/* One request. kind and answered are under the lock of the request's queue. */
struct vdma_request {
	struct virtio_dma_req req;
	struct virtio_dma_resp resp;
	struct virtio_dma_stat stat;	/* STAT only */
	unsigned int resp_len;
	int error;			/* -ENODEV: the device went away before answering */
	enum vdma_req_kind kind;
	bool answered;
	struct completion done;
	struct work_struct work;
	struct list_head backlog;	/* in vdma.backlog while the ring is full */
	struct vdma_chunk *chunk;	/* UNMAP, or a MAP given up on: its chunk */
};

/* A host mapping: guest pages from cma_alloc() that the device has MAPped. */
struct vdma_chunk {
	struct vdma *v;
	struct list_head node;	/* in v->pool (pooled chunks) or v->withheld */
	struct page *pages;
	unsigned long pagecount;
	u64 host_addr;
	u32 resp_flags;
	u64 extent;
	bool pooled;
	unsigned long used;	/* pooled: pages handed out; under v->pool_lock */
	DECLARE_BITMAP(map, POOL_CHUNK_PAGES);
	struct vdma_request *unmap;	/* preallocated: ending a mapping never allocates */
	/* Under v->chunks_lock: */
	struct list_head live;	/* in v->chunks from its MAP until its release is carried out */
	bool mapped;		/* the device may map it (not after a reset, until MAPped again) */
	bool released;		/* released while the device was suspended: restore ends it */
};

struct vdma {
	struct kref ref;		/* the device's, and one per chunk and allocation */
	struct virtio_device *vdev;	/* a reference is held */
	struct virtqueue *mapq, *ctrlq;
	/* Each serialises its queue, and the kind/answered of the requests on it. */
	spinlock_t mapq_lock, ctrlq_lock;
	bool gone;			/* removed: nothing more is sent; under both queue locks */
	struct list_head backlog;	/* UNMAPs waiting for room on ctrlq; under ctrlq_lock */
	/* MAPs wait here for room on mapq; room_gen counts the times answers made room. */
	wait_queue_head_t room;
	atomic_t room_gen;
	unsigned long backlog_len, backlog_max;
	struct cma *cma;
	u64 window_base, window_size, granule, max_map_len;
	bool f_deadline, f_discard, f_host_phys, f_sub_granule;
	/* The smallest MAP: the granule, or a page inside one with SUB_GRANULE. */
	u64 map_unit;
	spinlock_t buffers_lock;	/* protects buffers */
	struct list_head buffers;
	spinlock_t pool_lock;		/* protects pool, idle, every pooled chunk's map and used */
	struct list_head pool;
	struct vdma_chunk *idle;	/* the one empty pooled chunk kept mapped, if any */
	struct delayed_work idle_work;
	spinlock_t withheld_lock;	/* protects withheld, withheld_pages and reset */
	struct list_head withheld;	/* chunks whose UNMAP failed: the host may still map them */
	unsigned long withheld_pages;
	bool reset;			/* the device has been reset: it maps nothing any more */
	/*
	 * System sleep (freeze/restore). Allocations hold pm_sem for reading; a suspended device
	 * holds it for writing. quiesced (under both queue locks): nothing is sent.
	 */
	struct rw_semaphore pm_sem;
	bool quiesced;
	spinlock_t chunks_lock;		/* protects chunks, suspended, and live, mapped, released */
	struct list_head chunks;
	bool suspended;			/* releases are held until restore */
	bool unmapped_by_reset;		/* the device was reset while suspended */
	struct dentry *debugfs;
#ifdef CONFIG_VIRTIO_DMA_TEST_HOOKS
	struct mutex raw_lock;		/* one raw request at a time */
	u32 raw_status;
#endif
	atomic64_t unmaps_sent;
	atomic64_t unmaps_failed;
	atomic64_t cma_retries;
	atomic64_t host_busy_skips;
	atomic64_t abandoned;
	atomic64_t chunks_live;
	atomic64_t ring_full_waits;	/* requests that waited for room on their queue */
	atomic64_t suspends;
	atomic64_t remaps;		/* chunks MAPped again on restore */
	atomic64_t remaps_failed;	/* ... that the device refused: no longer host-contiguous */
};

/*
 * The heaps are added at the first probe and never removed (6.12 has no dma_heap_remove);
 * an allocation takes a reference on the device bound now, if any.
 */
static DEFINE_MUTEX(vdma_heaps_lock);
static struct dma_heap *vdma_heap, *vdma_heap_failfast;
static DEFINE_SPINLOCK(vdma_current_lock);
static struct vdma *vdma_current;

struct vdma_heap_priv {
	bool failfast;
};

static struct vdma_heap_priv heap_retry = { .failfast = false };
static struct vdma_heap_priv heap_failfast = { .failfast = true };

struct vdma_buffer {
	struct vdma *v;
	struct list_head node;		/* in v->buffers */
	struct list_head attachments;
	struct mutex lock;		/* protects attachments */
	struct vdma_chunk *chunk;
	unsigned long first;		/* page index in the chunk */
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

static void vdma_free(struct kref *ref)
{
	struct vdma *v = container_of(ref, struct vdma, ref);

	put_device(&v->vdev->dev);
	kfree(v);
}

static void vdma_put(struct vdma *v)
{
	kref_put(&v->ref, vdma_free);
}

/* The bound device, with a reference; NULL if none is. */
static struct vdma *vdma_get_current(void)
{
	struct vdma *v;

	spin_lock(&vdma_current_lock);
	v = vdma_current;
	if (v)
		kref_get(&v->ref);
	spin_unlock(&vdma_current_lock);
	return v;
}

/* ---- requests ---- */

static spinlock_t *vdma_lock_of(struct vdma *v, struct vdma_request *r)
{
	return le32_to_cpu(r->req.type) == VIRTIO_DMA_T_MAP ? &v->mapq_lock : &v->ctrlq_lock;
}

/* Called with the request's queue lock held, when the device answered or went away. */
static void vdma_answered(struct vdma_request *r)
{
	r->answered = true;
	if (r->kind == VDMA_WAITED)
		complete(&r->done);
	else
		queue_work(system_wq, &r->work);
}

/* Adds a request to its queue; its queue lock held. Never allocates more than GFP_ATOMIC. */
static int vdma_add(struct vdma *v, struct vdma_request *r)
{
	struct scatterlist out, in, stat, *sgs[3] = { &out, &in, &stat };
	u32 type = le32_to_cpu(r->req.type);
	struct virtqueue *vq = type == VIRTIO_DMA_T_MAP ? v->mapq : v->ctrlq;

	sg_init_one(&out, &r->req, sizeof(r->req));
	sg_init_one(&in, &r->resp, sizeof(r->resp));
	sg_init_one(&stat, &r->stat, sizeof(r->stat));
	/* Under a spinlock with interrupts off: GFP_ATOMIC (indirect descriptors allocate). */
	return virtqueue_add_sgs(vq, sgs, 1, type == VIRTIO_DMA_T_STAT ? 2 : 1, r, GFP_ATOMIC);
}

/*
 * Sends a request. An UNMAP (VDMA_ASYNC) is never refused: while the ring is full (or the
 * device suspended) it waits in the backlog, and without a device it is answered at once with
 * -ENODEV. Other requests get -ENOSPC while the ring is full or the device suspended.
 */
static int vdma_send(struct vdma *v, struct vdma_request *r)
{
	spinlock_t *lock = vdma_lock_of(v, r);
	bool async = r->kind == VDMA_ASYNC;
	unsigned long flags;
	int err;

	r->answered = false;
	r->error = 0;
	r->resp_len = 0;
	spin_lock_irqsave(lock, flags);
	if (v->gone) {
		err = -ENODEV;
	} else if (v->quiesced || (async && !list_empty(&v->backlog))) {
		err = -ENOSPC;	/* suspended, or keep the order */
	} else {
		err = vdma_add(v, r);
		if (!err)
			virtqueue_kick(le32_to_cpu(r->req.type) == VIRTIO_DMA_T_MAP ?
				       v->mapq : v->ctrlq);
	}
	if (err && async) {
		if (err == -ENOSPC) {
			list_add_tail(&r->backlog, &v->backlog);
			v->backlog_len++;
			v->backlog_max = max(v->backlog_max, v->backlog_len);
		} else {
			r->error = err;
			vdma_answered(r);
		}
		err = 0;
	}
	spin_unlock_irqrestore(lock, flags);
	return err;
}

/* Moves backlogged UNMAPs onto ctrlq while it has room; ctrlq_lock held. */
static void vdma_flush_backlog(struct vdma *v)
{
	struct vdma_request *r, *next;
	bool added = false;

	if (v->gone || v->quiesced)
		return;
	list_for_each_entry_safe(r, next, &v->backlog, backlog) {
		if (vdma_add(v, r))
			break;
		list_del(&r->backlog);
		v->backlog_len--;
		added = true;
	}
	if (added)
		virtqueue_kick(v->ctrlq);
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
			vdma_answered(r);
		}
		if (vq == v->ctrlq)
			vdma_flush_backlog(v);
	} while (!virtqueue_enable_cb(vq));
	spin_unlock_irqrestore(lock, flags);
	atomic_inc(&v->room_gen);
	wake_up_all(&v->room);
}

/* The device's status for an answered request, or -errno. */
static int vdma_status(struct vdma_request *r)
{
	if (r->error)
		return r->error;
	if (r->resp_len < sizeof(r->resp))
		return -EIO;
	return le32_to_cpu(r->resp.status);
}

static void vdma_late_answer(struct work_struct *work);

/*
 * Sends a request and waits for its answer, at most timeout_ms and until a fatal signal.
 * Returns the device's status or -errno. On -ETIMEDOUT and -EINTR the request is given up
 * on: it (and a MAP's chunk) now belongs to vdma_late_answer(), and the caller must forget it.
 * While the queue is full the request waits for room; if it never gets any it was not sent,
 * stays the caller's, and the result is -EBUSY (or -ERESTARTSYS on a fatal signal).
 */
static int vdma_request_sync(struct vdma *v, struct vdma_request *r, unsigned int timeout_ms)
{
	spinlock_t *lock = vdma_lock_of(v, r);
	long left;
	int err;

	unsigned long until = jiffies + msecs_to_jiffies(timeout_ms) + 1;

	init_completion(&r->done);
	r->kind = VDMA_WAITED;
	/* The ring is full: wait for answers to make room, within the same time. */
	for (;;) {
		int gen = atomic_read(&v->room_gen);

		err = vdma_send(v, r);
		if (err != -ENOSPC)
			break;
		atomic64_inc(&v->ring_full_waits);
		left = wait_event_killable_timeout(v->room, atomic_read(&v->room_gen) != gen ||
						   READ_ONCE(v->gone),
						   max_t(long, (long)(until - jiffies), 1));
		/* Not sent: the request is still the caller's. */
		if (left < 0)
			return left;	/* -ERESTARTSYS: a fatal signal */
		if (!left)
			return -EBUSY;
	}
	if (err)
		return err;
	left = wait_for_completion_killable_timeout(&r->done,
						    max_t(long, (long)(until - jiffies), 1));
	if (left <= 0) {
		spin_lock_irq(lock);
		if (!r->answered) {
			r->kind = VDMA_ABANDONED;
			INIT_WORK(&r->work, vdma_late_answer);
			spin_unlock_irq(lock);
			atomic64_inc(&v->abandoned);
			dev_warn_ratelimited(&v->vdev->dev, "request type %u %s after %u ms\n",
					     le32_to_cpu(r->req.type),
					     left ? "interrupted" : "unanswered", timeout_ms);
			return left ? -EINTR : -ETIMEDOUT;
		}
		spin_unlock_irq(lock);
	}
	return vdma_status(r);
}

static void vdma_fill(struct virtio_dma_req *req, u32 type, u32 flags, u64 gpa, u64 len,
		      u32 deadline)
{
	memset(req, 0, sizeof(*req));
	req->type = cpu_to_le32(type);
	req->flags = cpu_to_le32(flags);
	req->gpa = cpu_to_le64(gpa);
	req->len = cpu_to_le64(len);
	req->deadline_ms = cpu_to_le32(deadline);
}

/* ---- chunks: host mappings ---- */

/* Gives a chunk's pages back to CMA and frees it. Process context. */
static void vdma_chunk_free(struct vdma_chunk *c)
{
	struct vdma *v = c->v;

	if (c->pages) {
		cma_release(v->cma, c->pages, c->pagecount);
		atomic64_dec(&v->chunks_live);
	}
	kfree(c->unmap);
	kfree(c);
	vdma_put(v);
}

/* The device answered a chunk's UNMAP (or went away). */
static void vdma_unmap_done(struct work_struct *work)
{
	struct vdma_request *r = container_of(work, struct vdma_request, work);
	struct vdma_chunk *c = r->chunk;
	struct vdma *v = c->v;
	int status = vdma_status(r);
	bool keep = false;

	if (status == VIRTIO_DMA_S_NOENT)
		dev_warn(&v->vdev->dev, "UNMAP of %lu pages at %pa: not mapped\n", c->pagecount,
			 &(phys_addr_t){ page_to_phys(c->pages) });
	if (status != VIRTIO_DMA_S_OK && status != VIRTIO_DMA_S_NOENT) {
		/*
		 * The host may still map the pages: they must not be reused until it says it
		 * does not, or the device is reset (-ENODEV: being removed, reset soon).
		 */
		spin_lock_irq(&v->withheld_lock);
		if (!v->reset) {
			list_add(&c->node, &v->withheld);
			v->withheld_pages += c->pagecount;
			keep = true;
		}
		spin_unlock_irq(&v->withheld_lock);
		if (keep && status != -ENODEV) {
			atomic64_inc(&v->unmaps_failed);
			dev_err_ratelimited(&v->vdev->dev,
					    "UNMAP of %lu pages at %pa failed (%d): pages withheld from CMA until reset\n",
					    c->pagecount,
					    &(phys_addr_t){ page_to_phys(c->pages) }, status);
		}
	}
	if (!keep)
		vdma_chunk_free(c);
}

static void vdma_chunk_free_work(struct work_struct *work)
{
	vdma_chunk_free(container_of(work, struct vdma_request, work)->chunk);
}

/*
 * Ends a chunk's mapping without waiting; any context. While the device is suspended the
 * release is held (restore carries it out); a chunk the device no longer maps goes straight
 * back to CMA.
 */
static void vdma_chunk_unmap(struct vdma_chunk *c)
{
	struct vdma *v = c->v;
	struct vdma_request *r = c->unmap;
	unsigned long flags;
	bool mapped;

	spin_lock_irqsave(&v->chunks_lock, flags);
	if (v->suspended) {
		c->released = true;
		/* A MAP given up on and answered late is not on the list yet. */
		if (list_empty(&c->live)) {
			c->mapped = !v->unmapped_by_reset;
			list_add_tail(&c->live, &v->chunks);
		}
		spin_unlock_irqrestore(&v->chunks_lock, flags);
		return;
	}
	list_del_init(&c->live);
	mapped = c->mapped;
	spin_unlock_irqrestore(&v->chunks_lock, flags);
	r->chunk = c;
	if (!mapped) {
		INIT_WORK(&r->work, vdma_chunk_free_work);
		queue_work(system_wq, &r->work);
		return;
	}

	/* DISCARD: the pages go back to CMA; nobody needs what is in them. */
	vdma_fill(&r->req, VIRTIO_DMA_T_UNMAP, v->f_discard ? VIRTIO_DMA_FLAG_DISCARD : 0,
		  page_to_phys(c->pages), c->pagecount << PAGE_SHIFT, 0);
	r->kind = VDMA_ASYNC;
	INIT_WORK(&r->work, vdma_unmap_done);
	atomic64_inc(&v->unmaps_sent);
	vdma_send(v, r);
}

/* A request given up on has been answered (or the device went away). */
static void vdma_late_answer(struct work_struct *work)
{
	struct vdma_request *r = container_of(work, struct vdma_request, work);
	struct vdma_chunk *c = r->chunk;

	if (c && le32_to_cpu(r->req.type) == VIRTIO_DMA_T_MAP) {
		if (vdma_status(r) == VIRTIO_DMA_S_OK) {
			c->mapped = true;	/* on no list yet: only this work sees it */
			vdma_chunk_unmap(c);	/* the pages come back after its UNMAP */
		} else {
			vdma_chunk_free(c);
		}
	}
	kfree(r);
}

static int vdma_status_errno(struct vdma *v, int status)
{
	switch (status) {
	case VIRTIO_DMA_S_OK:
		return 0;
	case VIRTIO_DMA_S_NOMEM:
	case VIRTIO_DMA_S_TOOBIG:
	case VIRTIO_DMA_S_BUSY:
	case VIRTIO_DMA_S_TIMEOUT:
		return -ENOMEM;
	default:
		if (status > 0) {
			dev_warn_ratelimited(&v->vdev->dev, "MAP refused with status %d\n", status);
			return -EIO;
		}
		return status;
	}
}

/* Gives the ranges a MAP found busy back to the CMA area. */
static void vdma_release_aside(struct vdma *v, struct page **busy, unsigned int *nbusy,
			       unsigned long pagecount)
{
	while (*nbusy > 0)
		cma_release(v->cma, busy[--*nbusy], pagecount);
}

static unsigned int vdma_ms_left(unsigned long until)
{
	return time_after(until, jiffies) ? jiffies_to_msecs(until - jiffies) : 0;
}

/* Where the device placed a chunk, from the answer to its MAP. */
static void vdma_chunk_placed(struct vdma *v, struct vdma_chunk *c,
			      const struct virtio_dma_resp *resp)
{
	c->host_addr = le64_to_cpu(resp->host_addr);
	c->resp_flags = le32_to_cpu(resp->flags);
	if (!v->f_host_phys)
		c->resp_flags &= ~VIRTIO_DMA_RESP_HOST_PHYS;
	c->extent = le64_to_cpu(resp->extent);
}

/* cma_alloc() + MAP: a new host-contiguous chunk of pagecount pages. */
static struct vdma_chunk *vdma_chunk_create(struct vdma *v, unsigned long pagecount,
					    bool failfast)
{
	struct vdma_request *r = kzalloc(sizeof(*r), GFP_KERNEL);
	struct vdma_chunk *c = kzalloc(sizeof(*c), GFP_KERNEL);
	struct page *busy[8];
	unsigned int nbusy = 0;
	unsigned long until;
	unsigned int align;
	u32 flags;
	int ret = -ENOMEM;

	if (!r || !c)
		goto free;
	c->unmap = kzalloc(sizeof(*c->unmap), GFP_KERNEL);
	if (!c->unmap)
		goto free;
	kref_get(&v->ref);
	c->v = v;
	c->pagecount = pagecount;
	INIT_LIST_HEAD(&c->node);
	INIT_LIST_HEAD(&c->live);
	align = get_order(pagecount << PAGE_SHIFT);
	if ((pagecount << PAGE_SHIFT) >= v->granule) {
		/* Whole granules, on a granule boundary. */
		align = max_t(unsigned int, align, get_order(v->granule));
		if (align > CONFIG_CMA_ALIGNMENT)
			align = max_t(unsigned int, CONFIG_CMA_ALIGNMENT, get_order(v->granule));
	}
	/*
	 * Shorter than a granule (SUB_GRANULE): aligned to its own order, not capped at
	 * CONFIG_CMA_ALIGNMENT as the CMA heap caps it, so that it lies inside one granule.
	 */
	flags = failfast ? VIRTIO_DMA_FLAG_FAILFAST : 0;
	/* DISCARD: buffers are zeroed through the new host-contiguous backing. */
	if (v->f_discard)
		flags |= VIRTIO_DMA_FLAG_DISCARD;
	/*
	 * Linux's cma_alloc() gives up when a page of the area cannot be migrated right now (it
	 * is pinned, or locked for I/O). Without FAILFAST, try again until the deadline, as the
	 * host does for its part of the MAP.
	 */
	until = jiffies + msecs_to_jiffies(failfast ? 0 : deadline_ms);
	for (;;) {
		unsigned int left;
		int status;

		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		c->pages = cma_alloc(v->cma, pagecount, align, !failfast);
		if (!c->pages) {
			if (failfast || time_after(jiffies, until))
				break;
			/*
			 * Nothing free but the ranges kept aside: let them go (their pins may end,
			 * and buffers freed meanwhile come back) and look again in a moment.
			 */
			vdma_release_aside(v, busy, &nbusy, pagecount);
			atomic64_inc(&v->cma_retries);
			usleep_range(VDMA_RETRY_MIN_US, VDMA_RETRY_MAX_US);
			continue;
		}
		atomic64_inc(&v->chunks_live);
		left = failfast ? 0 : vdma_ms_left(until);
		vdma_fill(&r->req, VIRTIO_DMA_T_MAP, flags, page_to_phys(c->pages),
			  pagecount << PAGE_SHIFT, v->f_deadline ? left : 0);
		r->chunk = c;
		status = vdma_request_sync(v, r, left + reply_margin_ms);
		if (status == -ETIMEDOUT || status == -EINTR) {
			/* r and c (with its pages) now belong to vdma_late_answer(). */
			r = NULL;
			c = NULL;
			ret = status;
			break;
		}
		/*
		 * BUSY without FAILFAST: the host holds a page of this range with a long-term pin
		 * (it waits out short ones itself). Keep the range aside so that the next
		 * cma_alloc() looks elsewhere, as Linux's cma_alloc() moves past a range it cannot
		 * migrate.
		 */
		if (status == VIRTIO_DMA_S_BUSY && !failfast && !time_after(jiffies, until)) {
			if (nbusy == ARRAY_SIZE(busy))
				vdma_release_aside(v, busy, &nbusy, pagecount);
			busy[nbusy++] = c->pages;
			c->pages = NULL;
			atomic64_dec(&v->chunks_live);
			atomic64_inc(&v->host_busy_skips);
			continue;
		}
		ret = vdma_status_errno(v, status);
		if (ret) {
			cma_release(v->cma, c->pages, pagecount);
			c->pages = NULL;
			atomic64_dec(&v->chunks_live);
		}
		break;
	}
	vdma_release_aside(v, busy, &nbusy, pagecount);
	if (!c)
		goto out;
	if (!c->pages) {
		vdma_chunk_free(c);
		c = NULL;
		goto out;
	}
	vdma_chunk_placed(v, c, &r->resp);
	kfree(r);
	/* Allocations hold pm_sem: the device has not been suspended since the MAP. */
	spin_lock_irq(&v->chunks_lock);
	c->mapped = true;
	list_add_tail(&c->live, &v->chunks);
	spin_unlock_irq(&v->chunks_lock);
	return c;
free:
	if (c)
		kfree(c->unmap);
	kfree(c);
	c = NULL;
out:
	kfree(r);
	return ERR_PTR(ret);
}

/* ---- the pool of shared chunks ---- */

/* Takes n pages aligned to align_mask + 1 at a free place of c; pool_lock held. */
static bool vdma_chunk_take(struct vdma *v, struct vdma_chunk *c, unsigned long n,
			    unsigned long align_mask, unsigned long *first)
{
	unsigned long i = bitmap_find_next_zero_area(c->map, POOL_CHUNK_PAGES, 0, n, align_mask);

	if (i >= POOL_CHUNK_PAGES)
		return false;
	bitmap_set(c->map, i, n);
	c->used += n;
	if (v->idle == c)
		v->idle = NULL;
	*first = i;
	return true;
}

/* A run of n pages in a pooled chunk; NULL if none has room. */
static struct vdma_chunk *vdma_pool_take(struct vdma *v, unsigned long n,
					 unsigned long align_mask, unsigned long *first)
{
	struct vdma_chunk *c;

	spin_lock_irq(&v->pool_lock);
	list_for_each_entry(c, &v->pool, node) {
		if (vdma_chunk_take(v, c, n, align_mask, first)) {
			spin_unlock_irq(&v->pool_lock);
			return c;
		}
	}
	spin_unlock_irq(&v->pool_lock);
	return NULL;
}

/* Puts a fresh chunk into the pool with the first run taken, so that it is never idle. */
static void vdma_pool_add(struct vdma *v, struct vdma_chunk *c, unsigned long n,
			  unsigned long align_mask, unsigned long *first)
{
	c->pooled = true;
	spin_lock_irq(&v->pool_lock);
	vdma_chunk_take(v, c, n, align_mask, first);
	list_add_tail(&c->node, &v->pool);
	spin_unlock_irq(&v->pool_lock);
}

/* Gives a pooled buffer's pages back; an empty chunk other than the one kept is unmapped. */
static void vdma_pool_put(struct vdma *v, struct vdma_chunk *c, unsigned long first,
			  unsigned long n)
{
	struct vdma_chunk *drop = NULL;
	unsigned long flags;

	spin_lock_irqsave(&v->pool_lock, flags);
	bitmap_clear(c->map, first, n);
	c->used -= n;
	if (!c->used) {
		if (!v->idle && !v->gone && idle_chunk_ms) {
			v->idle = c;
			mod_delayed_work(system_wq, &v->idle_work, msecs_to_jiffies(idle_chunk_ms));
		} else {
			list_del(&c->node);
			drop = c;
		}
	}
	spin_unlock_irqrestore(&v->pool_lock, flags);
	if (drop)
		vdma_chunk_unmap(drop);
}

/* Unmaps the empty chunk kept for reuse, if any. */
static void vdma_drop_idle(struct vdma *v)
{
	struct vdma_chunk *c;

	spin_lock_irq(&v->pool_lock);
	c = v->idle;
	if (c) {
		v->idle = NULL;
		list_del(&c->node);
	}
	spin_unlock_irq(&v->pool_lock);
	if (c)
		vdma_chunk_unmap(c);
}

static void vdma_idle_work(struct work_struct *work)
{
	vdma_drop_idle(container_of(to_delayed_work(work), struct vdma, idle_work));
}

/* ---- dma-buf ops, as the kernel's CMA heap: one sg entry per page ---- */

static int vdma_attach(struct dma_buf *dmabuf, struct dma_buf_attachment *attachment)
{
	struct vdma_buffer *buffer = dmabuf->priv;
	struct vdma_attachment *a;
	struct scatterlist *sg;
	unsigned int i;

	a = kzalloc(sizeof(*a), GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	if (sg_alloc_table(&a->table, buffer->pagecount, GFP_KERNEL)) {
		kfree(a);
		return -ENOMEM;
	}
	for_each_sgtable_sg(&a->table, sg, i)
		sg_set_page(sg, buffer->pages + i, PAGE_SIZE, 0);
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
	if (vma->vm_pgoff > buffer->pagecount ||
	    len > (buffer->pagecount - vma->vm_pgoff) << PAGE_SHIFT)
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

static void vdma_buffer_put_pages(struct vdma *v, struct vdma_buffer *buffer)
{
	if (buffer->chunk->pooled)
		vdma_pool_put(v, buffer->chunk, buffer->first, buffer->pagecount);
	else
		vdma_chunk_unmap(buffer->chunk);
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
	vdma_buffer_put_pages(v, buffer);
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

/* Zeroes a buffer; the guest kernel is not preemptible, so yield now and then. */
static int vdma_clear_pages(struct page *page, unsigned long n)
{
	unsigned long i;

	for (i = 0; i < n; i++) {
		clear_highpage(page + i);
		if ((i & 63) == 63) {
			if (fatal_signal_pending(current))
				return -EINTR;
			cond_resched();
		}
	}
	return 0;
}

static struct dma_buf *vdma_allocate_on(struct vdma *v, struct dma_heap *heap,
					unsigned long len, u32 fd_flags, bool failfast)
{
	DEFINE_DMA_BUF_EXPORT_INFO(exp_info);
	struct vdma_buffer *buffer;
	struct vdma_chunk *c;
	struct dma_buf *dmabuf;
	unsigned long n, first = 0;
	size_t size, chunk_size;
	bool pooled;
	int ret;

	size = PAGE_ALIGN(len);
	n = size >> PAGE_SHIFT;
	if (!len || !size)
		return ERR_PTR(-EINVAL);
	pooled = v->map_unit <= POOL_CHUNK_BYTES && n < POOL_CHUNK_PAGES &&
		 (size <= (size_t)READ_ONCE(pool_max_kib) * SZ_1K || size < v->map_unit);
	/*
	 * A chunk of its own is the size asked for if the device takes it in one MAP (inside one
	 * granule with SUB_GRANULE), else whole granules; the buffer is what was asked for.
	 */
	if (pooled)
		chunk_size = POOL_CHUNK_BYTES;
	else if (size <= v->granule)
		chunk_size = ALIGN(size, v->map_unit);
	else
		chunk_size = ALIGN(size, v->granule);
	if (chunk_size > v->max_map_len || chunk_size < size)
		return ERR_PTR(-ENOMEM);
	buffer = kzalloc(sizeof(*buffer), GFP_KERNEL);
	if (!buffer)
		return ERR_PTR(-ENOMEM);
	INIT_LIST_HEAD(&buffer->attachments);
	mutex_init(&buffer->lock);
	buffer->v = v;
	buffer->size = size;
	buffer->pagecount = n;
	buffer->failfast = failfast;

	if (pooled) {
		/* Naturally aligned within the chunk, as cma_alloc() would align it. */
		unsigned long align_mask = (1UL << get_order(size)) - 1;

		c = vdma_pool_take(v, n, align_mask, &first);
		if (!c) {
			c = vdma_chunk_create(v, POOL_CHUNK_PAGES, failfast);
			if (IS_ERR(c)) {
				kfree(buffer);
				return ERR_CAST(c);
			}
			vdma_pool_add(v, c, n, align_mask, &first);
		}
	} else {
		c = vdma_chunk_create(v, chunk_size >> PAGE_SHIFT, failfast);
		if (IS_ERR(c)) {
			kfree(buffer);
			return ERR_CAST(c);
		}
	}
	buffer->chunk = c;
	buffer->first = first;
	buffer->pages = c->pages + first;
	ret = vdma_clear_pages(buffer->pages, n);
	if (ret) {
		dmabuf = ERR_PTR(ret);
		goto put;
	}

	exp_info.exp_name = dma_heap_get_name(heap);
	exp_info.ops = &vdma_buf_ops;
	exp_info.size = size;
	exp_info.flags = fd_flags;
	exp_info.priv = buffer;
	dmabuf = dma_buf_export(&exp_info);
	if (IS_ERR(dmabuf))
		goto put;
	spin_lock_irq(&v->buffers_lock);
	list_add(&buffer->node, &v->buffers);
	spin_unlock_irq(&v->buffers_lock);
	return dmabuf;
put:
	vdma_buffer_put_pages(v, buffer);
	kfree(buffer);
	return dmabuf;
}

static struct dma_buf *vdma_allocate(struct dma_heap *heap, unsigned long len, u32 fd_flags,
				     u64 heap_flags)
{
	struct vdma_heap_priv *hp = dma_heap_get_drvdata(heap);
	struct vdma *v = vdma_get_current();
	struct dma_buf *dmabuf;

	if (!v)
		return ERR_PTR(-ENODEV);
	/* Not while the device is suspended (only kernel threads still run then). */
	if (down_read_killable(&v->pm_sem)) {
		vdma_put(v);
		return ERR_PTR(-EINTR);
	}
	dmabuf = vdma_allocate_on(v, heap, len, fd_flags, hp->failfast);
	up_read(&v->pm_sem);
	vdma_put(v);
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
	list_for_each_entry(b, &v->buffers, node) {
		bool phys = b->chunk->resp_flags & VIRTIO_DMA_RESP_HOST_PHYS;

		seq_printf(s, "gpa=%#llx len=%zu host_addr=%#llx host=%s extent=%llu failfast=%d pooled=%d\n",
			   (u64)page_to_phys(b->pages), b->size,
			   b->chunk->host_addr + (b->first << PAGE_SHIFT),
			   phys ? "phys" : "region-offset", b->chunk->extent, b->failfast,
			   b->chunk->pooled);
	}
	spin_unlock_irq(&v->buffers_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vdma_buffers);

static int vdma_stats_show(struct seq_file *s, void *unused)
{
	static const char *const names[] = { "mappings", "mapped_bytes", "maps_ok", "maps_failed",
					     "maps_busy", "maps_timeout", "unmaps",
					     "bytes_migrated" };
	struct vdma *v = s->private;
	struct vdma_request *r = kzalloc(sizeof(*r), GFP_KERNEL);
	unsigned long backlog, backlog_max, withheld;
	__le64 *stat;
	int status, i;

	if (!r)
		return -ENOMEM;
	vdma_fill(&r->req, VIRTIO_DMA_T_STAT, 0, 0, 0, 0);
	status = vdma_request_sync(v, r, reply_margin_ms);
	seq_printf(s, "status=%d", status);
	if (status == VIRTIO_DMA_S_OK && r->resp_len >= sizeof(r->resp) + sizeof(r->stat)) {
		stat = (__le64 *)&r->stat;
		for (i = 0; i < ARRAY_SIZE(names); i++)
			seq_printf(s, " %s=%llu", names[i], le64_to_cpu(stat[i]));
	}
	if (status != -ETIMEDOUT && status != -EINTR)
		kfree(r);
	spin_lock_irq(&v->ctrlq_lock);
	backlog = v->backlog_len;
	backlog_max = v->backlog_max;
	spin_unlock_irq(&v->ctrlq_lock);
	spin_lock_irq(&v->withheld_lock);
	withheld = v->withheld_pages;
	spin_unlock_irq(&v->withheld_lock);
	seq_printf(s, " unmaps_sent=%lld unmaps_failed=%lld withheld_pages=%lu unmap_backlog=%lu unmap_backlog_max=%lu chunks_live=%lld idle_chunk=%d abandoned=%lld cma_retries=%lld host_busy_skips=%lld ring_full_waits=%lld suspends=%lld remaps=%lld remaps_failed=%lld",
		   (long long)atomic64_read(&v->unmaps_sent),
		   (long long)atomic64_read(&v->unmaps_failed), withheld, backlog, backlog_max,
		   (long long)atomic64_read(&v->chunks_live), READ_ONCE(v->idle) ? 1 : 0,
		   (long long)atomic64_read(&v->abandoned),
		   (long long)atomic64_read(&v->cma_retries),
		   (long long)atomic64_read(&v->host_busy_skips),
		   (long long)atomic64_read(&v->ring_full_waits),
		   (long long)atomic64_read(&v->suspends),
		   (long long)atomic64_read(&v->remaps),
		   (long long)atomic64_read(&v->remaps_failed));
	seq_printf(s, " window_base=%#llx window_size=%llu granule=%llu max_map_len=%llu features=%s%s%s%s\n",
		   v->window_base, v->window_size, v->granule, v->max_map_len,
		   v->f_host_phys ? "host_phys+" : "", v->f_deadline ? "deadline+" : "",
		   v->f_discard ? "discard+" : "", v->f_sub_granule ? "sub_granule" : "");
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vdma_stats);

#ifdef CONFIG_VIRTIO_DMA_TEST_HOOKS
/* raw: write exactly one 32-byte request header; read "status=N". */
static ssize_t vdma_raw_write(struct file *file, const char __user *buf, size_t count,
			      loff_t *ppos)
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
	status = vdma_request_sync(v, r, le32_to_cpu(r->req.deadline_ms) + reply_margin_ms);
	v->raw_status = status;
	mutex_unlock(&v->raw_lock);
	if (status != -ETIMEDOUT && status != -EINTR)
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
	struct vdma_timer_free *tf;
	struct dma_buf *dmabuf;
	unsigned long size;
	int ret = kstrtoul_from_user(buf, count, 0, &size);

	if (ret)
		return ret;
	dmabuf = vdma_allocate(vdma_heap, size, O_RDWR, 0);
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

static void vdma_debugfs_test_hooks(struct vdma *v)
{
	debugfs_create_file("raw", 0600, v->debugfs, v, &vdma_raw_fops);
	debugfs_create_file("timer_free", 0200, v->debugfs, v, &vdma_timer_free_fops);
}
#else
static void vdma_debugfs_test_hooks(struct vdma *v)
{
}
#endif

/* ---- probe and remove ---- */

/* Adds the two heaps once; they outlive every device (6.12 cannot remove a heap). */
static int vdma_heaps_add(void)
{
	struct dma_heap_export_info exp = { .ops = &vdma_heap_ops };
	struct dma_heap *heap;

	if (!vdma_heap) {
		exp.name = "virtio-dma";
		exp.priv = &heap_retry;
		heap = dma_heap_add(&exp);
		if (IS_ERR(heap))
			return PTR_ERR(heap);
		vdma_heap = heap;
	}
	if (!vdma_heap_failfast) {
		exp.name = "virtio-dma-failfast";
		exp.priv = &heap_failfast;
		heap = dma_heap_add(&exp);
		if (IS_ERR(heap))
			return PTR_ERR(heap);
		vdma_heap_failfast = heap;
	}
	return 0;
}

static int vdma_read_config(struct vdma *v)
{
	struct virtio_device *vdev = v->vdev;
	u32 granule;

	virtio_cread_le(vdev, struct virtio_dma_config, window_base, &v->window_base);
	virtio_cread_le(vdev, struct virtio_dma_config, window_size, &v->window_size);
	virtio_cread_le(vdev, struct virtio_dma_config, granule, &granule);
	virtio_cread_le(vdev, struct virtio_dma_config, max_map_len, &v->max_map_len);
	v->granule = granule;
	if (!granule || !is_power_of_2(granule) || granule < PAGE_SIZE) {
		dev_err(&vdev->dev, "bad granule %u\n", granule);
		return -EINVAL;
	}
	if (v->max_map_len < v->granule || v->max_map_len > v->window_size) {
		dev_err(&vdev->dev, "bad max_map_len %llu\n", v->max_map_len);
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
	v->f_host_phys = virtio_has_feature(vdev, VIRTIO_DMA_F_HOST_PHYS);
	v->f_deadline = virtio_has_feature(vdev, VIRTIO_DMA_F_DEADLINE);
	v->f_discard = virtio_has_feature(vdev, VIRTIO_DMA_F_DISCARD);
	v->f_sub_granule = virtio_has_feature(vdev, VIRTIO_DMA_F_SUB_GRANULE) &&
			   PAGE_SIZE % VIRTIO_DMA_SUB_GRANULE_UNIT == 0;
	v->map_unit = v->f_sub_granule ? PAGE_SIZE : v->granule;
	return 0;
}

/* Sets up both queues and tells the device the driver is ready (probe and restore). */
static int vdma_setup_vqs(struct vdma *v)
{
	struct virtqueue_info vqs_info[] = {
		{ "mapq", vdma_vq_done },
		{ "ctrlq", vdma_vq_done },
	};
	struct virtqueue *vqs[2];
	int err = virtio_find_vqs(v->vdev, 2, vqs, vqs_info, NULL);

	if (err)
		return err;
	v->mapq = vqs[VIRTIO_DMA_MAPQ];
	v->ctrlq = vqs[VIRTIO_DMA_CTRLQ];
	virtio_device_ready(v->vdev);
	return 0;
}

/* Nothing more is sent: requests fail with -ENODEV, and MAPs waiting for room wake to it. */
static void vdma_set_gone(struct vdma *v)
{
	spin_lock_irq(&v->mapq_lock);
	spin_lock(&v->ctrlq_lock);
	v->gone = true;
	spin_unlock(&v->ctrlq_lock);
	spin_unlock_irq(&v->mapq_lock);
	wake_up_all(&v->room);
}

static int vdma_probe(struct virtio_device *vdev)
{
	struct vdma *v;
	int err;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "the transport cannot read the configuration space\n");
		return -EINVAL;
	}
	mutex_lock(&vdma_heaps_lock);
	if (vdma_current) {
		dev_err(&vdev->dev, "only one virtio-dma device is supported\n");
		err = -EBUSY;
		goto unlock;
	}
	/* Not devm: heaps, buffers and late answers may refer to it after remove(). */
	v = kzalloc(sizeof(*v), GFP_KERNEL);
	if (!v) {
		err = -ENOMEM;
		goto unlock;
	}
	kref_init(&v->ref);
	v->vdev = vdev;
	get_device(&vdev->dev);
	vdev->priv = v;
	spin_lock_init(&v->mapq_lock);
	init_waitqueue_head(&v->room);
	spin_lock_init(&v->ctrlq_lock);
	INIT_LIST_HEAD(&v->backlog);
	spin_lock_init(&v->buffers_lock);
	INIT_LIST_HEAD(&v->buffers);
	spin_lock_init(&v->pool_lock);
	INIT_LIST_HEAD(&v->pool);
	INIT_DELAYED_WORK(&v->idle_work, vdma_idle_work);
	spin_lock_init(&v->withheld_lock);
	INIT_LIST_HEAD(&v->withheld);
	init_rwsem(&v->pm_sem);
	spin_lock_init(&v->chunks_lock);
	INIT_LIST_HEAD(&v->chunks);
#ifdef CONFIG_VIRTIO_DMA_TEST_HOOKS
	mutex_init(&v->raw_lock);
#endif

	err = vdma_read_config(v);
	if (err)
		goto put;
	err = vdma_setup_vqs(v);
	if (err)
		goto put;

	err = vdma_heaps_add();
	if (err)
		goto del_vqs;

	v->debugfs = debugfs_create_dir("virtio-dma", NULL);
	debugfs_create_file("buffers", 0444, v->debugfs, v, &vdma_buffers_fops);
	debugfs_create_file("stats", 0444, v->debugfs, v, &vdma_stats_fops);
	vdma_debugfs_test_hooks(v);

	spin_lock(&vdma_current_lock);
	vdma_current = v;
	spin_unlock(&vdma_current_lock);
	mutex_unlock(&vdma_heaps_lock);
	dev_info(&vdev->dev, "window %#llx+%#llx, granule %llu, largest MAP %llu bytes\n",
		 v->window_base, v->window_size, v->granule, v->max_map_len);
	return 0;

del_vqs:
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
put:
	vdev->priv = NULL;
	vdma_put(v);
unlock:
	mutex_unlock(&vdma_heaps_lock);
	return err;
}

/* Answers every request the device still holds, and the backlog, with -ENODEV. */
static void vdma_answer_all(struct vdma *v, struct virtqueue *vq, spinlock_t *lock)
{
	struct vdma_request *r, *next;

	spin_lock_irq(lock);
	while ((r = virtqueue_detach_unused_buf(vq))) {
		r->error = -ENODEV;
		vdma_answered(r);
	}
	if (vq == v->ctrlq) {
		list_for_each_entry_safe(r, next, &v->backlog, backlog) {
			list_del(&r->backlog);
			v->backlog_len--;
			r->error = -ENODEV;
			vdma_answered(r);
		}
	}
	spin_unlock_irq(lock);
}

static void vdma_remove(struct virtio_device *vdev)
{
	struct vdma *v = vdev->priv;
	struct vdma_chunk *c, *next;
	LIST_HEAD(withheld);

	mutex_lock(&vdma_heaps_lock);
	spin_lock(&vdma_current_lock);
	vdma_current = NULL;	/* new allocations fail with -ENODEV */
	spin_unlock(&vdma_current_lock);

	vdma_set_gone(v);

	/* A reset device has ended every mapping (docs/virtio-dma.md): CMA may have them all. */
	virtio_reset_device(vdev);
	spin_lock_irq(&v->withheld_lock);
	v->reset = true;
	list_splice_init(&v->withheld, &withheld);
	v->withheld_pages = 0;
	spin_unlock_irq(&v->withheld_lock);
	/* No queues if a restore failed: freeze deleted them and answered everything. */
	if (v->mapq) {
		vdma_answer_all(v, v->mapq, &v->mapq_lock);
		vdma_answer_all(v, v->ctrlq, &v->ctrlq_lock);
		vdev->config->del_vqs(vdev);
	}

	list_for_each_entry_safe(c, next, &withheld, node)
		vdma_chunk_free(c);
	/* No chunk becomes idle once gone is set: drop the last one, and its timer. */
	vdma_drop_idle(v);
	cancel_delayed_work_sync(&v->idle_work);
	debugfs_remove_recursive(v->debugfs);
	mutex_unlock(&vdma_heaps_lock);
	/* Live buffers keep v until they are released; their pages stay ordinary memory. */
	vdma_put(v);
}

#ifdef CONFIG_PM_SLEEP
/* ---- system sleep ---- */

static void vdma_set_quiesced(struct vdma *v, bool quiesced)
{
	spin_lock_irq(&v->mapq_lock);
	spin_lock(&v->ctrlq_lock);
	v->quiesced = quiesced;
	if (!quiesced)
		vdma_flush_backlog(v);
	spin_unlock(&v->ctrlq_lock);
	spin_unlock_irq(&v->mapq_lock);
	if (!quiesced) {
		/* Requests that waited for the device try again. */
		atomic_inc(&v->room_gen);
		wake_up_all(&v->room);
	}
}

/* The device has answered every request it was given. */
static bool vdma_drained(struct vdma *v)
{
	bool drained;

	spin_lock_irq(&v->mapq_lock);
	spin_lock(&v->ctrlq_lock);
	drained = v->mapq->num_free == virtqueue_get_vring_size(v->mapq) &&
		  v->ctrlq->num_free == virtqueue_get_vring_size(v->ctrlq);
	spin_unlock(&v->ctrlq_lock);
	spin_unlock_irq(&v->mapq_lock);
	return drained;
}

/*
 * Carries out the releases held while the device was suspended: an UNMAP for a chunk the
 * device may map, else the pages go straight back to CMA. Process context.
 */
static void vdma_end_released(struct vdma *v)
{
	struct vdma_chunk *c, *next;
	LIST_HEAD(released);

	spin_lock_irq(&v->chunks_lock);
	list_for_each_entry_safe(c, next, &v->chunks, live) {
		if (c->released)
			list_move_tail(&c->live, &released);
	}
	spin_unlock_irq(&v->chunks_lock);
	list_for_each_entry_safe(c, next, &released, live) {
		list_del_init(&c->live);
		c->released = false;
		if (c->mapped)
			vdma_chunk_unmap(c);	/* not suspended any more */
		else
			vdma_chunk_free(c);
	}
}

/* Ends a suspension (restored, or refused): held releases go ahead, and allocations. */
static void vdma_end_suspend(struct vdma *v)
{
	spin_lock_irq(&v->chunks_lock);
	v->suspended = false;
	v->unmapped_by_reset = false;
	spin_unlock_irq(&v->chunks_lock);
	vdma_end_released(v);
	up_write(&v->pm_sem);
}

/*
 * Before system sleep (and hibernation): the device is reset, which ends every mapping while
 * the guest's pages keep their contents (docs/virtio-dma.md §7). Live buffers stay; restore
 * MAPs their chunks again. Fails with -EBUSY, the device untouched, if it does not answer
 * what it holds within a request's time.
 */
static int vdma_freeze(struct virtio_device *vdev)
{
	struct vdma *v = vdev->priv;
	struct vdma_request *r, *rn;
	struct vdma_chunk *c, *next;
	LIST_HEAD(backlog);
	LIST_HEAD(withheld);

	/* No allocation is under way, and none starts until restore. */
	down_write(&v->pm_sem);
	spin_lock_irq(&v->chunks_lock);
	v->suspended = true;
	spin_unlock_irq(&v->chunks_lock);
	vdma_set_quiesced(v, true);
	cancel_delayed_work_sync(&v->idle_work);
	vdma_drop_idle(v);	/* held as released: the reset ends it */

	if (!wait_event_timeout(v->room, vdma_drained(v),
				msecs_to_jiffies(deadline_ms + reply_margin_ms))) {
		dev_warn(&vdev->dev, "suspend refused: the device holds unanswered requests\n");
		vdma_set_quiesced(v, false);
		vdma_end_suspend(v);
		return -EBUSY;
	}
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	v->mapq = NULL;		/* quiesced: nothing uses them until restore */
	v->ctrlq = NULL;

	/* The reset ended every mapping, those of UNMAPs not yet sent or that failed too. */
	spin_lock_irq(&v->ctrlq_lock);
	list_splice_init(&v->backlog, &backlog);
	v->backlog_len = 0;
	spin_unlock_irq(&v->ctrlq_lock);
	spin_lock_irq(&v->withheld_lock);
	list_splice_init(&v->withheld, &withheld);
	v->withheld_pages = 0;
	spin_unlock_irq(&v->withheld_lock);
	list_for_each_entry_safe(r, rn, &backlog, backlog)
		vdma_chunk_free(r->chunk);
	list_for_each_entry_safe(c, next, &withheld, node)
		vdma_chunk_free(c);

	spin_lock_irq(&v->chunks_lock);
	v->unmapped_by_reset = true;
	list_for_each_entry(c, &v->chunks, live)
		c->mapped = false;
	spin_unlock_irq(&v->chunks_lock);
	vdma_end_released(v);
	atomic64_inc(&v->suspends);
	return 0;
}

/*
 * MAPs a live chunk again at its guest address, keeping its contents (no DISCARD), so that
 * its buffers are host-contiguous again. Returns whether the device may now map it.
 */
static bool vdma_remap(struct vdma *v, struct vdma_chunk *c)
{
	struct vdma_request *r = kzalloc(sizeof(*r), GFP_KERNEL);
	int status;

	if (!r) {
		atomic64_inc(&v->remaps_failed);
		return false;
	}
	vdma_fill(&r->req, VIRTIO_DMA_T_MAP, 0, page_to_phys(c->pages),
		  c->pagecount << PAGE_SHIFT, v->f_deadline ? deadline_ms : 0);
	status = vdma_request_sync(v, r, deadline_ms + reply_margin_ms);
	if (status == -ETIMEDOUT || status == -EINTR) {
		/*
		 * r belongs to vdma_late_answer() now (it has no chunk). The MAP may still be
		 * carried out: an UNMAP at the release settles it either way.
		 */
		atomic64_inc(&v->remaps_failed);
		return true;
	}
	if (status != VIRTIO_DMA_S_OK) {
		kfree(r);
		atomic64_inc(&v->remaps_failed);
		dev_err_ratelimited(&v->vdev->dev,
				    "restore: MAP of %lu pages at %pa failed (%d): its buffers are no longer host-contiguous\n",
				    c->pagecount, &(phys_addr_t){ page_to_phys(c->pages) }, status);
		return false;
	}
	vdma_chunk_placed(v, c, &r->resp);
	kfree(r);
	atomic64_inc(&v->remaps);
	return true;
}

static int vdma_restore(struct virtio_device *vdev)
{
	struct vdma *v = vdev->priv;
	struct vdma_chunk *c;
	LIST_HEAD(todo);
	u64 base = v->window_base, size = v->window_size;
	int err;

	err = vdma_read_config(v);
	if (!err && (v->window_base != base || v->window_size != size))
		err = -ENODEV;
	if (!err)
		err = vdma_setup_vqs(v);
	if (err) {
		dev_err(&vdev->dev, "restore failed (%d): the device is not used any more\n", err);
		vdma_set_gone(v);
		vdma_end_suspend(v);
		return err;
	}
	vdma_set_quiesced(v, false);

	/*
	 * Releases are still held, so every chunk stays on a list: those on todo are this
	 * function's to move, one at a time, back to v->chunks.
	 */
	spin_lock_irq(&v->chunks_lock);
	list_splice_init(&v->chunks, &todo);
	spin_unlock_irq(&v->chunks_lock);
	for (;;) {
		bool remap, mapped;

		spin_lock_irq(&v->chunks_lock);
		c = list_first_entry_or_null(&todo, struct vdma_chunk, live);
		remap = c && !c->released && !c->mapped;
		spin_unlock_irq(&v->chunks_lock);
		if (!c)
			break;
		mapped = remap ? vdma_remap(v, c) : c->mapped;
		spin_lock_irq(&v->chunks_lock);
		c->mapped = mapped;
		list_move_tail(&c->live, &v->chunks);
		spin_unlock_irq(&v->chunks_lock);
	}
	vdma_end_suspend(v);
	return 0;
}
#endif

static const struct virtio_device_id id_table[] = {
	{ VIRTIO_ID_DMA, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static unsigned int features[] = {
	VIRTIO_DMA_F_HOST_PHYS, VIRTIO_DMA_F_DEADLINE, VIRTIO_DMA_F_DISCARD,
	VIRTIO_DMA_F_SUB_GRANULE,
};

static struct virtio_driver virtio_dma_driver = {
	.feature_table = features,
	.feature_table_size = ARRAY_SIZE(features),
	.driver.name = KBUILD_MODNAME,
	/*
	 * dma-buf heaps cannot be removed in 6.12, and userspace keeps using them (and the
	 * buffers they gave out) whatever happens to the device: unbinding through sysfs would
	 * only leave heaps that fail every allocation, so it is not offered. remove() still
	 * runs when the transport goes away, and leaves the heaps and live buffers safe.
	 */
	.driver.suppress_bind_attrs = true,
	.id_table = id_table,
	.probe = vdma_probe,
	.remove = vdma_remove,
#ifdef CONFIG_PM_SLEEP
	.freeze = vdma_freeze,
	.restore = vdma_restore,
#endif
};

module_virtio_driver(virtio_dma_driver);
MODULE_DEVICE_TABLE(virtio, id_table);
MODULE_DESCRIPTION("virtio-dma: host-contiguous DMA buffers from the guest's CMA area");
MODULE_LICENSE("GPL");
