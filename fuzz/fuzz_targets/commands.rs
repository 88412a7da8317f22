//! The client command decoder: any text (the frame layer has checked it is UTF-8) decodes to
//! a command or to a documented error, never a panic. A command with an id keeps that id;
//! an error that can be answered names the id the message carried; and a message decodes
//! the same way every time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecast::wire::command::{decode, ProtocolError};

/// The message's `id`, when it is a JSON object whose id is a non-negative integer.
fn id_of(text: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value.as_object()?.get("id")?.as_u64()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = decode(text.as_bytes());
    // Where serde_json reads the whole message as a value (it refuses some that decode
    // reads field by field, such as a lone surrogate escaped in another field), the id
    // decode answers with is that value's id.
    let id = id_of(text);
    match &first {
        Ok(request) => {
            if let (Some(got), Some(_)) = (request.id, id) {
                assert_eq!(Some(got), id, "{text}");
            }
        }
        Err(ProtocolError::BadCommand { id: got, message }) => {
            if id.is_some() {
                assert_eq!(Some(*got), id, "{text}");
            }
            assert!(!message.is_empty());
        }
        Err(ProtocolError::Unanswerable(_)) => {}
    }
    let again = decode(text.as_bytes());
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
});
