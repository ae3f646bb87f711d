//! Fuzz target: the small decoders of untrusted bytes must never panic.
//!
//! The first input byte picks the decoder: a heartbeat packet (from the
//! network, checked against a fixed secret), a minifilter message (from the
//! kernel driver), an admin request (from the `safekit` command), a
//! persisted module state (from disk, possibly torn by a crash), or a
//! message of the remote admin channel (`safekit -H`, from the network).
#![no_main]

use libfuzzer_sys::fuzz_target;
use safekit_core::cluster::generations::Persistent;
use safekit_protocol::{admin, admin_remote, heartbeat, minifilter};

fuzz_target!(|data: &[u8]| {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 5 {
        0 => {
            let _ = heartbeat::decode(b"fuzz-secret", rest);
        }
        1 => {
            let _ = minifilter::Message::decode(rest);
        }
        2 => {
            let _ = admin::decode::<admin::AdminRequest>(rest);
        }
        4 => {
            if let Ok(signed) = admin_remote::decode_signed_request(rest) {
                let _ = signed.open(b"fuzz-secret");
            }
            let _ = admin_remote::decode_nonce_grant(rest);
            let _ = admin_remote::open_reply(b"fuzz-secret", &[1; 32], &[2; 32], rest);
        }
        _ => {
            if let Ok(state) = Persistent::decode(rest) {
                let again = Persistent::decode(&state.encode()).expect("re-encoded state decodes");
                assert_eq!(again, state, "persisted state round-trips");
            }
        }
    }
});
