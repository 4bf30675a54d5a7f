//! Opening a log over arbitrary segment bytes never panics: it recovers or
//! refuses, and a recovered log reopens clean with the same records.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weftlog_proto::log::{header, Log, MemStorage, Storage, SEGMENT_MAGIC};

fuzz_target!(|data: &[u8]| {
    let mut storage = MemStorage::new();
    storage.create(0).unwrap();
    // Half the inputs get a valid header, so the frame parser is reached.
    let mut bytes = Vec::new();
    if data.first().is_some_and(|b| b & 1 == 1) {
        bytes.extend_from_slice(&header(SEGMENT_MAGIC));
        bytes.extend_from_slice(&data[1..]);
    } else {
        bytes.extend_from_slice(data);
    }
    storage.write_at(0, 0, &bytes).unwrap();
    storage.sync_data(0).unwrap();
    let mut first = Vec::new();
    let Ok((log, _)) = Log::open(storage, |f| {
        first.push(f.id);
        Ok(())
    }) else {
        return;
    };
    let mut again = Vec::new();
    let (_, recovery) = Log::open(log.into_storage(), |f| {
        again.push(f.id);
        Ok(())
    })
    .expect("a recovered log reopens");
    assert!(recovery.torn.is_none(), "second open found a torn tail");
    assert_eq!(first, again);
});
