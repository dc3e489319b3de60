//! Accepting gRPC connections within bounds: at most `max_connections` open (more are
//! closed as soon as they are accepted), TCP keepalive on each, `accept` backing off
//! instead of spinning when the process is out of descriptors or memory, and a [`Cut`]
//! that ends every open connection at once when a shutdown's drain time is up.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::grpc::instrument::Counted;

/// First pause of `accept` after it failed for lack of descriptors or memory; it
/// doubles on each failure in a row, up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause of `accept`.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Least time between two warnings about refused connections or a failing `accept`.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Ends every connection accepted before it is used: their reads and writes fail, so
/// the server drops them.
#[derive(Debug, Default)]
pub struct Cut {
    done: AtomicBool,
    notify: Arc<Notify>,
}

impl Cut {
    /// Cuts every open connection.
    pub fn cut(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// A connection [`Cut`] can end, holding one of the `max_connections` permits.
pub struct Cuttable {
    io: TcpStream,
    cut: Arc<Cut>,
    /// Created at accept, so a cut after it wakes the connection's task.
    cut_wait: Pin<Box<OwnedNotified>>,
    _permit: OwnedSemaphorePermit,
}

impl Cuttable {
    fn new(io: TcpStream, cut: &Arc<Cut>, permit: OwnedSemaphorePermit) -> Cuttable {
        let mut cut_wait = Box::pin(Arc::clone(&cut.notify).notified_owned());
        cut_wait.as_mut().enable();
        Cuttable {
            io,
            cut: Arc::clone(cut),
            cut_wait,
            _permit: permit,
        }
    }

    /// An error once the connection is cut; otherwise registers for the cut's wake-up.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.done.load(Ordering::Acquire) || self.cut_wait.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the broker is shutting down",
            ));
        }
        Ok(())
    }
}

impl Connected for Cuttable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What [`incoming`] needs besides the listener.
pub struct Accepting {
    /// Most open connections.
    pub max_connections: usize,
    /// TCP keepalive idle time and probe interval.
    pub keepalive: Duration,
    /// The open-connections gauge.
    pub gauge: Gauge,
    /// Ends the connections when a shutdown's drain is over.
    pub cut: Arc<Cut>,
}

/// The connections `listener` accepts, for tonic: a task accepts them and hands them
/// over a channel; it ends (closing the listening socket) once tonic drops the stream,
/// which it does when a shutdown begins.
pub fn incoming(
    listener: TcpListener,
    accepting: Accepting,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Counted<Cuttable>>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(accept(listener, accepting, sender));
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

async fn accept(
    listener: TcpListener,
    accepting: Accepting,
    sender: tokio::sync::mpsc::Sender<io::Result<Counted<Cuttable>>>,
) {
    let permits = Arc::new(Semaphore::new(accepting.max_connections));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(accepting.keepalive)
        .with_interval(accepting.keepalive);
    let mut pacer = AcceptPacer::default();
    let mut refused = Warner::default();
    loop {
        let accepted = tokio::select! {
            _ = sender.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                pacer.failed(&e, "gRPC").await;
                continue;
            }
        };
        pacer.accepted();
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if let Some(missed) = refused.due() {
                tracing::warn!(
                    max_connections = accepting.max_connections,
                    refused_since_last_warning = missed,
                    "closing a new connection: max_connections are open"
                );
            }
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
        let connection = Counted::new(
            Cuttable::new(stream, &accepting.cut, permit),
            &accepting.gauge,
        );
        if sender.send(Ok(connection)).await.is_err() {
            return;
        }
    }
}

/// Paces an accept loop after failures: a process out of descriptors or memory would
/// fail again at once if it retried at once (the 99 % CPU spin of a process at its
/// descriptor limit), so it pauses, doubling the pause while failures go on, and warns
/// at most every [`WARN_EVERY`]. Any other error is one connection's (reset by its peer
/// before it was accepted) and is skipped.
pub(crate) struct AcceptPacer {
    pause: Duration,
    failing: Warner,
}

impl Default for AcceptPacer {
    fn default() -> Self {
        AcceptPacer {
            pause: ACCEPT_BACKOFF_MIN,
            failing: Warner::default(),
        }
    }
}

impl AcceptPacer {
    /// Handles a failed `accept` of the `listener` (named in the warning).
    pub(crate) async fn failed(&mut self, e: &io::Error, listener: &'static str) {
        if !out_of_resources(e) {
            tracing::debug!(error = %e, listener, "accept failed");
            return;
        }
        if let Some(missed) = self.failing.due() {
            tracing::warn!(
                error = %e, listener, pause = ?self.pause, failures_since_last_warning = missed,
                "cannot accept connections: out of file descriptors or memory; raise the \
                 limit (ulimit -n) or lower --max-connections"
            );
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// A connection was accepted: the next failure starts with the shortest pause.
    pub(crate) fn accepted(&mut self) {
        self.pause = ACCEPT_BACKOFF_MIN;
    }
}

/// True for the `accept` errors that say the process is out of descriptors or memory.
fn out_of_resources(e: &io::Error) -> bool {
    use crate::error::{EMFILE, ENFILE, ENOMEM};
    const ENOBUFS: i32 = 105;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOMEM | ENOBUFS))
}

/// Lets a warning through at most every [`WARN_EVERY`], counting those held back.
#[derive(Default)]
pub(crate) struct Warner {
    last: Option<Instant>,
    missed: u64,
}

impl Warner {
    /// `Some(held back since the last)` when a warning is due.
    pub(crate) fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < WARN_EVERY) {
            self.missed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.missed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_back_off_and_others_do_not() {
        assert!(out_of_resources(&io::Error::from_raw_os_error(24)));
        assert!(out_of_resources(&io::Error::from_raw_os_error(23)));
        assert!(!out_of_resources(&io::Error::from_raw_os_error(103)));
    }

    #[test]
    fn warnings_are_held_back_and_counted() {
        let mut warner = Warner::default();
        assert_eq!(warner.due(), Some(0));
        assert_eq!(warner.due(), None);
        assert_eq!(warner.due(), None);
        warner.last = Some(Instant::now() - WARN_EVERY);
        assert_eq!(warner.due(), Some(2));
    }

    #[tokio::test]
    async fn a_cut_ends_reads_of_open_connections() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let _client = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let cut = Arc::new(Cut::default());
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a permit");
        let mut connection = Cuttable::new(server, &cut, permit);
        let reading = tokio::spawn(async move {
            let mut buf = [0; 8];
            connection.read(&mut buf).await
        });
        // The read waits: the client sends nothing. The cut ends it.
        tokio::task::yield_now().await;
        cut.cut();
        let read = reading.await.expect("the read task");
        assert_eq!(
            read.expect_err("cut").kind(),
            io::ErrorKind::ConnectionAborted
        );
    }
}
