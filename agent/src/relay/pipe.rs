//! Non-blocking pipes for the stdio relay, and the relay's own thread.
//!
//! tokio's `stdin()`/`stdout()` hand every read and write to its blocking
//! thread pool (a regular blocking descriptor can't be polled): two thread
//! wake-ups per message on top of the pipe itself. [`Pipe`] instead registers
//! a non-blocking descriptor with the reactor (epoll) and does one `read(2)`
//! or `write(2)` per operation on the polling thread.
//!
//! Our stdin and stdout are shared with the process that started us, and
//! `O_NONBLOCK` belongs to the open file description, not the descriptor: set
//! on fd 0 it would also change the parent's end (a shell's terminal, say).
//! So a pipe or terminal is reopened through `/proc/self/fd/N` (a new
//! description of the same pipe or device, ours alone); a socket is used
//! through `recv`/`send` with `MSG_DONTWAIT`, which never touches the shared
//! flags. Anything else (a regular file, `/dev/null`) can't be polled and
//! falls back to tokio's blocking-pool stdin/stdout.
//!
//! [`spawn_stdio`] runs the whole stdio relay on a thread of its own with a
//! single-threaded runtime: a message in and its forwarding happen on one
//! thread, with no hand-over between the runtime's workers.
use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use tokio::io::{unix::AsyncFd, AsyncRead, AsyncWrite, ReadBuf};

use super::{eof::EofNotify, RelayError, RelayHooks, RelayStats};
use crate::policy::model::Policy;

/// Pipe buffer asked for on the server's pipes (the kernel's default is
/// 64 KiB): fewer wake-ups per large message. Best effort.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A non-blocking descriptor driven by the reactor.
#[derive(Debug)]
pub struct Pipe {
    fd: AsyncFd<OwnedFd>,
    /// A socket: use `recv`/`send` with `MSG_DONTWAIT` (the description's
    /// own flags may be shared and blocking).
    socket: bool,
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open, and the same one, until
    // it is dropped, which the AsyncFd does last.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Pipe {
    /// Take a descriptor that is ours alone (a pipe we created): it is made
    /// non-blocking. Must be called inside a runtime with I/O enabled.
    pub fn from_owned(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: F_SETPIPE_SZ on our own descriptor; failure is harmless.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe {
            fd: register(fd)?,
            socket: false,
        })
    }

    /// Our stdin, read without the blocking pool. Err when it can't be
    /// polled (see the module docs).
    pub fn stdin() -> io::Result<Self> {
        Self::reopen(libc::STDIN_FILENO, libc::O_RDONLY)
    }

    /// Our stdout, written without the blocking pool.
    pub fn stdout() -> io::Result<Self> {
        Self::reopen(libc::STDOUT_FILENO, libc::O_WRONLY)
    }

    fn reopen(fd: RawFd, access: libc::c_int) -> io::Result<Self> {
        // SAFETY: all-zero is a valid `stat`; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a stat buffer.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO | libc::S_IFCHR => {
                let path = format!("/proc/self/fd/{fd}\0");
                // SAFETY: NUL-terminated path; the descriptor returned is new
                // and owned by us.
                let new = unsafe {
                    libc::open(
                        path.as_ptr().cast(),
                        access | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
                    )
                };
                if new < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: just opened, owned by nobody else.
                let owned = unsafe { OwnedFd::from_raw_fd(new) };
                Ok(Pipe {
                    fd: register(owned)?,
                    socket: false,
                })
            }
            libc::S_IFSOCK => {
                // SAFETY: duplicating a descriptor we hold; the copy is ours.
                let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
                if new < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: just duplicated, owned by nobody else.
                let owned = unsafe { OwnedFd::from_raw_fd(new) };
                Ok(Pipe {
                    fd: register(owned)?,
                    socket: true,
                })
            }
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "not a pipe, terminal or socket",
            )),
        }
    }

    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `buf` is valid for `buf.len()` writable bytes.
        let n = unsafe {
            if self.socket {
                libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
            } else {
                libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
            }
        };
        cvt(n)
    }

    fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `buf` is valid for `buf.len()` readable bytes.
        let n = unsafe {
            if self.socket {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(fd, buf.as_ptr().cast(), buf.len())
            }
        };
        cvt(n)
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let want = unfilled.len();
            match this.read_now(unfilled) {
                Ok(n) => {
                    // A short read drained the pipe: the next byte to arrive
                    // is a new edge. Clearing now saves the read that would
                    // only say EAGAIN (tokio's own pipes do the same).
                    if n > 0 && n < want && !this.socket {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            // Try first: a pipe with room takes the bytes at once, without a
            // trip through the reactor.
            match this.write_now(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            match guard.try_io(|_| this.write_now(buf)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The descriptor is closed when the pipe is dropped.
        Poll::Ready(Ok(()))
    }
}

/// Our stdin: a [`Pipe`] when it can be polled, else tokio's.
pub enum ClientIn {
    Pipe(Pipe),
    Tokio(tokio::io::Stdin),
}

impl ClientIn {
    pub fn open() -> Self {
        match Pipe::stdin() {
            Ok(p) => ClientIn::Pipe(p),
            Err(e) => {
                log::debug!("relay: stdin read through the blocking pool ({e})");
                ClientIn::Tokio(tokio::io::stdin())
            }
        }
    }
}

impl AsyncRead for ClientIn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIn::Pipe(p) => Pin::new(p).poll_read(cx, buf),
            ClientIn::Tokio(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// Our stdout: a [`Pipe`] when it can be polled, else tokio's.
pub enum ClientOut {
    Pipe(Pipe),
    Tokio(tokio::io::Stdout),
}

impl ClientOut {
    pub fn open() -> Self {
        match Pipe::stdout() {
            Ok(p) => ClientOut::Pipe(p),
            Err(e) => {
                log::debug!("relay: stdout written through the blocking pool ({e})");
                ClientOut::Tokio(tokio::io::stdout())
            }
        }
    }
}

impl AsyncWrite for ClientOut {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientOut::Pipe(p) => Pin::new(p).poll_write(cx, buf),
            ClientOut::Tokio(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientOut::Pipe(p) => Pin::new(p).poll_flush(cx),
            ClientOut::Tokio(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientOut::Pipe(p) => Pin::new(p).poll_shutdown(cx),
            ClientOut::Tokio(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why the relay thread gave no result.
#[derive(Debug, thiserror::Error)]
pub enum RelayThreadError {
    #[error("starting the relay thread: {0}")]
    Start(#[source] io::Error),
    #[error("the relay thread ended without a result")]
    Gone,
}

/// The stdio relay running on its own thread ([`spawn_stdio`]); resolves to
/// its result.
pub struct RelayThread {
    rx: tokio::sync::oneshot::Receiver<Result<Result<RelayStats, RelayError>, RelayThreadError>>,
}

impl Future for RelayThread {
    type Output = Result<Result<RelayStats, RelayError>, RelayThreadError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(Pin::new(&mut self.rx).poll(cx)) {
            Ok(r) => Poll::Ready(r),
            Err(_) => Poll::Ready(Err(RelayThreadError::Gone)),
        }
    }
}

/// Relay our stdin/stdout to the server's pipes on a thread of its own (a
/// single-threaded runtime). `client_gone` is told when our stdin ends.
pub fn spawn_stdio<H: RelayHooks>(
    server_in: tokio::process::ChildStdin,
    server_out: tokio::process::ChildStdout,
    policy: Arc<Policy>,
    hooks: Arc<H>,
    client_gone: Option<tokio::sync::oneshot::Sender<()>>,
) -> RelayThread {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let fds = server_in.into_owned_fd().and_then(|i| {
        let o = server_out.into_owned_fd()?;
        Ok((i, o))
    });
    let (fd_in, fd_out) = match fds {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(Err(RelayThreadError::Start(e)));
            return RelayThread { rx };
        }
    };
    let run = move || -> Result<Result<RelayStats, RelayError>, RelayThreadError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RelayThreadError::Start)?;
        let r = rt.block_on(async move {
            let server_in = Pipe::from_owned(fd_in).map_err(RelayThreadError::Start)?;
            let server_out = Pipe::from_owned(fd_out).map_err(RelayThreadError::Start)?;
            let client_in = EofNotify::with_sender(ClientIn::open(), client_gone);
            Ok(super::relay(
                client_in,
                ClientOut::open(),
                server_in,
                server_out,
                policy,
                hooks,
            )
            .await)
        });
        // A blocking-pool stdin read may never return: don't wait for it.
        rt.shutdown_background();
        r
    };
    let spawned = std::thread::Builder::new()
        .name("mw-relay".into())
        .spawn(move || {
            let _ = tx.send(run());
        });
    match spawned {
        Ok(_) => RelayThread { rx },
        Err(e) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(Err(RelayThreadError::Start(e)));
            RelayThread { rx }
        }
    }
}
