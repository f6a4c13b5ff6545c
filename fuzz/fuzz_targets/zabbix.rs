//! A Zabbix JSON-RPC answer body of arbitrary bytes, through everything the client does
//! with one: the envelope (`decode_answer`), then the result as hosts, items and history
//! rows of both numeric types (strict numbers, nanoseconds, delays), and the version
//! string of `apiinfo.version`. Errors are values; their messages must format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stateshift::monitor::zabbix::{
    decode_answer, decode_history, decode_host_ids, decode_items, ApiVersion, ValueType,
};

const URL: &str = "http://zabbix.fuzz/api_jsonrpc.php";

fuzz_target!(|data: &[u8]| {
    let answer = match decode_answer(URL, "item.get", data) {
        Ok(a) => a,
        Err(e) => {
            let _ = (e.to_string(), e.is_transient());
            return;
        }
    };
    let result = match answer {
        Ok(v) => v,
        Err((_code, message, data)) => {
            let _ = (message, data);
            return;
        }
    };
    if let Some(s) = result.as_str() {
        if let Some(v) = ApiVersion::parse(s) {
            let _ = v.to_string();
        }
    }
    match decode_host_ids(URL, result.clone()) {
        Ok(ids) => drop(ids),
        Err(e) => drop(e.to_string()),
    }
    match decode_items(URL, result.clone()) {
        Ok(items) => {
            for i in items {
                if let Some(d) = i.delay {
                    assert!(!d.is_zero());
                }
                if let Some(v) = i.last_value {
                    assert!(v.is_finite());
                }
            }
        }
        Err(e) => drop(e.to_string()),
    }
    for vt in [ValueType::Float, ValueType::Unsigned, ValueType::Other(4)] {
        match decode_history(URL, result.clone(), vt) {
            Ok(samples) => {
                assert!(samples.windows(2).all(|w| w[0].clock >= w[1].clock));
                assert!(samples.iter().all(|s| s.value.is_finite()));
            }
            Err(e) => drop(e.to_string()),
        }
    }
});
