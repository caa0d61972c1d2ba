//! Where [`emit`] sends an event, per process:
//!
//! - the supervisor (and `moat serve` as one unprivileged process) owns a [`Writer`] on a
//!   thread of its own, fed by a bounded queue;
//! - the worker has no access to the log: it sends each event as one datagram over a socket
//!   the supervisor passed down, and the supervisor queues it (marked as the worker's);
//! - without a sink (unit tests, commands that change nothing) an event goes nowhere.
//!
//! [`emit`] never blocks a request: when the queue or the socket is full the event is dropped
//! and counted (`moat_audit_records_dropped_total`).
//!
//! **Crash bound.** The writer thread takes whatever is queued (up to [`BATCH`] events) as one
//! batch, writes it and `fdatasync`s before taking the next. A crash loses at most the batch
//! being written and what is queued behind it: at most [`QUEUE`] events, and only those
//! emitted in the time one batch takes to sync (milliseconds on a local disk). A record that
//! is in the file after a sync stays there.

use std::{
    os::unix::net::UnixDatagram,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use super::{
    record::{Event, Source},
    writer::Writer,
};

pub const QUEUE: usize = 4096;
pub const BATCH: usize = 512;
/// Largest event datagram the supervisor accepts from the worker.
pub const MAX_DATAGRAM: usize = 16 * 1024;

static SINK: OnceLock<Sink> = OnceLock::new();
static WRITTEN: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

enum Sink {
    Queue(SyncSender<Msg>, Source),
    Datagram(UnixDatagram),
}

pub enum Msg {
    Event(Source, Event),
    /// Answered once everything queued before it is on disk.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Records one event (see the module docs for where it goes).
pub fn emit(event: Event) {
    crate::metrics::gateway::METRICS.observe(&event);
    match SINK.get() {
        None => {}
        Some(Sink::Queue(tx, source)) => queue(tx, *source, event),
        Some(Sink::Datagram(sock)) => {
            let bytes = serde_json::to_vec(&event).expect("events serialize");
            if sock.send(&bytes).is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn queue(tx: &SyncSender<Msg>, source: Source, event: Event) {
    match tx.try_send(Msg::Event(source, event)) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// (written, dropped) by this process's sink.
pub fn counts() -> (u64, u64) {
    (
        WRITTEN.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed),
    )
}

/// Installs a writer thread as this process's sink; events from [`emit`] are marked `source`.
/// Returns the queue's sender, for events from elsewhere (the worker's datagrams).
pub fn install_writer(writer: Writer, source: Source) -> SyncSender<Msg> {
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("moat-audit".into())
        .spawn(move || run(writer, rx))
        .expect("spawn the audit writer");
    let _ = SINK.set(Sink::Queue(tx.clone(), source));
    tx
}

/// The worker's sink: events go to the supervisor as datagrams.
pub fn install_datagram(sock: UnixDatagram) -> std::io::Result<()> {
    sock.set_nonblocking(true)?;
    let _ = SINK.set(Sink::Datagram(sock));
    Ok(())
}

/// Waits (up to `timeout`) until every event emitted so far is on disk.
pub fn flush(timeout: Duration) {
    if let Some(Sink::Queue(tx, _)) = SINK.get() {
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

/// Queues an event received from the worker.
pub fn queue_from_worker(tx: &SyncSender<Msg>, bytes: &[u8]) {
    match serde_json::from_slice::<Event>(bytes) {
        Ok(event) => queue(tx, Source::Worker, event),
        Err(e) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, len = bytes.len(), "undecodable audit event from the worker");
        }
    }
}

fn run(mut writer: Writer, rx: Receiver<Msg>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(s, e) => batch.push((s, e)),
                Msg::Flush(done) => waiting.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            match writer.append(&batch) {
                Ok(_) => {
                    WRITTEN.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    DROPPED.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::error!(error = %e, dir = %writer.dir().display(), lost = batch.len(), "cannot write the audit log");
                }
            }
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}
