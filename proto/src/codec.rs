//! The codec of every Strata service: prost's, with a check of what a message costs
//! decoded before it is decoded. A message's encoded size is bounded by the receiver's
//! limit, but decoding can multiply it: an empty record is 2 bytes on the wire and
//! about a hundred decoded, so a 33 MiB records-form ProduceRequest could take 1.7 GB.
//! [`DecodeCheck`] refuses such a message from its encoded bytes, before any of it is
//! allocated.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::v1;

/// Most bytes a ProduceRequest may take decoded: its encoded bytes plus its records'
/// and headers' structures. Twice the largest request the broker accepts on the wire
/// (a 32 MiB batch plus 1 MiB), which records of a few dozen bytes or more stay under.
pub const PRODUCE_DECODED_BYTES_MAX: usize = 66 << 20;

/// A check of a message's encoded bytes before it is decoded.
pub trait DecodeCheck {
    /// Refuses `encoded` when decoding it would cost too much; the default accepts all.
    fn check(encoded: &[u8]) -> Result<(), Status> {
        let _ = encoded;
        Ok(())
    }
}

impl DecodeCheck for v1::ProduceRequest {
    fn check(encoded: &[u8]) -> Result<(), Status> {
        // A malformed message is left for prost to report.
        let Some((records, headers)) = produce_counts(encoded) else {
            return Ok(());
        };
        let decoded = encoded.len()
            + records * std::mem::size_of::<v1::Record>()
            + headers * std::mem::size_of::<v1::Header>();
        if decoded > PRODUCE_DECODED_BYTES_MAX {
            return Err(Status::resource_exhausted(format!(
                "the request's {records} records and {headers} headers take {decoded} bytes \
                 decoded, more than {PRODUCE_DECODED_BYTES_MAX}: send fewer records per \
                 request, or an encoded batch (limit produce_decoded_bytes)"
            )));
        }
        Ok(())
    }
}

/// The records (field 4) of an encoded ProduceRequest and their headers (field 3 of a
/// record); `None` if it is not well-formed protobuf.
fn produce_counts(encoded: &[u8]) -> Option<(usize, usize)> {
    let (mut records, mut headers) = (0, 0);
    for_each_field(encoded, |field, body| {
        if field == 4 {
            records += 1;
            for_each_field(body, |field, _| {
                headers += usize::from(field == 3);
                Some(())
            })?;
        }
        Some(())
    })?;
    Some((records, headers))
}

/// Calls `each` with the field number and bytes of every length-delimited field of the
/// message `buf`, skipping the others; `None` if `buf` is malformed or `each` says so.
fn for_each_field(mut buf: &[u8], mut each: impl FnMut(u64, &[u8]) -> Option<()>) -> Option<()> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut buf)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let body = buf.get(..len)?;
                each(key >> 3, body)?;
                len
            }
            _ => return None,
        };
        buf = buf.get(skip..)?;
    }
    Some(())
}

/// Reads a varint off the front of `buf`.
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// prost's codec, whose decoder runs [`DecodeCheck`] first.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + DecodeCheck + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder {
            inner: self.inner.decoder(),
            _message: PhantomData,
        }
    }
}

/// prost's decoder after [`DecodeCheck`].
#[derive(Debug)]
pub struct CheckedDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default + DecodeCheck> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over the whole message in one contiguous buffer.
        U::check(prost::bytes::Buf::chunk(buf))?;
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(records: Vec<v1::Record>) -> Vec<u8> {
        v1::ProduceRequest {
            topic: "t".into(),
            records,
            batch: vec![1, 2, 3].into(),
            acks: 1,
            target: Some(v1::produce_request::Target::Partition(7)),
        }
        .encode_to_vec()
    }

    #[test]
    fn records_and_headers_are_counted_from_the_encoded_request() {
        let header = v1::Header {
            key: "k".into(),
            value: vec![1].into(),
        };
        let records = vec![
            v1::Record {
                headers: vec![header.clone(); 3],
                timestamp_ms: -5,
                ..Default::default()
            },
            v1::Record::default(),
        ];
        assert_eq!(produce_counts(&request(records)), Some((2, 3)));
        assert_eq!(produce_counts(&request(Vec::new())), Some((0, 0)));
        assert_eq!(produce_counts(&[0x22, 0x05, 0x00]), None, "cut short");
    }

    #[test]
    fn a_request_of_millions_of_empty_records_is_refused_before_decoding() {
        let many = request(vec![v1::Record::default(); 2_000_000]);
        assert!(many.len() < 5 << 20);
        let refused = v1::ProduceRequest::check(&many).expect_err("too costly");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("produce_decoded_bytes"));
        let fine = request(vec![
            v1::Record {
                value: Some(vec![0; 1000].into()),
                ..Default::default()
            };
            1000
        ]);
        assert!(v1::ProduceRequest::check(&fine).is_ok());
    }
}
