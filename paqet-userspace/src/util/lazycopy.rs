//! A byte copy for relays that holds no buffer while idle.
//!
//! `tokio::io::copy` owns an 8 KiB buffer for as long as the copy lives; a relay has two, on each end of
//! the tunnel, so ten thousand idle proxied connections would pin hundreds of MiB. [`copy_lazy`] reads into
//! one per-thread scratch buffer and writes straight on; only bytes the writer cannot take right now are
//! kept, in a buffer allocated for them and freed as soon as they are written.
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of the per-thread read scratch.
pub const CHUNK: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; CHUNK]);
}

/// Copies `r` to `w` until `r` ends (EOF) or either side fails; returns the bytes copied.
pub async fn copy_lazy<R, W>(r: &mut R, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut pending: Vec<u8> = Vec::new();
    let mut off = 0usize;
    let mut total = 0u64;
    let mut need_flush = false;
    poll_fn(|cx| loop {
        // Bytes the writer could not take earlier go first.
        while off < pending.len() {
            match Pin::new(&mut *w).poll_write(cx, &pending[off..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    off += n;
                    need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !pending.is_empty() {
            pending = Vec::new();
            off = 0;
        }
        let step = SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut rb = ReadBuf::new(&mut s[..]);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let data = rb.filled();
                    if data.is_empty() {
                        return Poll::Ready(Ok(None));
                    }
                    let mut written = 0;
                    while written < data.len() {
                        match Pin::new(&mut *w).poll_write(cx, &data[written..]) {
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                            }
                            Poll::Ready(Ok(n)) => written += n,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => break,
                        }
                    }
                    Poll::Ready(Ok(Some((data.len(), data[written..].to_vec()))))
                }
            }
        });
        match step {
            Poll::Pending => {
                if need_flush {
                    match Pin::new(&mut *w).poll_flush(cx) {
                        Poll::Ready(Ok(())) => need_flush = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(None)) => {
                return match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(total)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Flush pending at EOF: finish on a later poll (nothing left to read).
                        need_flush = true;
                        Poll::Pending
                    }
                };
            }
            Poll::Ready(Ok(Some((n, rest)))) => {
                total += n as u64;
                need_flush = true;
                if !rest.is_empty() {
                    pending = rest;
                    off = 0;
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn copies_everything_through_a_slow_small_pipe() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            // A 1 KiB duplex pipe forces partial writes and pending bytes.
            let (mut src_w, mut src_r) = tokio::io::duplex(4096);
            let (mut dst_w, mut dst_r) = tokio::io::duplex(1024);
            let d2 = data.clone();
            let writer = tokio::spawn(async move {
                src_w.write_all(&d2).await.unwrap();
                drop(src_w);
            });
            let copier = tokio::spawn(async move {
                let n = copy_lazy(&mut src_r, &mut dst_w).await.unwrap();
                drop(dst_w);
                n
            });
            let mut got = Vec::new();
            dst_r.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            assert_eq!(copier.await.unwrap(), data.len() as u64);
            assert_eq!(got, data);
        });
    }

    #[test]
    fn reports_the_writer_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut src_w, mut src_r) = tokio::io::duplex(64);
            let (dst_w, dst_r) = tokio::io::duplex(64);
            drop(dst_r);
            let mut dst_w = dst_w;
            src_w.write_all(b"hello").await.unwrap();
            assert!(copy_lazy(&mut src_r, &mut dst_w).await.is_err());
        });
    }
}
