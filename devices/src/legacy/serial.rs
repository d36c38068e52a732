//! The 16550 console: `vm_superio`'s UART behind our bus, with guest input buffered beyond the
//! UART's FIFO and the output watched for a guest kernel panic.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the UART's interrupt through an `EventFd` the VMM wires to an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The line the kernel prints first when it panics (kernel/panic.c).
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Passes console output through and records whether the guest kernel has panicked.
///
/// A guest with `panic=-1` reboots right after it panics, so the reset alone cannot tell a
/// clean reboot from a crash; the console can.
pub struct PanicWatch<W> {
    inner: W,
    matched: usize,
    panicked: Arc<AtomicBool>,
}

impl<W: Write> PanicWatch<W> {
    pub fn new(inner: W, panicked: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            matched: 0,
            panicked,
        }
    }

    fn observe(&mut self, byte: u8) {
        // The marker has no repeated prefix, so a mismatch restarts the match at this byte.
        if byte == PANIC_MARKER[self.matched] {
            self.matched += 1;
        } else {
            self.matched = usize::from(byte == PANIC_MARKER[0]);
        }
        if self.matched == PANIC_MARKER.len() {
            self.panicked.store(true, Ordering::SeqCst);
            self.matched = 0;
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        buf.iter().for_each(|&b| self.observe(b));
        // The console must never stall the vCPU: output that cannot be written is dropped.
        let _ = self.inner.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        let _ = self.inner.flush();
        Ok(())
    }
}

/// COM1 as the guest sees it (8 registers at 0x3f8, IRQ 4).
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<EventFdTrigger, NoEvents, W>,
    // Input that did not fit in the UART's FIFO yet; drained as the guest reads.
    pending: VecDeque<u8>,
}

/// Bytes of guest input held beyond the UART FIFO before further input is dropped.
const MAX_PENDING_INPUT: usize = 64 * 1024;

impl<W: Write + Send> SerialConsole<W> {
    pub fn new(interrupt: EventFd, out: W) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(interrupt), out),
            pending: VecDeque::new(),
        }
    }

    /// Queues host input for the guest; returns how many bytes were accepted.
    pub fn queue_input(&mut self, input: &[u8]) -> usize {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let accepted = input.len().min(room);
        self.pending.extend(&input[..accepted]);
        self.feed_uart();
        accepted
    }

    fn feed_uart(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 || self.pending.is_empty() {
            return;
        }
        let chunk: Vec<u8> = self.pending.iter().take(room).copied().collect();
        if let Ok(n) = self.uart.enqueue_raw_bytes(&chunk) {
            self.pending.drain(..n);
        }
    }

    pub fn writer(&self) -> &W {
        self.uart.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
        if offset == 0 {
            self.feed_uart();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            tracing::debug!("serial write at offset {offset}: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_marker_found_across_writes_and_after_partial_match() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = PanicWatch::new(Vec::new(), flag.clone());
        w.write_all(b"[ 1.0] Kernel pan").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        w.write_all(b"KKernel panic - not").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        w.write_all(b" syncing: Attempted to kill init!").unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert!(w.inner.starts_with(b"[ 1.0] Kernel pan"));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = PanicWatch::new(io::sink(), flag.clone());
        w.write_all(b"Kernel panic_on_warn=0; not syncing anything\n")
            .unwrap();
        assert!(!flag.load(Ordering::SeqCst));
    }

    #[test]
    fn input_beyond_fifo_is_delivered_in_order_as_guest_reads() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq, Vec::new());
        // Enable the receive-data interrupt as a driver would (IER bit 0).
        s.write(1, &[1]);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(s.queue_input(&input), 200);
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }

    #[test]
    fn output_reaches_writer() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq, Vec::new());
        for &b in b"hi" {
            s.write(0, &[b]);
        }
        assert_eq!(s.writer().as_slice(), b"hi");
    }
}
