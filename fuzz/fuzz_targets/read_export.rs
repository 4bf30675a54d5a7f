//! Reading and authenticating an export file never panics, and inserting
//! what passes into a fresh state never panics either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weftlog_proto::exchange::{authenticate, read_export};
use weftlog_proto::State;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut items) = read_export(data) {
        if authenticate(&mut items).is_ok() {
            let mut state = State::new();
            for item in &items {
                let _ = state.insert(&item.event, item.id);
            }
            let _ = state.state_hash();
        }
    }
});
