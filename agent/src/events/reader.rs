//! The ring-buffer reader: one RingBuf (ordered across CPUs) read through
//! tokio's AsyncFd. Each record is decoded and handed to `on_event`.
use aya::maps::{MapData, RingBuf};
use mcp_warden_common::Event;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
};

use super::decode;

/// Requests to the reader.
#[derive(Debug)]
pub enum Control {
    /// Deliver everything written so far, then acknowledge.
    Drain(oneshot::Sender<()>),
    /// Drain and return.
    Stop,
}

/// Read events until `Control::Stop` (or the control channel closes).
/// Returns the number of malformed records.
pub async fn run<F>(
    ring: RingBuf<MapData>,
    mut on_event: F,
    mut control: mpsc::Receiver<Control>,
) -> std::io::Result<u64>
where
    F: FnMut(Event),
{
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as
    // the AsyncFd (which owns the ring buffer) lives.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    let mut bad = 0u64;
    let mut drain = |ring: &mut RingBuf<MapData>, bad: &mut u64| {
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(ev) => on_event(ev),
                None => *bad += 1,
            }
        }
    };
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut bad);
                guard.clear_ready();
            }
            req = control.recv() => {
                drain(fd.get_mut(), &mut bad);
                match req {
                    Some(Control::Drain(ack)) => { let _ = ack.send(()); }
                    Some(Control::Stop) | None => return Ok(bad),
                }
            }
        }
    }
}
