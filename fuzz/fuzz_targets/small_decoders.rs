//! Fuzz target: the small decoders of untrusted bytes must never panic.
//!
//! The first input byte picks the decoder: a heartbeat packet (from the
//! network, checked against a fixed secret), a minifilter message (from the
//! kernel driver), an admin request (from the `safekit` command), or a
//! persisted module state (from disk, possibly torn by a crash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use safekit_core::cluster::generations::Persistent;
use safekit_protocol::{admin, heartbeat, minifilter};

fuzz_target!(|data: &[u8]| {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            let _ = heartbeat::decode(b"fuzz-secret", rest);
        }
        1 => {
            let _ = minifilter::Message::decode(rest);
        }
        2 => {
            let _ = admin::decode::<admin::AdminRequest>(rest);
        }
        _ => {
            if let Ok(state) = Persistent::decode(rest) {
                let again = Persistent::decode(&state.encode()).expect("re-encoded state decodes");
                assert_eq!(again, state, "persisted state round-trips");
            }
        }
    }
});
