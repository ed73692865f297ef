//! Terminal escapes in a log line, turned into text segments with CSS classes.
//!
//! Jobs print colours (`ESC[31m`), bold, and progress bars redrawn with `\r`. The viewer shows
//! the colours through classes from a fixed set (`fg1`, `b`, ...), never through anything the
//! job wrote: every other escape (cursor moves, titles, hyperlinks, device queries) is dropped,
//! and the text itself is only ever inserted as text. A `\r` inside a line starts it over, as a
//! terminal shows a redrawn progress bar: only what comes after the last one is kept.

use serde::Serialize;

/// A run of text in one style: `(classes, text)`, classes space-separated, possibly empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment(pub String, pub String);

/// The style an SGR sequence sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    /// One of the 16 colours, 0-15.
    fg: Option<u8>,
    bg: Option<u8>,
}

impl Style {
    fn classes(&self) -> String {
        let mut out = Vec::new();
        if self.bold {
            out.push("b".to_string());
        }
        if self.dim {
            out.push("d".to_string());
        }
        if self.italic {
            out.push("i".to_string());
        }
        if self.underline {
            out.push("u".to_string());
        }
        if let Some(fg) = self.fg {
            out.push(format!("fg{fg}"));
        }
        if let Some(bg) = self.bg {
            out.push(format!("bg{bg}"));
        }
        out.join(" ")
    }

    /// Applies one SGR sequence's parameters.
    fn apply(&mut self, params: &[u16]) {
        let mut i = 0;
        if params.is_empty() {
            *self = Style::default();
        }
        while i < params.len() {
            match params[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                n @ 30..=37 => self.fg = Some((n - 30) as u8),
                n @ 90..=97 => self.fg = Some((n - 90 + 8) as u8),
                39 => self.fg = None,
                n @ 40..=47 => self.bg = Some((n - 40) as u8),
                n @ 100..=107 => self.bg = Some((n - 100 + 8) as u8),
                49 => self.bg = None,
                // 256 colours: the first 16 are the named ones; the others are shown as the
                // default colour. 24-bit colours likewise.
                n @ (38 | 48) => {
                    let colour = match params.get(i + 1) {
                        Some(5) => {
                            let c = params.get(i + 2).copied();
                            i += 2;
                            c.filter(|c| *c < 16).map(|c| c as u8)
                        }
                        Some(2) => {
                            i += 4;
                            None
                        }
                        _ => None,
                    };
                    if n == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

struct Collector {
    style: Style,
    segments: Vec<Segment>,
    text: String,
}

impl Collector {
    fn flush(&mut self) {
        if !self.text.is_empty() {
            let text = std::mem::take(&mut self.text);
            let classes = self.style.classes();
            match self.segments.last_mut() {
                Some(last) if last.0 == classes => last.1.push_str(&text),
                _ => self.segments.push(Segment(classes, text)),
            }
        }
    }
}

impl vte::Perform for Collector {
    fn print(&mut self, c: char) {
        self.text.push(c);
    }

    fn execute(&mut self, byte: u8) {
        match byte {
            b'\t' => self.text.push('\t'),
            b'\r' => {
                self.text.clear();
                self.segments.clear();
            }
            _ => {}
        }
    }

    fn csi_dispatch(
        &mut self,
        params: &vte::Params,
        _intermediates: &[u8],
        ignore: bool,
        action: char,
    ) {
        if action != 'm' || ignore {
            return;
        }
        let flat: Vec<u16> = params.iter().flat_map(|p| p.iter().copied()).collect();
        let mut style = self.style;
        style.apply(&flat);
        if style != self.style {
            self.flush();
            self.style = style;
        }
    }
}

/// The segments of one log line's text.
pub fn segments(text: &str) -> Vec<Segment> {
    let mut collector = Collector {
        style: Style::default(),
        segments: Vec::new(),
        text: String::new(),
    };
    let mut parser = vte::Parser::new();
    parser.advance(&mut collector, text.as_bytes());
    collector.flush();
    collector.segments
}

/// The text of a line without its escapes (for search and plain views).
pub fn plain(text: &str) -> String {
    segments(text).into_iter().map(|s| s.1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(classes: &str, text: &str) -> Segment {
        Segment(classes.into(), text.into())
    }

    #[test]
    fn colours_and_styles_become_classes() {
        assert_eq!(
            segments("\x1b[1;31merror\x1b[0m: it broke"),
            vec![seg("b fg1", "error"), seg("", ": it broke")]
        );
        assert_eq!(
            segments("\x1b[92mok\x1b[39m \x1b[44mblue\x1b[m"),
            vec![seg("fg10", "ok"), seg("", " "), seg("bg4", "blue")]
        );
        assert_eq!(
            segments("\x1b[38;5;3my\x1b[38;5;200mz\x1b[38;2;1;2;3mw"),
            vec![seg("fg3", "y"), seg("", "zw")]
        );
    }

    #[test]
    fn other_escapes_are_dropped_and_text_stays_text() {
        // A title, a hyperlink, a cursor move, a device query, a bell.
        assert_eq!(
            plain(
                "\x1b]0;title\x07a\x1b]8;;https://x.test\x1b\\link\x1b]8;;\x1b\\\x1b[2J\x1b[6n\x07b"
            ),
            "alinkb"
        );
        assert_eq!(
            segments("<script>alert(1)</script>"),
            vec![seg("", "<script>alert(1)</script>")]
        );
    }

    #[test]
    fn a_carriage_return_starts_the_line_over() {
        assert_eq!(plain("  10%\r  50%\r 100% done"), " 100% done");
        assert_eq!(plain("a\tb"), "a\tb");
    }

    #[test]
    fn broken_escapes_do_not_panic() {
        for text in [
            "\x1b[",
            "\x1b[38;5",
            "\x1b[38;2;1",
            "\x1b]8;;",
            "\x1b",
            "\x1b[999999999999m",
        ] {
            let _ = segments(text);
        }
    }
}
