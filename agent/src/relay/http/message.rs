//! One JSON-RPC message (or batch) read from an HTTP body or an SSE event as
//! it streams past: a copy up to the parse limit for the classifier, and a
//! [`LineScan`] over all of it so a message over the limit still ends its
//! call (a server can't keep a tool's rights by padding its answer).
use crate::relay::jsonrpc::LineScan;

#[derive(Debug)]
pub struct Message {
    limit: usize,
    /// `None` once the message outgrew the limit.
    copy: Option<Vec<u8>>,
    scan: LineScan,
}

impl Message {
    pub fn new(limit: usize) -> Self {
        Message {
            limit,
            copy: Some(Vec::new()),
            scan: LineScan::new(),
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.scan.push(data);
        if let Some(c) = &mut self.copy {
            if c.len() + data.len() > self.limit {
                self.copy = None;
            } else {
                c.extend_from_slice(data);
            }
        }
    }

    /// Bytes pushed so far.
    pub fn bytes(&self) -> u64 {
        self.scan.bytes()
    }

    /// The whole message, when it is within the parse limit.
    pub fn as_slice(&self) -> Option<&[u8]> {
        self.copy.as_deref()
    }

    /// The streaming scan (for a message over the limit).
    pub fn scan(&self) -> &LineScan {
        &self.scan
    }
}
