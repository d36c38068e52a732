//! The one way dmavisor runs work off the VMM's main loop: a thread with its own event-manager
//! loop, serving one subscriber until its stop `EventFd` fires (the shape of Cloud Hypervisor's
//! epoll helper).
//!
//! The main loop (console input, stop signals, the VM's exit) must never wait on guest DMA
//! memory: a MAP may wait up to its deadline for a pin, a forced migration copies hundreds of
//! megabytes. So device queues and the control API each get a worker; all of them, and the main
//! loop, are event-manager subscribers.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A running worker; [`Worker::stop`] (or dropping it) stops the loop and joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    name: String,
}

/// Ends the loop when its eventfd fires.
struct StopOnEvent {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopOnEvent {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("worker: watching the stop eventfd: {e:?}");
        }
    }
}

impl Worker {
    /// Starts a thread named `name` that serves `subscriber`'s events until stopped.
    pub fn spawn<S>(name: &str, subscriber: S) -> std::io::Result<Worker>
    where
        S: MutEventSubscriber + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        manager.add_subscriber(Arc::new(Mutex::new(subscriber)));
        manager.add_subscriber(Arc::new(Mutex::new(StopOnEvent {
            evt: stop.try_clone()?,
            stopped: stopped.clone(),
        })));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!("worker event loop: {e:?}");
                        return;
                    }
                }
            })?;
        tracing::debug!(name, stop_fd = stop.as_raw_fd(), "worker started");
        Ok(Worker {
            stop,
            thread: Some(thread),
            name: name.into(),
        })
    }

    /// Stops the loop after the event it is serving, and waits for the thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!(name = self.name, "stopping worker: {e}");
                return;
            }
            let _ = thread.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(n) = self.evt.read() {
                let _ = self.seen.send(n);
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn serves_events_until_stopped() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn(
            "test-worker",
            Echo {
                evt: evt.try_clone().unwrap(),
                seen: tx,
            },
        )
        .unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(3));
        worker.stop();
        evt.write(1).unwrap();
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(100))
                .is_err(),
            "stopped"
        );
    }
}
