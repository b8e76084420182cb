//! The gRPC codec: prost encoding without buffers allocated up front.
//!
//! tonic allocates an encode and a decode buffer per stream when the stream starts
//! (8 KiB each by default). kas holds several idle streams per connected agent, so that
//! default dominated its memory per agent. Here buffers are allocated when a message
//! is encoded or arrives, as large as it needs.

use bytes::Buf;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Initial buffer per stream and direction: none.
const INITIAL_BUFFER: usize = 0;
/// Encoded bytes gathered before they are handed to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// Prost messages, with no buffer allocated before the first message.
#[derive(Debug)]
pub struct KasCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for KasCodec<T, U> {
    fn default() -> Self {
        KasCodec(PhantomData)
    }
}

impl<T, U> Codec for KasCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = KasEncoder<T>;
    type Decoder = KasDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        KasEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        KasDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct KasEncoder<T>(PhantomData<T>);

impl<T: prost::Message> Encoder for KasEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // Room for the whole message first; `encode_raw` then writes it without
        // `encode`'s second walk over the message to check that room (the buffer is
        // a `BytesMut`, which grows on its own anyway, so it cannot run short).
        dst.reserve(item.encoded_len());
        item.encode_raw(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

#[derive(Debug)]
pub struct KasDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for KasDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let msg = U::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| Status::internal(format!("decoding failed: {e}")))?;
        Ok(Some(msg))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
