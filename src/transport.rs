//! Accepted connections: at most so many open at once, accept errors paused on rather than
//! spun on, and writes coalesced across one scheduler round.
//!
//! [`Incoming`] takes a connection slot before it accepts, so past the limit new
//! connections wait in the kernel's backlog instead of taking file descriptors and memory
//! from the connections already served; a connection gives its slot back when it closes.
//! An accept that fails for want of file descriptors or memory would fail again at once,
//! so accepting pauses (doubling up to a second) instead of spinning.
//!
//! A served connection that sends nothing for its silence limit is closed. The server
//! pings an idle HTTP/2 peer (the keepalive interval) and a live one answers, so the limit
//! (keepalive interval plus timeout) only ever closes peers that never started HTTP/2 or
//! TLS, or stopped mid-way: thousands of them cannot hold the connection slots forever.
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

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Pending bytes past which a write goes out at once instead of waiting for the flush.
const MAX_PENDING: usize = 64 * 1024;
/// Buffer capacity kept by an idle connection; a larger one (after a burst) is freed.
const KEEP_CAPACITY: usize = 16 * 1024;

/// First pause after an accept failed for want of resources.
const MIN_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while resources stay exhausted.
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// The connections accepted on a listener, at most `max_connections` open at once, each
/// with `TCP_NODELAY` set (writes are coalesced here, so Nagle's algorithm would only add
/// delay) and coalesced writes. Never ends and never yields an error: failed accepts are
/// logged and retried.
pub struct Incoming {
    /// Where connections arrive.
    listener: TcpListener,
    /// One permit per open connection: accepting waits for one.
    slots: PollSemaphore,
    /// The slot taken for the next connection, held while waiting to accept it.
    slot: Option<OwnedSemaphorePermit>,
    /// While resources are exhausted: the pause before the next accept.
    pause: Option<Pin<Box<Sleep>>>,
    /// The next such pause; doubles up to [`MAX_ACCEPT_PAUSE`], reset by an accept.
    next_pause: Duration,
    /// How long an accepted connection may send nothing before it is closed.
    silence_limit: Duration,
}

impl Incoming {
    /// Accepts on `listener`, at most `max_connections` (at least one) open at once, each
    /// closed once it has sent nothing for `silence_limit`.
    pub fn new(listener: TcpListener, max_connections: usize, silence_limit: Duration) -> Self {
        let slots = Arc::new(Semaphore::new(
            max_connections.clamp(1, Semaphore::MAX_PERMITS),
        ));
        Incoming {
            listener,
            slots: PollSemaphore::new(slots),
            slot: None,
            pause: None,
            next_pause: MIN_ACCEPT_PAUSE,
            silence_limit,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<CoalescingStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            if this.slot.is_none() {
                match ready!(this.slots.poll_acquire(cx)) {
                    Some(slot) => this.slot = Some(slot),
                    // Never closed: every permit comes back when its connection closes.
                    None => return Poll::Ready(None),
                }
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    this.next_pause = MIN_ACCEPT_PAUSE;
                    match CoalescingStream::new(stream) {
                        Ok(stream) => {
                            let slot = this.slot.take();
                            let stream = stream.holding(slot).silenced_after(this.silence_limit);
                            return Poll::Ready(Some(Ok(stream)));
                        }
                        // The peer is gone already (e.g. reset): nothing to serve.
                        Err(error) => tracing::debug!(%error, "accepted connection unusable"),
                    }
                }
                Err(error) if exhausts_resources(&error) => {
                    tracing::warn!(%error, pause = ?this.next_pause, "cannot accept connections; pausing");
                    this.pause = Some(Box::pin(tokio::time::sleep(this.next_pause)));
                    this.next_pause = (this.next_pause * 2).min(MAX_ACCEPT_PAUSE);
                }
                // One connection's trouble (aborted before accept, ...): try the next.
                Err(error) => tracing::debug!(%error, "accept failed"),
            }
        }
    }
}

/// Whether an accept failed for want of file descriptors, buffers or memory: retrying at
/// once would fail the same way.
fn exhausts_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
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
    /// The server's connection slot this connection occupies, given back when it closes
    /// (see [`Incoming`]); `None` on the client side.
    _slot: Option<OwnedSemaphorePermit>,
    /// On the server side: closes the connection once the peer has been silent too long.
    silence: Option<Silence>,
}

/// When a peer that sends nothing is given up on.
struct Silence {
    /// How long the peer may send nothing.
    limit: Duration,
    /// When it last sent something (or connected).
    last_heard: Instant,
    /// Fires at the earliest moment the limit can have passed; moved on lazily, when it
    /// fires, rather than on every read.
    check: Pin<Box<Sleep>>,
}

impl Silence {
    fn new(limit: Duration) -> Self {
        let now = Instant::now();
        Silence {
            limit,
            last_heard: now,
            check: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }

    /// Ready with an error once the peer has been silent for the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.check.as_mut().poll(cx));
            let deadline = self.last_heard + self.limit;
            if deadline <= Instant::now() {
                let message = format!("peer silent for {:?}", self.limit);
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, message));
            }
            self.check.as_mut().reset(deadline);
        }
    }
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
            _slot: None,
            silence: None,
        })
    }

    /// The same stream, occupying `slot` until it is dropped.
    fn holding(self, slot: Option<OwnedSemaphorePermit>) -> Self {
        CoalescingStream {
            _slot: slot,
            ..self
        }
    }

    /// The same stream, failing its reads once the peer has sent nothing for `limit`.
    fn silenced_after(self, limit: Duration) -> Self {
        CoalescingStream {
            silence: Some(Silence::new(limit)),
            ..self
        }
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
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        match (&read, &mut this.silence) {
            (Poll::Ready(Ok(())), Some(silence)) if buf.filled().len() > before => {
                silence.last_heard = Instant::now();
            }
            (Poll::Pending, Some(silence)) => {
                if let Poll::Ready(error) = silence.poll_expired(cx) {
                    return Poll::Ready(Err(error));
                }
            }
            _ => {}
        }
        read
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
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A coalescing server side and a plain client side of one real TCP connection.
    async fn connected_pair() -> (CoalescingStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let mut incoming = Incoming::new(listener, 10, Duration::from_secs(60));
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
