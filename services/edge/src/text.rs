//! Cutting text to a byte budget without splitting a character.
//!
//! `String::truncate(n)` panics when byte `n` falls inside a multi-byte character, and the text
//! cut here (error messages quoting client input) is the client's. The same helpers are coming to
//! `voicerooms_contract::text`; this module goes when they land.

/// The longest prefix of `s` of at most `max_bytes` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    // A character is at most 4 bytes: a boundary is at most 3 steps back, and 0 always is one.
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
    s.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_never_split_a_character_at_any_length() {
        let text = "aé€😀\u{1D4D0}b".repeat(3);
        for max in 0..=text.len() + 1 {
            let cut = truncate_str(&text, max);
            assert!(cut.len() <= max);
            assert!(text.starts_with(cut));
            let next = text[cut.len()..].chars().next().map_or(0, char::len_utf8);
            assert!(cut.len() == text.len() || cut.len() + next > max);
            let mut owned = text.clone();
            truncate_string(&mut owned, max);
            assert_eq!(owned, cut);
        }
    }
}
