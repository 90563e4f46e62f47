//! Match patterns: globs over whole claim values, or anchored regexes after `re:`.
//!
//! `*` matches any run of characters except `/`; `**` any run including `/`; `?` one character
//! other than `/`; every other character is literal (`[`, `{`, `\` included).
//!
//! Invariants:
//! - a pattern always matches the *whole* value: `acme/widgets` never matches
//!   `acme/widgets-evil`, and a `re:` regex is wrapped as `^(?:…)$`;
//! - matching is linear in the length of the value: globs are either compared as plain strings or
//!   translated to a `regex` automaton, which never backtracks;
//! - nothing is compiled at match time: [`Pattern::parse`] does all the work once.

use regex::{Regex, RegexBuilder};

/// Compiled regexes may not grow past this, so that a policy cannot make the broker allocate
/// without bound (the `regex` crate's own default is larger than any sane claim pattern needs).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A compiled match pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// No wildcard at all: an exact string comparison, the common case for pins.
    Literal(String),
    /// `*` or `**` alone: any value (`*` only when it holds no `/`).
    AnyNoSlash,
    AnyAtAll,
    /// Any other glob, or a `re:` regex: an anchored automaton.
    Regex(Regex),
}

impl Pattern {
    /// Compiles `source`. Only a `re:` pattern can fail: a regex that does not compile, or one
    /// whose automaton would be too large.
    pub fn parse(source: &str) -> Result<Pattern, String> {
        let matcher = if let Some(re) = source.strip_prefix("re:") {
            Matcher::Regex(build(&format!("^(?:{re})$")).map_err(|e| format!("invalid regex `{re}`: {e}"))?)
        } else if !source.contains(['*', '?']) {
            Matcher::Literal(source.to_owned())
        } else if source == "*" {
            Matcher::AnyNoSlash
        } else if source == "**" {
            Matcher::AnyAtAll
        } else {
            Matcher::Regex(build(&glob_to_regex(source)).map_err(|e| format!("invalid pattern `{source}`: {e}"))?)
        };
        Ok(Pattern { source: source.to_owned(), matcher })
    }

    /// Whether the whole of `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match &self.matcher {
            Matcher::Literal(s) => s == value,
            Matcher::AnyNoSlash => !value.contains('/'),
            Matcher::AnyAtAll => true,
            Matcher::Regex(re) => re.is_match(value),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// A pattern that is a plain string: no wildcard and not a regex. Pins of owner or repository
    /// ids must be literal, so that a pin cannot be widened by accident.
    pub fn is_literal(&self) -> bool {
        matches!(self.matcher, Matcher::Literal(_))
    }

    /// `*` or `**`: a pattern that constrains (almost) nothing.
    pub fn is_wildcard_only(&self) -> bool {
        matches!(self.matcher, Matcher::AnyNoSlash | Matcher::AnyAtAll)
    }
}

fn build(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).build()
}

/// Translates a glob to an anchored regex. `(?s)` so that `**` also crosses line breaks: a claim
/// value is data, and a newline in it must not end a match early.
fn glob_to_regex(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() * 2 + 8);
    out.push_str("(?s)^");
    let mut chars = glob.chars().peekable();
    let mut literal = String::new();
    while let Some(c) = chars.next() {
        let wildcard = match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                ".*"
            }
            '*' => "[^/]*",
            '?' => "[^/]",
            _ => {
                literal.push(c);
                continue;
            }
        };
        out.push_str(&regex::escape(&literal));
        literal.clear();
        out.push_str(wildcard);
    }
    out.push_str(&regex::escape(&literal));
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, value: &str) -> bool {
        Pattern::parse(pattern).expect("pattern compiles").matches(value)
    }

    #[test]
    fn literal_matches_whole_value_only() {
        assert!(m("acme/widgets", "acme/widgets"));
        assert!(!m("acme/widgets", "acme/widgets-evil"));
        assert!(!m("acme/widgets", "xacme/widgets"));
        assert!(!m("acme/widgets", "acme/widget"));
        assert!(!m("acme/widgets", ""));
        assert!(m("", ""));
    }

    #[test]
    fn single_star_does_not_cross_slash() {
        assert!(m("acme/*", "acme/widgets"));
        assert!(m("acme/*", "acme/"));
        assert!(!m("acme/*", "acme/x/y"));
        assert!(!m("acme/*", "acme"));
        assert!(m("*", "anything-at-all"));
        assert!(m("*", ""));
        assert!(!m("*", "a/b"));
        assert!(m("acme/w*s", "acme/widgets"));
        assert!(!m("acme/w*s", "acme/w/s"));
    }

    #[test]
    fn double_star_crosses_slash() {
        assert!(m("acme/**", "acme/x/y"));
        assert!(m("acme/**", "acme/widgets"));
        assert!(m("acme/**", "acme/"));
        assert!(!m("acme/**", "acme"));
        assert!(!m("acme/**", "other/acme/x"));
        assert!(m("**", "a/b/c"));
        assert!(m("**/main", "refs/heads/main"));
        assert!(m("**", "line\nbreak"));
        assert!(m("a**", "a\n/b"));
    }

    #[test]
    fn question_mark_is_one_char_but_not_slash() {
        assert!(m("v?", "v1"));
        assert!(!m("v?", "v"));
        assert!(!m("v?", "v12"));
        assert!(!m("a?b", "a/b"));
        assert!(m("a?b", "aéb"));
    }

    #[test]
    fn brackets_braces_backslash_are_literal() {
        assert!(m("dependabot[bot]", "dependabot[bot]"));
        assert!(!m("dependabot[bot]", "dependabotb"));
        assert!(!m("dependabot[bot]", "dependabot"));
        assert!(m("{a,b}", "{a,b}"));
        assert!(!m("{a,b}", "a"));
        assert!(m(r"a\*", r"a\x"));
        assert!(!m(r"a\*", "a*x/"));
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "axb"));
        assert!(m("x[*]", "x[abc]"));
        assert!(!m("x[*]", "xa"));
        assert!(m("(+^$|)?", "(+^$|)z"));
    }

    #[test]
    fn pull_request_merge_ref() {
        assert!(m("refs/pull/*/merge", "refs/pull/42/merge"));
        assert!(!m("refs/pull/*/merge", "refs/pull/42/head"));
        assert!(!m("refs/pull/*/merge", "refs/pull/4/2/merge"));
        assert!(!m("refs/pull/*/merge", "refs/pull/42/merge/x"));
    }

    #[test]
    fn regexes_are_anchored() {
        assert!(m("re:acme/(widgets|gadgets)", "acme/widgets"));
        assert!(!m("re:acme/(widgets|gadgets)", "acme/widgets-evil"));
        assert!(!m("re:widgets", "acme/widgets"));
        // An alternation must not escape the anchors.
        assert!(!m("re:a|b", "ab"));
        assert!(!m("re:a|b", "xa"));
        assert!(m("re:a|b", "b"));
        assert!(m("re:[0-9]+", "1234567"));
        assert!(!m("re:[0-9]+", "1234567\n"));
    }

    #[test]
    fn regex_errors_are_parse_errors() {
        let err = Pattern::parse("re:(").expect_err("unbalanced");
        assert!(err.contains("invalid regex"), "{err}");
        assert!(Pattern::parse("re:a{1000}{1000}").is_err(), "too large");
        // Not a regex without the prefix: a literal.
        assert!(Pattern::parse("(").is_ok());
    }

    #[test]
    fn no_exponential_blowup() {
        let pattern = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        let value = "a".repeat(10_000);
        let start = std::time::Instant::now();
        assert!(!m(pattern, &value));
        assert!(!m(&pattern.replace('*', "**"), &value));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn classification() {
        let p = |s| Pattern::parse(s).expect("compiles");
        assert!(p("1234567").is_literal());
        assert!(!p("123*").is_literal());
        assert!(!p("re:123").is_literal());
        assert!(!p("12?").is_literal());
        assert!(p("*").is_wildcard_only());
        assert!(p("**").is_wildcard_only());
        assert!(!p("a*").is_wildcard_only());
        assert_eq!(p("re:x").as_str(), "re:x");
    }
}
