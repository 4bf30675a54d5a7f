//! Event decoding never panics, and what it accepts re-encodes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weftlog_proto::Event;

fuzz_target!(|data: &[u8]| {
    if let Ok((event, id)) = Event::decode(data) {
        let (bytes, id2) = event.seal();
        assert_eq!(bytes, data);
        assert_eq!(id, id2);
        event.check().expect("decoded events pass their checks");
    }
});
