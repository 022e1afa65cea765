#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| planner_fuzz::wire_report(data));
