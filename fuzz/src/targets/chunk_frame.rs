//! `chunk::decode_frame` on raw bytes, as machines read chunk topics and the platform reads
//! uploads. Frames are not authenticated: anything can arrive here.

use fleetcast_proto::chunk::{decode_frame, encode_frame, FrameHeader, FrameType};

use crate::samples::artifact;
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let Ok((header, payload)) = decode_frame(data) else {
        return Verdict::Rejected;
    };
    assert!(header.frame_type == FrameType::Error || header.index < header.total);
    // Encoding what was decoded gives the same bytes, but for the reserved ones (not checked).
    let again = encode_frame(&header, payload);
    assert_eq!(again.len(), data.len());
    assert_eq!((&again[..5], &again[8..]), (&data[..5], &data[8..]));
    Verdict::Accepted
}

pub fn seeds() -> Vec<Vec<u8>> {
    let frame = |frame_type, index, total, payload: &[u8]| {
        encode_frame(
            &FrameHeader {
                frame_type,
                artifact: artifact(),
                index,
                total,
            },
            payload,
        )
    };
    vec![
        frame(FrameType::Chunk, 2, 6, &[0xa5; 100]),
        frame(FrameType::Manifest, 0, 1, &[7; 6 * 32]),
        frame(FrameType::Error, 0, 0, b"unknown artifact"),
        frame(FrameType::UploadPart, 5, 6, &[]),
    ]
}
