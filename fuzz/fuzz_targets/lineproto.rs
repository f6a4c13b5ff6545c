//! A forwarded write as the capture receiver sees it: a body of arbitrary bytes and an
//! arbitrary `precision` query parameter. The receiver rejects a non-UTF-8 body, counts
//! its points (`lineproto::count_points`) and, on the target after cutover, keys every
//! point (`KeySet::for_each_key` → `point_key`). None of it may panic, and a body never
//! yields more keys than points.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stateshift::influx::lineproto::count_points;
use stateshift::migrate::capture::KeySet;

const PRECISIONS: [&str; 10] = ["", "n", "ns", "u", "us", "ms", "s", "m", "h", "x"];

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks the precision: high bit set → one of the known spellings (and one
    // wrong one), else the next (byte 0 & 0x0f) bytes, whatever they are.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (precision, body) = if sel & 0x80 != 0 {
        (
            PRECISIONS[usize::from(sel) % PRECISIONS.len()].to_string(),
            rest,
        )
    } else {
        let n = usize::from(sel & 0x0f).min(rest.len());
        (String::from_utf8_lossy(&rest[..n]).into_owned(), &rest[n..])
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return; // the receiver answers 400
    };
    let points = count_points(text);
    let mut set = KeySet::with_cap(64);
    let mut keys = 0usize;
    let known = KeySet::for_each_key(text, &precision, |k| {
        keys += 1;
        set.arrived(k);
    });
    assert!(known || keys == 0, "an unknown precision keyed points");
    assert!(
        keys <= points,
        "{keys} keys but {points} points in {text:?}"
    );
    if keys > 0 {
        assert!(set.overflowed || !set.arrivals.is_empty());
    }
});
