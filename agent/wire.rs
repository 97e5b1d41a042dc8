//! The gRPC codec of every Outpost service: prost's, plus a bound on what
//! one message may make the receiver allocate.
//!
//! A byte limit alone does not bound memory: an empty `Event` is 2 bytes on
//! the wire and a few hundred in memory, so 16 MiB of them decode to
//! gigabytes. Before a bounded message type is decoded, its wire bytes are
//! walked with the schema (the crate's own descriptor set) and the nested
//! messages counted; above the limit the message is refused with
//! `InvalidArgument` without decoding it. The walk costs one pass over bytes
//! the transport has already buffered.

use std::marker::PhantomData;
use std::sync::OnceLock;

use prost::bytes::Buf;
use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The encoded descriptors of `proto/outpost/v1` (also served by gRPC
/// reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("outpost_descriptor");

/// Events one batch may carry; agents send at most `report.batch_max_events`
/// (1,000 by default, at most this many).
pub const MAX_EVENTS_PER_BATCH: usize = 10_000;

/// Bytes one message may have on the wire, in either direction of the
/// delivery stream.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Nested messages one agent message may hold: events, and what each event
/// holds (statuses, latency summaries, findings, hash groups). A batch of
/// 1,000 status events holds about 30,000; at a few hundred bytes each in
/// memory, the limit keeps one decoded message under about 100 MB.
pub const MAX_AGENT_MESSAGE_ELEMENTS: u64 = 250_000;

/// Message types a peer streams in quantity, and their element limits.
/// Other types (operator requests, the aggregator's answers) are small or
/// come from a trusted side, and are bounded by the byte limits alone.
const BOUNDED: &[(&str, u64)] = &[("outpost.v1.AgentMessage", MAX_AGENT_MESSAGE_ELEMENTS)];

/// Deepest nesting the walk follows; the schema's deepest is 5.
const MAX_DEPTH: u32 = 16;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the build writes a valid descriptor set")
    })
}

/// How many nested messages an encoded `AgentMessage` holds (at most one
/// past the limit), or why it cannot be read.
pub fn agent_message_elements(bytes: &[u8]) -> Result<u64, String> {
    let desc = pool()
        .get_message_by_name("outpost.v1.AgentMessage")
        .ok_or("the descriptor set lacks AgentMessage")?;
    count_elements(&desc, bytes, MAX_AGENT_MESSAGE_ELEMENTS)
}

/// How many nested messages `bytes`, an encoded `desc`, holds, or why it
/// cannot be read. Stops counting past `limit`.
pub fn count_elements(desc: &MessageDescriptor, bytes: &[u8], limit: u64) -> Result<u64, String> {
    let mut count = 0;
    walk(desc, bytes, 0, limit, &mut count)?;
    Ok(count)
}

fn walk(
    desc: &MessageDescriptor,
    mut bytes: &[u8],
    depth: u32,
    limit: u64,
    count: &mut u64,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("messages nested deeper than {MAX_DEPTH}"));
    }
    while !bytes.is_empty() {
        let key = prost::encoding::decode_varint(&mut bytes).map_err(|e| e.to_string())?;
        let (number, wire_type) = ((key >> 3) as u32, key & 7);
        match wire_type {
            0 => {
                prost::encoding::decode_varint(&mut bytes).map_err(|e| e.to_string())?;
            }
            1 => skip(&mut bytes, 8)?,
            5 => skip(&mut bytes, 4)?,
            2 => {
                let len = prost::encoding::decode_varint(&mut bytes).map_err(|e| e.to_string())?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| *l <= bytes.len())
                    .ok_or("a length past the end of the message")?;
                let (inner, rest) = bytes.split_at(len);
                bytes = rest;
                let sub = desc.get_field(number).and_then(|f| match f.kind() {
                    Kind::Message(m) => Some(m),
                    _ => None,
                });
                if let Some(sub) = sub {
                    *count += 1;
                    if *count > limit {
                        return Ok(());
                    }
                    walk(&sub, inner, depth + 1, limit, count)?;
                    if *count > limit {
                        return Ok(());
                    }
                }
            }
            other => return Err(format!("wire type {other} is not one prost writes")),
        }
    }
    Ok(())
}

fn skip(bytes: &mut &[u8], n: usize) -> Result<(), String> {
    if bytes.len() < n {
        return Err("a field past the end of the message".into());
    }
    *bytes = &bytes[n..];
    Ok(())
}

/// The leading events of `events` that fit in one batch of at most
/// `max_bytes` encoded bytes; at least one, so that an event larger than
/// the bound still goes (alone).
pub fn fitting(events: &[crate::proto::Event], max_bytes: usize) -> usize {
    use prost::Message;
    let mut bytes = 0;
    for (i, e) in events.iter().enumerate() {
        let len = e.encoded_len();
        // The field's tag and length prefix, as the batch encodes it.
        bytes += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if bytes > max_bytes {
            return i.max(1);
        }
    }
    events.len()
}

/// prost's codec with the element bound on `BOUNDED` types.
pub struct BoundedCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + prost::Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        let name = U::full_name();
        let bound = BOUNDED
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(n, limit)| Some((pool().get_message_by_name(n)?, *limit)));
        BoundedDecoder {
            inner: self.inner.decoder(),
            bound,
            _pd: PhantomData,
        }
    }
}

pub struct BoundedDecoder<U> {
    inner: ProstDecoder<U>,
    bound: Option<(MessageDescriptor, u64)>,
    _pd: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if let Some((desc, limit)) = &self.bound {
            // The transport hands over the whole message in one buffer.
            let bytes = buf.chunk();
            if bytes.len() != buf.remaining() {
                return Err(Status::internal("message not in one buffer"));
            }
            let n = count_elements(desc, bytes, *limit)
                .map_err(|e| Status::invalid_argument(format!("unreadable message: {e}")))?;
            if n > *limit {
                return Err(Status::invalid_argument(format!(
                    "message refused: it holds more than {limit} nested messages (events and their parts), the limit per message; send smaller batches"
                )));
            }
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{agent_message, event, AgentMessage, Batch, Event, Header};
    use prost::Message;

    fn agent_message_desc() -> MessageDescriptor {
        pool()
            .get_message_by_name("outpost.v1.AgentMessage")
            .unwrap()
    }

    fn batch(events: Vec<Event>) -> Vec<u8> {
        AgentMessage {
            body: Some(agent_message::Body::Batch(Batch { events, pending: 0 })),
        }
        .encode_to_vec()
    }

    #[test]
    fn a_batch_takes_the_events_that_fit_its_bytes() {
        let header = |i| Event {
            seq: i,
            kind: Some(event::Kind::Header(Header {
                height: i,
                hash: vec![1; 32],
                parent_hash: vec![2; 32],
                ..Default::default()
            })),
            ..Default::default()
        };
        let events: Vec<Event> = (1..=500).map(header).collect();
        for max in [1024, 8 << 10, 30_000] {
            let n = fitting(&events, max);
            let encoded = |n: usize| batch(events[..n].to_vec()).len();
            // Within the bound, and one more event would not be: the batch
            // and its envelope add a few bytes to the events'.
            assert!(
                encoded(n) <= max + 16,
                "{max}: {n} events are {} bytes",
                encoded(n)
            );
            assert!(encoded(n + 1) > max, "{max}: {} events would fit", n + 1);
        }
        assert_eq!(fitting(&events[..3], 1 << 20), 3);
        // One event larger than the bound still goes, alone.
        let mut big = header(1);
        big.kind = Some(event::Kind::Header(Header {
            hash: vec![1; 4096],
            ..Default::default()
        }));
        assert_eq!(fitting(&[big.clone(), header(2)], 1024), 1);
        assert_eq!(fitting(&[], 1024), 0);
    }

    #[test]
    fn counts_events_and_what_they_hold() {
        let header = |i| Event {
            seq: i,
            kind: Some(event::Kind::Header(Header {
                height: i,
                hash: vec![1; 32],
                ..Default::default()
            })),
            ..Default::default()
        };
        // The batch, 10 events and their 10 headers.
        let bytes = batch((1..=10).map(header).collect());
        assert_eq!(count_elements(&agent_message_desc(), &bytes, 1000), Ok(21));
    }

    #[test]
    fn a_message_of_empty_events_is_refused_before_it_is_decoded() {
        // 2 bytes each on the wire; decoded, a few hundred each.
        let bytes = batch(vec![Event::default(); 300_000]);
        assert!(bytes.len() < 1 << 20);
        let n = count_elements(&agent_message_desc(), &bytes, MAX_AGENT_MESSAGE_ELEMENTS).unwrap();
        assert!(n > MAX_AGENT_MESSAGE_ELEMENTS);
    }

    #[test]
    fn truncated_and_deep_messages_are_errors_not_panics() {
        let mut bytes = batch(vec![Event::default(); 3]);
        bytes.truncate(bytes.len() - 1);
        bytes[1] = 0xff; // a length past the end
        assert!(count_elements(&agent_message_desc(), &bytes, 100).is_err());
        assert!(count_elements(&agent_message_desc(), &[0x0f], 100).is_err());
    }
}
