#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    paqet::wire::envelope::fuzz_parse(data);
});
