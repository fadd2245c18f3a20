//! The TOML config loader: parse, deserialize, validate, and render errors
//! with line and column. A `[tls]` section makes validation read the named
//! files; fuzzed paths do not exist, which is just another error.
#![no_main]

use herdgate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match Config::from_toml_str(text) {
        // What validation let through, the accessors must accept ("validated").
        Ok(c) => {
            let _ = c.listen_addr();
            let _ = c.admin_addr();
            assert!(c.worker_count() >= 1);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
