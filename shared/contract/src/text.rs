//! Cutting text to a byte budget without splitting a character.
//!
//! `String::truncate(n)` and `&s[..n]` panic when byte `n` falls inside a multi-byte UTF-8
//! character, and the text being cut (error messages quoting input, names, reasons) is usually
//! someone else's. Use these instead wherever a length limit is applied to text.

/// The longest prefix of `s` that is at most `max_bytes` bytes long and ends on a character
/// boundary. Never panics; `max_bytes == 0` gives `""`.
pub fn truncate_str(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    // A UTF-8 character is at most 4 bytes, so a boundary is at most 3 steps back; `get` returns
    // `None` exactly when `end` is not a boundary, and 0 always is one.
    let mut end = max_bytes;
    loop {
        if let Some(prefix) = s.get(..end) {
            return prefix;
        }
        match end.checked_sub(1) {
            Some(e) => end = e,
            None => return "",
        }
    }
}

/// Shortens `s` in place to at most `max_bytes` bytes, on a character boundary.
pub fn truncate_string(s: &mut String, max_bytes: usize) {
    let keep = truncate_str(s, max_bytes).len();
    // `keep` is a character boundary (it is the length of a prefix `get` accepted).
    s.truncate(keep);
}

/// [`truncate_str`] that appends `…` when it cut something, the whole within `max_bytes`
/// (for messages shown to people). With `max_bytes` below 3 it cuts without the ellipsis.
pub fn truncate_with_ellipsis(s: &str, max_bytes: usize) -> std::borrow::Cow<'_, str> {
    const ELLIPSIS: &str = "…";
    if s.len() <= max_bytes {
        return std::borrow::Cow::Borrowed(s);
    }
    match max_bytes.checked_sub(ELLIPSIS.len()) {
        Some(budget) => std::borrow::Cow::Owned(format!("{}{ELLIPSIS}", truncate_str(s, budget))),
        None => std::borrow::Cow::Borrowed(truncate_str(s, max_bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_whole() {
        assert_eq!(truncate_str("abc", 3), "abc");
        assert_eq!(truncate_str("abc", 10), "abc");
        assert_eq!(truncate_str("", 0), "");
    }

    #[test]
    fn cuts_never_split_a_character_at_any_length() {
        // 1-, 2-, 3- and 4-byte characters, cut at every budget.
        let text = "aé€\u{1d4d0}bé€\u{1d4d0}";
        for max in 0..=text.len() + 1 {
            let cut = truncate_str(text, max);
            assert!(cut.len() <= max, "{max}: {cut:?}");
            assert!(text.starts_with(cut));
            // The longest such prefix: one more character would not fit.
            let rest = text.get(cut.len()..).unwrap();
            let next = rest.chars().next().map_or(0, char::len_utf8);
            assert!(
                cut.len() == text.len() || cut.len() + next > max,
                "{max}: {cut:?}"
            );
            let mut owned = text.to_owned();
            truncate_string(&mut owned, max);
            assert_eq!(owned, cut);
        }
    }

    #[test]
    fn the_ellipsis_counts_against_the_budget() {
        assert_eq!(truncate_with_ellipsis("abcdef", 6), "abcdef");
        assert_eq!(truncate_with_ellipsis("abcdefg", 6), "abc…");
        assert_eq!(truncate_with_ellipsis("€€€", 5), "…");
        assert_eq!(truncate_with_ellipsis("abcdefg", 2), "ab");
        for max in 0..40 {
            let s = "\u{1d4d0}".repeat(9);
            assert!(truncate_with_ellipsis(&s, max).len() <= max);
        }
    }
}
