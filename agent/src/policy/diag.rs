//! `file:line:col: message` diagnostics.
use std::fmt;
use std::ops::Range;

/// One problem in a policy file. `line` and `col` are 1-based; `col` counts
/// characters (not bytes) from the start of the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Turns byte offsets of one text into line/column pairs.
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of the start of every line.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    /// 1-based (line, column) of byte `offset` (clamped to the text).
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.starts[line];
        let col = self.text[start..offset].chars().count();
        (line + 1, col + 1)
    }

    /// The text of `span`, if it is a valid range of the text.
    pub fn slice(&self, span: &Range<usize>) -> Option<&'a str> {
        self.text.get(span.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let t = "ab\ncdé\n\nx";
        let li = LineIndex::new(t);
        assert_eq!(li.position(0), (1, 1));
        assert_eq!(li.position(2), (1, 3));
        assert_eq!(li.position(3), (2, 1));
        assert_eq!(li.position(7), (2, 4)); // after the 2-byte é
        assert_eq!(li.position(9), (4, 1));
        assert_eq!(li.position(100), (4, 2));
    }

    #[test]
    fn display() {
        let d = Diagnostic {
            file: "p.toml".into(),
            line: 3,
            col: 7,
            message: "bad".into(),
        };
        assert_eq!(d.to_string(), "p.toml:3:7: bad");
    }
}
