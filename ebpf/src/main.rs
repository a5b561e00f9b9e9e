//! mcp-warden kernel programs. One file per subsystem; maps and the event
//! helper are shared. Every program here is attached either to an
//! instance's cgroup (so it only ever runs for confined processes) or is a
//! tracepoint that first checks whether the current cgroup is confined.
#![no_std]
#![no_main]

mod audit;
mod bytes;
mod dns;
mod event;
mod lsm;
mod maps;
mod net;
mod proc;
mod syscalls;
mod unix;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here; loop to satisfy the type.
    #[allow(clippy::empty_loop)]
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
