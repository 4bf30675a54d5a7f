//! A sync session fed arbitrary bytes as peer messages never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weftlog_proto::sync::{decode_message, MemStore, Session, SessionConfig};
use weftlog_proto::Keypair;

fuzz_target!(|data: &[u8]| {
    let _ = decode_message(data);
    let node = Keypair::from_secret([3; 32]).node_id();
    let mut store = MemStore::new();
    let mut session = Session::new(SessionConfig::new([0x42; 32], node), &store);
    while session.poll_transmit(&store).is_some() {}
    // Split the input into messages at a 0xff 0xfe marker.
    for chunk in data.split(|&b| b == 0xfe) {
        let _ = session.handle_message(chunk, &mut store);
        while session.poll_transmit(&store).is_some() {}
        while session.poll_event().is_some() {}
    }
});
