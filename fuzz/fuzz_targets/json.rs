//! `protocol::json` both ways.
//!
//! Input: a client's JSON text. Checked: `frame_from_json` never panics; what it accepts is
//! one whole frame with a valid header, and when its payload validates, its JSON form
//! translates back to the same bytes. The same bytes as a node frame go through
//! `frame_to_json`, which refuses or translates them without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::protocol::json::{frame_from_json, frame_to_json};
use tern::protocol::read_header;

fuzz_target!(|data: &[u8]| {
    let mut frame = Vec::new();
    if let Ok(header) = frame_from_json(data, &mut frame) {
        assert_eq!(read_header(&frame).expect("a valid header"), header);
        let mut text = String::new();
        if frame_to_json(&frame, &mut text).is_ok() {
            let mut again = Vec::new();
            frame_from_json(text.as_bytes(), &mut again).expect("its own JSON translates");
            assert_eq!(again, frame);
        }
    } else {
        assert!(frame.is_empty());
    }
    let _ = frame_to_json(data, &mut String::new());
});
