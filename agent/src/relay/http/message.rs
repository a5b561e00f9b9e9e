//! One JSON-RPC message (or batch) read from an HTTP body or an SSE event as
//! it streams past: a copy up to the parse limit for the classifier and, once
//! it is over the limit, a [`LineScan`] over all of it so it still ends its
//! call (a server can't keep a tool's rights by padding its answer).
use crate::relay::jsonrpc::LineScan;

#[derive(Debug)]
pub struct Message {
    limit: usize,
    /// `None` once the message outgrew the limit.
    copy: Option<Vec<u8>>,
    /// Fed only once the message is over the limit.
    scan: LineScan,
    bytes: u64,
}

impl Message {
    pub fn new(limit: usize) -> Self {
        Message {
            limit,
            copy: Some(Vec::new()),
            scan: LineScan::new(),
            bytes: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        match &mut self.copy {
            Some(c) if c.len() + data.len() <= self.limit => c.extend_from_slice(data),
            Some(c) => {
                // Outgrew the limit: the scan starts from what the copy held
                // (the scan is per byte, so it only runs when needed).
                self.scan.push(c);
                self.scan.push(data);
                self.copy = None;
            }
            None => self.scan.push(data),
        }
    }

    /// Bytes pushed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
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
