//! Config parsing and validation never panic, whatever the bytes; whatever validates
//! also renders for both backends, and every rejection can be displayed. The fast path
//! for the common shape reads every document exactly as the general path does. The check
//! itself is `ip_masq_agent::fuzzing::config_input`, which the test suite also runs over
//! this target's seeds and corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ip_masq_agent::fuzzing::config_input(data);
});
