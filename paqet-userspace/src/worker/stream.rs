//! [`TunnelStream`]: one smux stream of a worker session, as tokio `AsyncRead + AsyncWrite` (TCP payloads)
//! or as a datagram channel ([`TunnelStream::send_datagram`] / [`TunnelStream::recv_datagram`], one smux
//! frame per UDP datagram, spec §3.8).
//!
//! The stream does not own data: bytes live in the session's smux state inside the shared [`Core`]. Reads
//! and writes borrow the core for the duration of one call, register a waker when they cannot progress and
//! mark the session dirty so the driver flushes it. Dropping the stream closes it (FIN; paqet has no
//! half-close).
//!
//! [`Core`]: super::core::Core
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::core::Shared;

/// A smux stream inside a worker session. `!Send`: use it on the worker's `LocalSet`.
pub struct TunnelStream {
    shared: Shared,
    id: u64,
    sid: u32,
    closed: bool,
}

fn session_gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "paqet session closed")
}

impl TunnelStream {
    /// Wraps stream `sid` of session `id`; the stream must already be registered with the core.
    pub(crate) fn attach(shared: Shared, id: u64, sid: u32) -> Self {
        TunnelStream {
            shared,
            id,
            sid,
            closed: false,
        }
    }

    /// The smux stream id.
    pub fn sid(&self) -> u32 {
        self.sid
    }

    /// The worker-internal session id (stable for the session's life).
    pub fn session_id(&self) -> u64 {
        self.id
    }

    /// The session's peer (client address on a server, server address on a client), if still alive.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.shared.borrow().endpoint.get(self.id).map(|e| e.peer())
    }

    /// Reads into `buf`; `Ready(Ok(0))` = end of stream.
    fn poll_read_bytes(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut c = self.shared.borrow_mut();
        let Some(e) = c.endpoint.get_mut(self.id) else {
            return Poll::Ready(Err(session_gone()));
        };
        match e.session.read(self.sid, buf) {
            Ok(n) if n > 0 => {
                c.mark_dirty(self.id); // the read may have to send a window update
                Poll::Ready(Ok(n))
            }
            Ok(_) if e.session.is_fin(self.sid) => Poll::Ready(Ok(0)),
            Ok(_) => {
                if let Some(s) = e.io.streams.get_mut(&self.sid) {
                    s.read = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(_) if e.session.is_fin(self.sid) => Poll::Ready(Ok(0)),
            Err(err) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream {} read: {err}", self.sid),
            ))),
        }
    }

    fn poll_write_bytes(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut c = self.shared.borrow_mut();
        let Some(e) = c.endpoint.get_mut(self.id) else {
            return Poll::Ready(Err(session_gone()));
        };
        match e.session.write(self.sid, data) {
            Ok(n) if n > 0 => {
                c.mark_dirty(self.id);
                Poll::Ready(Ok(n))
            }
            Ok(_) => {
                if let Some(s) = e.io.streams.get_mut(&self.sid) {
                    s.write = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(err) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("stream {} write: {err}", self.sid),
            ))),
        }
    }

    /// Sends one datagram as one smux frame (waits while the stream's window is full).
    /// Datagrams over [`super::MAX_UDP_DATAGRAM`] bytes are refused with `InvalidInput`.
    pub async fn send_datagram(&self, data: &[u8]) -> io::Result<()> {
        if data.len() > super::MAX_UDP_DATAGRAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "datagram of {} bytes exceeds the {}-byte limit",
                    data.len(),
                    super::MAX_UDP_DATAGRAM
                ),
            ));
        }
        poll_fn(|cx| {
            let mut c = self.shared.borrow_mut();
            let Some(e) = c.endpoint.get_mut(self.id) else {
                return Poll::Ready(Err(session_gone()));
            };
            match e.session.write_datagram(self.sid, data) {
                Ok(true) => {
                    c.mark_dirty(self.id);
                    Poll::Ready(Ok(()))
                }
                Ok(false) => {
                    if let Some(s) = e.io.streams.get_mut(&self.sid) {
                        s.write = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Err(err) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("stream {} datagram write: {err}", self.sid),
                ))),
            }
        })
        .await
    }

    /// Receives one datagram (one smux frame); `Ok(None)` = the peer closed the stream. Cancel-safe.
    pub async fn recv_datagram(&self) -> io::Result<Option<Vec<u8>>> {
        poll_fn(|cx| {
            let mut c = self.shared.borrow_mut();
            let Some(e) = c.endpoint.get_mut(self.id) else {
                return Poll::Ready(Err(session_gone()));
            };
            match e.session.read_frame(self.sid) {
                Ok(Some(d)) => {
                    c.mark_dirty(self.id);
                    Poll::Ready(Ok(Some(d)))
                }
                Ok(None) if e.session.is_fin(self.sid) => Poll::Ready(Ok(None)),
                Ok(None) => {
                    if let Some(s) = e.io.streams.get_mut(&self.sid) {
                        s.read = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Err(_) if e.session.is_fin(self.sid) => Poll::Ready(Ok(None)),
                Err(err) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("stream {} datagram read: {err}", self.sid),
                ))),
            }
        })
        .await
    }

    /// Closes the stream now (FIN). Dropping does the same.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.shared.borrow_mut().release_stream(self.id, self.sid);
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        let dst = buf.initialize_unfilled();
        match self.poll_read_bytes(cx, dst) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream closed",
            )));
        }
        self.poll_write_bytes(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Accepted bytes are in the session; the driver sends them without further prompting.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if !self.closed {
            self.closed = true;
            if let Ok(mut c) = self.shared.try_borrow_mut() {
                c.release_stream(self.id, self.sid);
            }
        }
    }
}
