#![no_main]
use libfuzzer_sys::fuzz_target;

// Arbitrary bytes into the noise-wire codec, the responder (server) and the initiator (client), raw and with
// a valid mac1 patched in so that snow's handshake decoder is reached too.
fuzz_target!(|data: &[u8]| {
    paqet::proto::noise::fuzz_decode(data);
});
