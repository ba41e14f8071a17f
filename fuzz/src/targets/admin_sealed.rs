//! What the operator CLI reads on its response topic: a `ResponseEnvelope` (plain JSON), whose
//! `sealed` box is opened with the operator's secret for its client id. Raw bytes go through the
//! envelope parser and `open_box`; structure-aware inputs are sealed with the test secret first,
//! so the code behind the AEAD check is reached too.

use fleetcast_proto::admin::{AdminResponse, ResponseEnvelope};
use fleetcast_proto::auth::Purpose;

use crate::family::{round_trip, secret};
use crate::samples::{admin_responses, json};
use crate::Verdict;

const CLIENT: &str = "fleetcast-op-admin.1a2b3c4d";

pub fn run(data: &[u8]) -> Verdict {
    // Raw bytes as the envelope the CLI parses, and its box opened as the CLI does.
    let raw = match serde_json::from_slice::<ResponseEnvelope>(data) {
        Ok(env) => {
            if let Some(sealed) = &env.sealed {
                // Only a box really sealed for this client opens (the seed); what opens is a
                // well-formed response.
                if let Ok(resp) =
                    secret().open_box::<AdminResponse>(Purpose::AdminResponse, CLIENT, sealed)
                {
                    round_trip(&resp);
                }
            }
            Verdict::Accepted
        }
        Err(_) => Verdict::Rejected,
    };
    // The same bytes as a response body, sealed for the CLI and opened again.
    let body = match serde_json::from_slice::<AdminResponse>(data) {
        Ok(resp) => {
            let sealed = secret().seal_box(Purpose::AdminResponse, CLIENT, &resp);
            let back: AdminResponse = secret()
                .open_box(Purpose::AdminResponse, CLIENT, &sealed)
                .expect("a box opens with the secret and context it was sealed for");
            assert_eq!(back, resp);
            assert!(secret()
                .open_box::<AdminResponse>(Purpose::AdminResponse, "fleetcast-op-other", &sealed)
                .is_err());
            round_trip(&resp);
            Verdict::Accepted
        }
        Err(_) => Verdict::Rejected,
    };
    raw.or(body)
}

pub fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = admin_responses().iter().map(json).collect();
    out.push(json(&ResponseEnvelope {
        id: 3,
        sealed: Some(secret().seal_box(Purpose::AdminResponse, CLIENT, &admin_responses()[0])),
        unverified_error: None,
    }));
    out.push(json(&ResponseEnvelope {
        id: 4,
        sealed: None,
        unverified_error: Some("request refused: bad MAC (wrong operator secret?)".into()),
    }));
    out
}
