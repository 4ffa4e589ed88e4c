//! `process.terminal`: a pseudo-terminal on the host whose master goes to
//! `--console-socket` over SCM_RIGHTS, as runc sends it; the waiter relays
//! the slave side to and from the container's terminal in the guest.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};

/// Opens a pseudo-terminal; returns (master, slave).
pub fn open_pty() -> Result<(File, File)> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: valid out-pointers; name, termios and winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a pseudo-terminal");
    }
    // SAFETY: openpty returned two descriptors that we now own.
    let (m, s) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    for f in [&m, &s] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // The container's terminal is the guest's pty, whose line discipline
    // echoes, edits lines, makes signals of ^C and turns "\n" into "\r\n".
    // This one only carries bytes to and from it: raw, or every line would
    // end "\r\r\n" and every key typed would be echoed twice.
    // SAFETY: an all-zero termios is valid; tcgetattr fills it in.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr, cfmakeraw and tcsetattr on our terminal with a
    // valid termios pointer.
    let rc = unsafe {
        if libc::tcgetattr(s.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(s.as_raw_fd(), libc::TCSANOW, &t)
        } else {
            -1
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("making the pseudo-terminal raw");
    }
    Ok((m, s))
}

/// Sends `fd` to the console socket at `path` (SCM_RIGHTS, with the
/// terminal's name as the message, as runc does).
pub fn send_master(path: &Path, master: &File) -> Result<()> {
    let sock = UnixStream::connect(path)
        .with_context(|| format!("connecting to the console socket {}", path.display()))?;
    let name = b"/dev/ptmx";
    let mut iov = libc::iovec {
        iov_base: name.as_ptr() as *mut libc::c_void,
        iov_len: name.len(),
    };
    let fd = master.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; we fill in its pointers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes, enough for one cmsg with
    // one descriptor; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
    }
    // SAFETY: sendmsg on our socket with a valid msghdr.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sending the terminal to {}", path.display()));
    }
    Ok(())
}

/// The window size of terminal `f`.
pub fn window_size(f: &File) -> Option<(u16, u16)> {
    // SAFETY: an all-zero winsize is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize to the valid pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } < 0 {
        return None;
    }
    Some((ws.ws_row, ws.ws_col))
}
