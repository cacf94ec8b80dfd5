//! Lines as Python's text mode yields them: `\n`, `\r\n` and a lone `\r` all end a line
//! (universal newlines), while U+2028, U+0085 and friends do not.

use std::io::BufRead;

/// Iterates over the lines of a byte stream, without their terminators.
pub struct UniversalLines<R> {
    inner: R,
    buf: Vec<u8>,
    /// Lines split out of the last chunk, not yet returned (in reverse order).
    pending: Vec<Vec<u8>>,
    done: bool,
}

impl<R: BufRead> UniversalLines<R> {
    pub fn new(inner: R) -> Self {
        UniversalLines {
            inner,
            buf: Vec::with_capacity(64 * 1024),
            pending: Vec::new(),
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for UniversalLines<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(line) = self.pending.pop() {
                return Some(Ok(line));
            }
            if self.done {
                return None;
            }
            self.buf.clear();
            match self.inner.read_until(b'\n', &mut self.buf) {
                Err(e) => return Some(Err(e)),
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {}
            }
            let mut content: &[u8] = &self.buf;
            if let Some(c) = content.strip_suffix(b"\n") {
                content = c.strip_suffix(b"\r").unwrap_or(c);
            } else if let Some(c) = content.strip_suffix(b"\r") {
                // A lone `\r` at the very end of the stream ends the last line.
                content = c;
            }
            // Any `\r` left inside is a lone one: a line break of its own.
            let mut parts: Vec<Vec<u8>> =
                content.split(|&b| b == b'\r').map(<[u8]>::to_vec).collect();
            parts.reverse();
            self.pending = parts;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &[u8]) -> Vec<String> {
        UniversalLines::new(s)
            .map(|l| String::from_utf8(l.unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn splits_like_python_text_mode() {
        assert_eq!(lines(b"a\nb\r\nc\rd"), vec!["a", "b", "c", "d"]);
        assert_eq!(lines(b"a\n\nb\n"), vec!["a", "", "b"]);
        assert_eq!(lines(b"a\r\rb\n"), vec!["a", "", "b"]);
        assert_eq!(lines(b"a\r"), vec!["a"]);
        assert_eq!(lines(b""), Vec::<String>::new());
        assert_eq!(
            lines("x\u{2028}y\u{85}z\n".as_bytes()),
            vec!["x\u{2028}y\u{85}z"]
        );
    }
}
