//! Fuzzes the resource parser: any bytes a user or a REST client can send must produce
//! resources or a clear error, never a panic, and accepted resources must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(docs) = weft_api::parse::parse_documents(text) {
        for doc in docs {
            let json = doc.resource.to_universal(None).to_string();
            let again = weft_api::parse::parse_documents(&json).expect("stored form must parse");
            assert_eq!(again[0].resource, doc.resource);
        }
    }
});
