//! Accepted connections whose writes are coalesced across one scheduler round.
//!
//! When a stock change fans out to thousands of WatchAvailability streams, each stream's
//! task hands one small frame to its HTTP/2 connection and wakes the connection's task,
//! which would write and flush that one frame right away: one `writev` per message, about
//! a third of the server's CPU in the kernel. [`CoalescingStream`] defers the first flush
//! of a burst by one turn of the scheduler (the connection task yields and is polled again
//! after the tasks already queued), so every frame the other streams queue meanwhile goes
//! out in the same write. A lone call waits only for that one turn: nothing else queued,
//! no wait. The load generator's client connections use the same stream
//! ([`coalescing_connect`]), so a crowd of calls leaves it in a few writes too.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Pending bytes past which a write goes out at once instead of waiting for the flush.
const MAX_PENDING: usize = 64 * 1024;
/// Buffer capacity kept by an idle connection; a larger one (after a burst) is freed.
const KEEP_CAPACITY: usize = 16 * 1024;

/// The accepted connections of `listener`, with `TCP_NODELAY` set (writes are coalesced
/// here, so Nagle's algorithm would only add delay) and coalesced writes.
pub fn coalescing_incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<CoalescingStream>> {
    TcpListenerStream::new(listener).map(|accepted| CoalescingStream::new(accepted?))
}

/// Connects to `addr` with `TCP_NODELAY` set and coalesced writes; for a client's
/// connector.
pub async fn coalescing_connect(addr: impl ToSocketAddrs) -> io::Result<CoalescingStream> {
    CoalescingStream::new(TcpStream::connect(addr).await?)
}

/// A TCP stream that gathers writes and sends them on the second flush of a burst.
pub struct CoalescingStream {
    /// The connection.
    inner: TcpStream,
    /// Bytes written but not yet sent.
    pending: BytesMut,
    /// Whether the flush asked for was deferred by one scheduler turn already.
    flush_deferred: bool,
}

impl CoalescingStream {
    /// Wraps a connection and sets `TCP_NODELAY` on it (writes are coalesced here, so
    /// Nagle's algorithm would only add delay).
    pub fn new(inner: TcpStream) -> io::Result<Self> {
        inner.set_nodelay(true)?;
        Ok(CoalescingStream {
            inner,
            pending: BytesMut::new(),
            flush_deferred: false,
        })
    }

    /// Sends every pending byte.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.has_remaining() {
            let sent = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if sent == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(sent);
        }
        if self.pending.capacity() > KEEP_CAPACITY {
            self.pending = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room: sends what is pending once it passed [`MAX_PENDING`].
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.len() >= MAX_PENDING {
            ready!(self.poll_send_pending(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for CoalescingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CoalescingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let mut written = 0;
        for buf in bufs {
            this.pending.extend_from_slice(buf);
            written += buf.len();
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.flush_deferred {
            // Waking itself while running puts the task at the back of the run queue.
            this.flush_deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send_pending(cx))?;
        this.flush_deferred = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Connected for CoalescingStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A coalescing server side and a plain client side of one real TCP connection.
    async fn connected_pair() -> (CoalescingStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let mut incoming = Box::pin(coalescing_incoming(listener));
        let (server, client) = tokio::join!(incoming.next(), client);
        (server.unwrap().unwrap(), client.unwrap())
    }

    #[tokio::test]
    async fn a_lone_flushed_write_arrives_without_more_writes() {
        let (mut server, mut client) = connected_pair().await;
        server.write_all(b"ping").await.unwrap();
        server.flush().await.unwrap();

        let mut received = [0; 4];
        let reading = client.read_exact(&mut received);
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), reading).await;
        assert!(read.is_ok(), "the flushed bytes never arrived");
        assert_eq!(&received, b"ping");
    }

    #[tokio::test]
    async fn writes_larger_than_the_pending_limit_arrive_whole_and_in_order() {
        let (mut server, mut client) = connected_pair().await;
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.unwrap();
            received
        });
        for chunk in sent.chunks(10_007) {
            server.write_all(chunk).await.unwrap();
        }
        server.shutdown().await.unwrap();
        assert!(reader.await.unwrap() == sent, "the bytes differ");
    }

    #[tokio::test]
    async fn accepted_connections_disable_nagle_and_know_their_peer() {
        let (server, client) = connected_pair().await;
        assert!(server.inner.nodelay().unwrap());
        let peer = server.connect_info().remote_addr();
        assert_eq!(peer, Some(client.local_addr().unwrap()));
    }
}
