//! `chunk::open_upload_frame`: upload parts as the platform reads them from an operator's
//! upload topic. Raw bytes must never pass the MAC; bytes framed and MAC'd with the test secret
//! must open to exactly what was framed.

use fleetcast_proto::chunk::{
    decode_frame, encode_upload_frame, open_upload_frame, FrameHeader, FrameType,
};

use crate::family::secret;
use crate::samples::artifact;
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    // A fuzzer cannot forge the MAC.
    assert!(open_upload_frame(secret(), data).is_err());
    // The same bytes as a frame: MAC'd by the operator, opened by the platform.
    let Ok((header, payload)) = decode_frame(data) else {
        return Verdict::Rejected;
    };
    let framed = encode_upload_frame(secret(), &header, payload);
    match open_upload_frame(secret(), &framed) {
        Ok((h, p)) => {
            assert_eq!(h.frame_type, FrameType::UploadPart);
            assert_eq!((h, p), (header, payload));
            Verdict::Accepted
        }
        Err(_) => {
            assert_ne!(header.frame_type, FrameType::UploadPart);
            Verdict::Rejected
        }
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let header = |index, total| FrameHeader {
        frame_type: FrameType::UploadPart,
        artifact: artifact(),
        index,
        total,
    };
    vec![
        fleetcast_proto::chunk::encode_frame(&header(0, 3), &[1; 64]),
        fleetcast_proto::chunk::encode_frame(&header(2, 3), &[]),
    ]
}
