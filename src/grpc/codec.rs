//! The protobuf codec of every service, with small per-call buffers. tonic allocates the
//! encode buffer eagerly for each call (8 KiB by default); our messages are a few hundred
//! bytes, and ten thousand open WatchAvailability streams would otherwise pin 80 MiB of
//! buffers. Buffers still grow on demand for large messages (a full ListProducts page).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial encode/decode buffer per call.
const BUFFER_SIZE: usize = 512;
/// How much a stream batches into one write before yielding (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with [`BUFFER_SIZE`] buffers; named by `build.rs` as the codec of the generated code.
#[derive(Debug, Clone)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
