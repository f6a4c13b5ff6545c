//! Keystone and Heat reply bodies of arbitrary bytes, through what the Heat provider does
//! with them: a token reply (`TokenReply::parse`, its lifetime, the endpoint picked by
//! interface and region), a stack reply (`StackReply::from_body` → status, outputs →
//! `StackOutputs::from_raw`), a stack list (`stack_in_list`) and an error reply
//! (`message`). The bodies are decoded as the client decodes them (lossy UTF-8).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use stateshift::stack::heat::{
    message, parse_outputs, stack_in_list, status_of, StackReply, TokenReply,
};
use stateshift::stack::StackOutputs;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(t) = TokenReply::parse(&text, now) {
        let _ = (&t.project_id, t.lifetime, t.expires_at.len());
        for (interface, region) in [("public", None), ("internal", Some("RegionOne"))] {
            match t.endpoint("orchestration", interface, region) {
                Ok(url) => assert!(!url.ends_with('/')),
                Err(msg) => assert!(msg.contains("orchestration")),
            }
        }
    }
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if let Some(reply) = StackReply::from_body(&body) {
        let _ = status_of(&reply.status, &reply.reason);
        let (raw, errors) = parse_outputs(reply.outputs);
        assert!(errors.keys().all(|k| raw.contains_key(k)));
        match StackOutputs::from_raw("s", raw) {
            Ok(o) => assert!(!o.ssh_host.is_empty()),
            Err(e) => drop(e.to_string()),
        }
    }
    if let Some(s) = stack_in_list(&body, "s") {
        assert_eq!(s.name, "s");
    }
    let m = message(&text);
    assert!(m.len() <= 400 + '…'.len_utf8() || body != Value::Null);
});
