//! Incremental `text/event-stream` reader (the SSE format of the HTML
//! standard, which MCP's HTTP transports use).
//!
//! The reader never holds the stream: it is fed each chunk as it arrives and
//! reports where in the chunk each event was dispatched, so the relay can
//! forward everything before that byte at once and the dispatching byte only
//! after it acted on the event (a client dispatches an event when it reads
//! the line terminator of the blank line that ends it, not before).
//!
//! Each event's data (its `data:` lines joined with `\n`) goes into a
//! [`Message`] accumulator, bounded by the parse limit.
use super::message::Message;

/// Longest field name the reader keeps (longer names are unknown fields).
const NAME_MAX: usize = 16;
/// Longest `event` value kept; longer values are truncated.
const VALUE_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    /// `retry`, comments, unknown fields: skipped.
    Skip,
}

/// One dispatched event.
#[derive(Debug)]
pub struct Event {
    /// Index, in the chunk that completed it, of the byte that dispatched it.
    pub at: usize,
    /// `event:` field (empty when absent: the type is then "message").
    pub kind: String,
    pub data: Message,
}

/// The reader's state between chunks.
#[derive(Debug)]
pub struct SseReader {
    limit: usize,
    /// At the start of a line (nothing of it read yet).
    line_start: bool,
    /// The previous byte was CR: an LF right after it belongs to the same
    /// line terminator.
    after_cr: bool,
    /// Reading the field name (before the colon).
    in_name: bool,
    /// Some line of the current event was read (it is not yet dispatched).
    in_event: bool,
    name: Vec<u8>,
    field: Field,
    /// Just after the colon: one space is skipped.
    after_colon: bool,
    /// The event being read.
    has_data: bool,
    data: Message,
    kind: Vec<u8>,
    value: Vec<u8>,
}

impl SseReader {
    pub fn new(limit: usize) -> Self {
        SseReader {
            limit,
            line_start: true,
            after_cr: false,
            in_name: false,
            in_event: false,
            name: Vec::new(),
            field: Field::Skip,
            after_colon: false,
            has_data: false,
            data: Message::new(limit),
            kind: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Read `chunk`; push every event it completes to `out`, in order.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        let mut i = 0;
        while i < chunk.len() {
            let c = chunk[i];
            if self.after_cr {
                self.after_cr = false;
                if c == b'\n' {
                    i += 1;
                    continue;
                }
            }
            if c == b'\r' || c == b'\n' {
                self.after_cr = c == b'\r';
                self.end_line(i, out);
                i += 1;
                continue;
            }
            if self.line_start {
                self.line_start = false;
                self.in_event = true;
                self.name.clear();
                self.value.clear();
                if c == b':' {
                    self.in_name = false;
                    self.field = Field::Skip;
                } else {
                    self.in_name = true;
                    self.name.push(c);
                }
                i += 1;
                continue;
            }
            if self.in_name {
                if c == b':' {
                    self.in_name = false;
                    self.after_colon = true;
                    self.start_field();
                } else if self.name.len() <= NAME_MAX {
                    self.name.push(c);
                }
                i += 1;
                continue;
            }
            if self.after_colon {
                self.after_colon = false;
                if c == b' ' {
                    i += 1;
                    continue;
                }
            }
            // A run of value bytes, up to the end of the line or chunk.
            let end = chunk[i..]
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .map_or(chunk.len(), |p| i + p);
            let run = &chunk[i..end];
            match self.field {
                Field::Data => self.data.push(run),
                Field::Event => {
                    let room = VALUE_MAX.saturating_sub(self.value.len());
                    self.value.extend_from_slice(&run[..run.len().min(room)]);
                }
                Field::Skip => {}
            }
            i = end;
        }
    }

    /// The field name is complete (at its colon, or at the end of a line
    /// with no colon).
    fn start_field(&mut self) {
        self.field = match self.name.as_slice() {
            b"data" => {
                if self.has_data {
                    self.data.push(b"\n");
                }
                self.has_data = true;
                Field::Data
            }
            b"event" => Field::Event,
            _ => Field::Skip,
        };
    }

    fn end_line(&mut self, at: usize, out: &mut Vec<Event>) {
        if self.line_start {
            // A blank line: dispatch.
            self.dispatch(at, out);
            return;
        }
        if self.in_name {
            // A field with no colon has an empty value.
            self.in_name = false;
            self.start_field();
        }
        match self.field {
            Field::Event => self.kind = std::mem::take(&mut self.value),
            Field::Data | Field::Skip => {}
        }
        self.field = Field::Skip;
        self.after_colon = false;
        self.line_start = true;
    }

    /// Between events: bytes written to the client now can't land inside
    /// an event (the relay's own events go in only here).
    pub fn at_boundary(&self) -> bool {
        self.line_start && !self.in_event
    }

    fn dispatch(&mut self, at: usize, out: &mut Vec<Event>) {
        self.in_event = false;
        let data = std::mem::replace(&mut self.data, Message::new(self.limit));
        let kind = String::from_utf8_lossy(&std::mem::take(&mut self.kind)).into_owned();
        // An event without data is not dispatched (ids and priming events
        // pass through as bytes; `Last-Event-ID` is the client's business).
        if std::mem::replace(&mut self.has_data, false) {
            out.push(Event { at, kind, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (at-relative-to-stream, kind, data) for `input` fed in `piece`s.
    fn read(input: &[u8], piece: usize) -> Vec<(usize, String, Vec<u8>)> {
        let mut r = SseReader::new(1 << 20);
        let mut got = Vec::new();
        let mut base = 0;
        for chunk in input.chunks(piece.max(1)) {
            let mut evs = Vec::new();
            r.feed(chunk, &mut evs);
            for e in evs {
                got.push((
                    base + e.at,
                    e.kind,
                    e.data.as_slice().unwrap_or_default().to_vec(),
                ));
            }
            base += chunk.len();
        }
        got
    }

    #[test]
    fn events_with_every_line_ending_and_split_anywhere() {
        let input = b": comment\r\nid: 7\r\nevent: message\r\ndata: {\"a\":1}\r\n\r\n\
data:x\ndata: y\n\nretry: 10\rdata\r\rdata:  two spaces\n\n";
        let want = vec![
            (
                input.iter().position(|&b| b == b'}').unwrap_or(0) + 3,
                "message".to_string(),
                b"{\"a\":1}".to_vec(),
            ),
            (0, String::new(), b"x\ny".to_vec()),
            (0, String::new(), b"".to_vec()),
            (0, String::new(), b" two spaces".to_vec()),
        ];
        for piece in [1, 2, 3, 5, 7, 1000] {
            let got = read(input, piece);
            assert_eq!(got.len(), 4, "piece {piece}: {got:?}");
            assert_eq!(got[0], want[0], "piece {piece}");
            for (g, w) in got.iter().zip(&want).skip(1) {
                assert_eq!((&g.1, &g.2), (&w.1, &w.2), "piece {piece}");
                // Dispatched on a line terminator.
                assert!(input[g.0] == b'\n' || input[g.0] == b'\r');
            }
        }
    }

    #[test]
    fn priming_events_carry_no_message_and_id_only_events_none() {
        let got = read(b"id: abc\ndata: \n\nid: z\n\n", 4);
        assert_eq!(got.len(), 1);
        assert!(got[0].2.is_empty());
    }

    #[test]
    fn boundaries_are_between_events_only() {
        let mut r = SseReader::new(100);
        let mut evs = Vec::new();
        assert!(r.at_boundary());
        for (piece, boundary) in [
            (&b"event: message\n"[..], false),
            (b"data: {}", false),
            (b"\n", false),
            (b"\n", true),
            (b": ping\n", false),
            (b"\n", true),
        ] {
            r.feed(piece, &mut evs);
            assert_eq!(r.at_boundary(), boundary, "after {piece:?}");
        }
    }

    #[test]
    fn long_data_is_bounded_but_counted() {
        let mut r = SseReader::new(10);
        let mut evs = Vec::new();
        let mut input = b"data: ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\n\n");
        r.feed(&input, &mut evs);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data.bytes(), 100);
        assert!(evs[0].data.as_slice().is_none(), "over the limit: no copy");
    }
}
