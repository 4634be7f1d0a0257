//! Fuzzes protocol detection: whatever a client sends first, classification never panics,
//! always decides on complete input, and does not change its mind as more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proxy::detect::classify;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(weft_proxy::detect::DETECT_BUFFER_SIZE)];
    let whole = classify(data, true).expect("complete input is always classified");
    for cut in 0..=data.len() {
        if let Some(early) = classify(&data[..cut], false) {
            assert_eq!(early, classify(data, false).unwrap_or(whole), "changed its mind at {cut}");
        }
    }
});
