//! Fuzz target: the replication frame decoder must never panic, whatever the peer sends.
//!
//! Two passes per input. First the raw bytes go through the incremental
//! decoder (split in two pieces at a position taken from the first byte).
//! Random bytes almost never carry a valid CRC-32C, so the second pass frames
//! the input as a correctly checksummed body of the kind named by the first
//! byte: this reaches the body decoders and the path validation. Every decoded
//! frame is re-encoded and decoded again to check that encode/decode agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safekit_protocol::frame::{Frame, FrameDecoder, Kind, encode, encode_raw};

const KINDS: [Kind; 11] = [
    Kind::Hello,
    Kind::Challenge,
    Kind::Proof,
    Kind::Welcome,
    Kind::Refused,
    Kind::Op,
    Kind::Ack,
    Kind::ApplyFailed,
    Kind::Ping,
    Kind::Pong,
    Kind::Bye,
];

fn decode_all(pieces: &[&[u8]]) -> Vec<Frame> {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    for piece in pieces {
        decoder.push(piece);
        while let Ok(Some(frame)) = decoder.next_frame() {
            frames.push(frame);
        }
    }
    frames
}

fn check_round_trip(frames: Vec<Frame>) {
    for frame in frames {
        let bytes = encode(frame.seq, &frame.message).expect("a decoded message re-encodes");
        let mut again = FrameDecoder::new();
        again.push(&bytes);
        let decoded = again
            .next_frame()
            .expect("a re-encoded frame decodes")
            .expect("complete frame");
        assert_eq!(decoded, frame);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(first).min(data.len());
    check_round_trip(decode_all(&[&data[..split], &data[split..]]));

    let kind = KINDS[usize::from(first) % KINDS.len()];
    let framed = encode_raw(kind, u64::from(first), rest.to_vec()).expect("input is small");
    check_round_trip(decode_all(&[&framed]));
});
