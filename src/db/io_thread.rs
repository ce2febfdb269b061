//! The database I/O thread: a single-threaded runtime of its own that drives every pooled
//! connection (each connection's socket task runs here) and the hold batches.
//!
//! On the request runtime, the task waiting for a query's answer queues behind whatever
//! HTTP/2 work is ready (hundreds of calls' frames under load), so every round trip of a
//! batch that holds a product's row lock took about a millisecond longer than PostgreSQL
//! did. Here the answer is handled as soon as the OS runs this thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A running I/O thread; it stops once the last reference is dropped.
pub struct IoThread {
    /// Spawns onto the thread's runtime.
    handle: Handle,
    /// Dropped with this struct, which ends the thread's runtime (and every task on it).
    _stop: oneshot::Sender<()>,
    /// The thread, detached when dropped: it ends on its own once stopped.
    _thread: JoinHandle<()>,
}

impl IoThread {
    /// Starts the thread, named `name`.
    pub fn start(name: &str) -> std::io::Result<Arc<IoThread>> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // Ends when `stop` is sent or dropped.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Arc::new(IoThread {
            handle,
            _stop: stop,
            _thread: thread,
        }))
    }

    /// Spawns onto the thread's runtime.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_tasks_on_its_own_thread_and_stops_when_dropped() {
        let io = IoThread::start("test-io").expect("start");
        let name = io
            .handle()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .expect("task ran");
        assert_eq!(name.as_deref(), Some("test-io"));
        let handle = io.handle().clone();
        drop(io);
        // The runtime shuts down on its own thread right after: from then on, tasks spawned
        // onto it are cancelled instead of run.
        for _ in 0..500 {
            if handle
                .spawn(async {})
                .await
                .is_err_and(|error| error.is_cancelled())
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the i/o thread's runtime still runs tasks 5 s after its last reference went");
    }
}
