#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| planner_fuzz::rule_parser(data));
