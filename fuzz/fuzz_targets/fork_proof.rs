//! Decoding a fork proof and verifying what decodes never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weftlog_proto::fork_proof::ForkProof;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = ForkProof::decode(data) {
        let _ = p.verify();
        let _ = ForkProof::from_json(&p.to_json());
    }
});
