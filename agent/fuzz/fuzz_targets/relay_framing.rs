//! Fuzz the relay's framer and classifier.
//!
//! Properties: the frames' bytes concatenate to exactly the input, whatever
//! the read sizes and parse limit; a parsed line is within the limit and holds
//! no inner `\n`; the classifier, its lenient second try, the streaming response scan and
//! the result readers never panic, and the scan finds every response the
//! classifier finds.
//!
//! The two modules are compiled from the agent's own source files rather than
//! through the `mcp-warden` crate, whose build pulls in aya and the eBPF
//! programs; they depend only on serde, serde_json, sha2 and hex.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/relay/framing.rs"]
mod framing;
#[allow(dead_code)]
#[path = "../../src/relay/jsonrpc.rs"]
mod jsonrpc;

use framing::{Frame, Framer};
use jsonrpc::{Classified, Message, ResponseBody};

const LIMITS: [usize; 5] = [0, 1, 16, 256, framing::DEFAULT_PARSE_LIMIT];

fn classify_all(line: &[u8]) {
    // The streaming reader used for lines over the limit, in odd pieces.
    let mut scan = jsonrpc::LineScan::new();
    for piece in line.chunks(5) {
        scan.push(piece);
    }
    let scanned = scan.response();
    if let Classified::Single(Message::Response { id: Some(_), .. }) = jsonrpc::classify(line) {
        // A response the classifier reads, the scan reads too.
        assert!(scanned.is_some(), "scan missed a response");
    }

    let msgs = match jsonrpc::classify(line) {
        Classified::Single(m) => vec![m],
        Classified::Batch(ms) => ms,
        Classified::NotMcp => {
            // The relay's second try; the copy must not grow a newline.
            if let Some(copy) = jsonrpc::lenient_copy(line) {
                assert_eq!(
                    copy.iter().filter(|&&b| b == b'\n').count(),
                    line.iter().filter(|&&b| b == b'\n').count()
                );
                let _ = jsonrpc::classify(&copy);
            }
            return;
        }
    };
    for m in msgs {
        if let Message::Response {
            body: ResponseBody::Result(r),
            ..
        } = m
        {
            let _ = jsonrpc::call_result(r);
            let _ = jsonrpc::task_result(r);
            let _ = jsonrpc::server_hello(r);
            let _ = jsonrpc::tool_annotations(r);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (knobs, input) = match data.split_first() {
        Some((k, rest)) => (*k, rest),
        None => (0, data),
    };
    let chunk = usize::from(knobs & 0x0f) * 3 + 1;
    let limit = LIMITS[usize::from(knobs >> 4) % LIMITS.len()];

    let mut framer = Framer::new(limit);
    let mut out = Vec::with_capacity(input.len());
    let take = |frame: Frame<'_>, out: &mut Vec<u8>| {
        out.extend_from_slice(frame.bytes());
        if let Frame::Line(line) = frame {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            assert!(body.len() <= limit, "parsed line over the limit");
            assert!(!body.contains(&b'\n'), "newline inside a line");
            classify_all(line);
        }
    };
    for piece in input.chunks(chunk) {
        framer.feed(piece);
        while let Some(frame) = framer.next_frame() {
            take(frame, &mut out);
        }
    }
    if let Some(frame) = framer.finish() {
        take(frame, &mut out);
    }
    assert!(out == input, "framer changed the bytes");
});
