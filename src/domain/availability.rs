//! Live availability: the in-memory fan-out of the change feed ([`crate::db::change_feed`],
//! one listening connection per process) to every watcher of this process: one `watch`
//! value per product shared by all its watchers, plus one broadcast for watchers of every
//! product.
//! A slow watcher skips intermediate states and always ends on the latest; no watcher
//! costs any database work after its first read.
//!
//! Watchers of a product are grouped by the client connection they came on, and a change
//! wakes one group after the other. Each watcher's update is a small HTTP/2 frame on its
//! connection; woken together, a connection's watchers queue their frames back to back
//! and they leave in one write (see [`crate::transport`]) instead of one write each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::WatchStream;
use uuid::Uuid;

use super::{Checkout, DomainError};
pub use crate::db::change_feed::StockSnapshot;

/// Changes buffered for watchers of all products before a slow one must resync.
const ALL_PRODUCTS_BUFFER: usize = 1024;

/// The latest known state of every product this process has heard of, shared by all watchers.
pub struct AvailabilityHub {
    /// The channels; `None` once the hub closed for shutdown.
    channels: Mutex<Option<Channels>>,
    /// Streams open right now, so leaks show (a closed stream must free its resources).
    open_streams: AtomicUsize,
}

/// Where watchers wait for changes.
struct Channels {
    /// The latest state of each product and the watchers waiting for its next one.
    products: HashMap<Uuid, ProductChannel>,
    /// Every newer state of any product, for watchers of all products.
    all: broadcast::Sender<StockSnapshot>,
}

/// Which watchers are woken together: those of one client connection (`None`: watchers
/// whose connection is unknown).
pub type WakeGroup = Option<SocketAddr>;

/// One product's latest state, and its watchers by wake group.
struct ProductChannel {
    /// The latest state heard of.
    latest: StockSnapshot,
    /// One value per wake group; each watcher holds a receiver of its group's.
    groups: HashMap<WakeGroup, watch::Sender<StockSnapshot>>,
}

impl ProductChannel {
    /// Records `snapshot` if it is newer and wakes every group; returns whether it was.
    fn publish(&mut self, snapshot: &StockSnapshot) -> bool {
        if snapshot.version <= self.latest.version {
            return false;
        }
        self.latest = snapshot.clone();
        // Groups whose watchers all went away are dropped here.
        self.groups
            .retain(|_, group| group.send(snapshot.clone()).is_ok());
        true
    }

    /// A receiver of the latest state for a watcher in `group`.
    fn subscribe(&mut self, group: WakeGroup) -> watch::Receiver<StockSnapshot> {
        let latest = &self.latest;
        self.groups
            .entry(group)
            .or_insert_with(|| watch::Sender::new(latest.clone()))
            .subscribe()
    }
}

/// A watcher's stream, counted as open for as long as it lives.
struct CountedStream {
    /// The updates. Declared first so it is dropped first: its receivers are gone by
    /// the time `_open` drops the wake groups left empty.
    updates: SnapshotStream,
    /// Held for its `Drop`: uncounts the stream and tidies up after it.
    _open: OpenStream,
}

impl Stream for CountedStream {
    type Item = StockSnapshot;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StockSnapshot>> {
        self.updates.poll_next_unpin(cx)
    }
}

/// Counts one open stream for as long as the stream holds it.
struct OpenStream {
    /// The hub that counts it.
    hub: Arc<AvailabilityHub>,
    /// The products it watches (none when it watches all), whose wake groups may be left
    /// empty when it ends.
    product_ids: Vec<Uuid>,
}

impl OpenStream {
    /// Counts a new stream.
    fn new(hub: &Arc<AvailabilityHub>, product_ids: &[Uuid]) -> Self {
        hub.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream {
            hub: hub.clone(),
            product_ids: product_ids.to_vec(),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.hub.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.hub.drop_empty_groups(&self.product_ids);
    }
}

impl Default for AvailabilityHub {
    fn default() -> Self {
        let channels = Channels {
            products: HashMap::new(),
            all: broadcast::channel(ALL_PRODUCTS_BUFFER).0,
        };
        AvailabilityHub {
            channels: Mutex::new(Some(channels)),
            open_streams: AtomicUsize::new(0),
        }
    }
}

impl AvailabilityHub {
    /// The channels, unless the hub closed.
    fn channels(&self) -> std::sync::MutexGuard<'_, Option<Channels>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a state if it is newer than the one known; returns whether it was.
    pub fn publish(&self, snapshot: StockSnapshot) -> bool {
        let mut channels = self.channels();
        let Some(channels) = channels.as_mut() else {
            return false;
        };
        let newer = match channels.products.get_mut(&snapshot.product_id) {
            Some(product) => product.publish(&snapshot),
            None => {
                let product = ProductChannel {
                    latest: snapshot.clone(),
                    groups: HashMap::new(),
                };
                channels.products.insert(snapshot.product_id, product);
                true
            }
        };
        if newer {
            // No receiver is fine: nobody watches all products right now.
            let _ = channels.all.send(snapshot);
        }
        newer
    }

    /// Ends every stream (their channels close) and refuses new ones: for shutdown.
    pub fn close(&self) {
        self.channels().take();
    }

    /// How many WatchAvailability streams are open in this process.
    pub fn open_streams(&self) -> usize {
        AtomicUsize::load(&self.open_streams, Ordering::Relaxed)
    }

    /// Wake groups of all products, counting each connection once per product it watches.
    pub fn wake_groups(&self) -> usize {
        let channels = self.channels();
        let Some(channels) = channels.as_ref() else {
            return 0;
        };
        channels
            .products
            .values()
            .map(|product| product.groups.len())
            .sum()
    }

    /// Forgets the wake groups of these products that no watcher is left in.
    fn drop_empty_groups(&self, product_ids: &[Uuid]) {
        let mut channels = self.channels();
        let Some(channels) = channels.as_mut() else {
            return;
        };
        for id in product_ids {
            if let Some(product) = channels.products.get_mut(id) {
                product.groups.retain(|_, group| group.receiver_count() > 0);
            }
        }
    }

    /// A receiver that sees the latest state of one product, seeded with `fresh`, for a
    /// watcher in `group`.
    fn subscribe(
        &self,
        fresh: StockSnapshot,
        group: WakeGroup,
    ) -> Result<watch::Receiver<StockSnapshot>, DomainError> {
        let product_id = fresh.product_id;
        self.publish(fresh);
        let mut channels = self.channels();
        let channels = channels.as_mut().ok_or(DomainError::ShuttingDown)?;
        let product = channels.products.get_mut(&product_id);
        Ok(product.expect("published above").subscribe(group))
    }

    /// A receiver of every newer state of any product.
    fn subscribe_all(&self) -> Result<broadcast::Receiver<StockSnapshot>, DomainError> {
        let channels = self.channels();
        Ok(channels
            .as_ref()
            .ok_or(DomainError::ShuttingDown)?
            .all
            .subscribe())
    }

    /// The latest known state of every product.
    fn latest_all(&self) -> Vec<StockSnapshot> {
        let channels = self.channels();
        let Some(channels) = channels.as_ref() else {
            return Vec::new();
        };
        channels
            .products
            .values()
            .map(|product| product.latest.clone())
            .collect()
    }
}

/// The stream of a watcher.
pub type SnapshotStream = futures::stream::BoxStream<'static, StockSnapshot>;

impl Checkout {
    /// The current state of each product in `product_ids` (all products, including later
    /// ones, when empty; at most `max_watched_products` ids, each watched once), then every
    /// newer state. Unknown ids fail before anything streams. Streams end when the hub
    /// closes. Watchers in one `group` are woken together.
    pub async fn watch_availability(
        &self,
        mut product_ids: Vec<Uuid>,
        group: WakeGroup,
    ) -> Result<SnapshotStream, DomainError> {
        let max = self.settings.max_watched_products;
        if product_ids.len() > max {
            return Err(DomainError::invalid(
                "product_ids",
                format!("must name at most {max} products"),
            ));
        }
        product_ids.sort_unstable();
        product_ids.dedup();
        let hub = self.availability.clone();
        let open = OpenStream::new(&hub, &product_ids);
        let count = |updates| {
            CountedStream {
                updates,
                _open: open,
            }
            .boxed()
        };
        if product_ids.is_empty() {
            return Ok(count(self.watch_all(hub).await?.boxed()));
        }
        let products = self.get_products(&product_ids).await?;
        let mut streams = Vec::with_capacity(products.len());
        for product in &products {
            streams.push(WatchStream::new(
                hub.subscribe(StockSnapshot::from(product), group)?,
            ));
        }
        // One product (the common case) needs no merging.
        Ok(match streams.pop() {
            Some(only) if streams.is_empty() => count(only.boxed()),
            Some(last) => {
                streams.push(last);
                count(futures::stream::select_all(streams).boxed())
            }
            None => futures::stream::empty().boxed(),
        })
    }

    /// Every product's current state, then every newer state of any product.
    async fn watch_all(
        &self,
        hub: Arc<AvailabilityHub>,
    ) -> Result<impl Stream<Item = StockSnapshot> + Send + 'static + use<>, DomainError> {
        // Subscribe before reading, so no change falls between the read and the stream.
        let mut changes = hub.subscribe_all()?;
        let initial: Vec<StockSnapshot> = self
            .all_products()
            .await?
            .iter()
            .map(StockSnapshot::from)
            .collect();
        for snapshot in &initial {
            hub.publish(snapshot.clone());
        }
        Ok(async_stream::stream! {
            let mut sent: HashMap<Uuid, i64> = HashMap::new();
            for snapshot in initial {
                sent.insert(snapshot.product_id, snapshot.version);
                yield snapshot;
            }
            loop {
                let batch = match changes.recv().await {
                    Ok(snapshot) => vec![snapshot],
                    // Fell behind: skip what was missed and catch up from the latest states.
                    Err(broadcast::error::RecvError::Lagged(_)) => hub.latest_all(),
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                for snapshot in batch {
                    let last = sent.entry(snapshot.product_id).or_insert(i64::MIN);
                    if snapshot.version > *last {
                        *last = snapshot.version;
                        yield snapshot;
                    }
                }
            }
        })
    }
}
