//! Strings that come from a peer or a request: checked where they enter (a clear refusal
//! naming the field), and escaped wherever they are printed, so a label with a newline or a
//! terminal escape cannot forge a line of `skyferry status` or of the log.

use std::borrow::Cow;

/// Longest guest label (`Hello::guest`, `skyferry start --guest`).
pub const MAX_LABEL: usize = 64;
/// Longest backend name.
pub const MAX_BACKEND: usize = 16;
/// Longest `Hello::destination` (a Xen domain id, or a name).
pub const MAX_DESTINATION: usize = 64;
/// Longest error text taken from a peer (a refusal, a `Failed` or an `Abort` reason).
pub const MAX_REASON: usize = 1024;

/// Checks a name-like field: 1..=`max` bytes of ASCII letters, digits and `-_.:@+`, not
/// starting with `.` or `-` (the destination names files and processes after a guest label).
pub fn check_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!(
            "{what} must be 1 to {max} characters, got {}",
            s.chars().count()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:@+".contains(*c)))
    {
        return Err(format!(
            "{what} {} has the character {}: use letters, digits and -_.:@+",
            escape(s),
            c.escape_debug()
        ));
    }
    if s.starts_with(['.', '-']) {
        return Err(format!(
            "{what} {} must not start with '.' or '-'",
            escape(s)
        ));
    }
    Ok(())
}

/// True for characters that move the cursor, change the terminal, or reorder text.
fn hazardous(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control, escape and bidirectional-override character written as `\u{..}`
/// (and `\` doubled, so an escape in the output is always ours).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| hazardous(c) || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if hazardous(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// An error text from a peer, as this host keeps it: at most [`MAX_REASON`] bytes, escaped.
pub fn from_peer(s: &str) -> String {
    let mut out = escape(s).into_owned();
    truncate(&mut out, MAX_REASON);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_with_a_reason() {
        assert!(check_name("guest label", "web-01.prod:a@b+c_d", MAX_LABEL).is_ok());
        for bad in [
            "",
            "a\nb",
            "x\u{1b}[2J",
            "../etc",
            "-rf",
            "a b",
            "ünï",
            &"x".repeat(65),
        ] {
            let e = check_name("guest label", bad, MAX_LABEL).unwrap_err();
            assert!(e.starts_with("guest label"), "{e}");
            assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e:?}");
        }
    }

    #[test]
    fn escaping_leaves_no_line_break_or_escape() {
        assert_eq!(escape("plain ünïcödé"), "plain ünïcödé");
        let e = escape("a\nb\u{1b}[31m\u{202e}c\\");
        assert_eq!(e, "a\\u{a}b\\u{1b}[31m\\u{202e}c\\\\");
        let mut long = "é".repeat(600);
        truncate(&mut long, 1001);
        assert_eq!(long.len(), 1000);
        assert!(from_peer(&"x\n".repeat(2000)).len() <= MAX_REASON);
    }
}
