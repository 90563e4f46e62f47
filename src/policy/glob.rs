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

    /// Properties of glob matching against a reference matcher written straight from the rules
    /// (backtracking over the pattern, no regex), on patterns and values drawn from a small
    /// alphabet full of characters a regex translation could get wrong.
    mod properties {
        use proptest::prelude::*;

        use super::super::Pattern;

        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Tok {
            Lit(char),
            /// `?`: one character, not `/`.
            One,
            /// `*`: any run without `/`.
            Star,
            /// `**`: any run at all.
            DoubleStar,
        }

        /// Left to right, `**` before `*`: `***` is `**` then `*`.
        fn tokens(pattern: &str) -> Vec<Tok> {
            let chars: Vec<char> = pattern.chars().collect();
            let mut out = Vec::new();
            let mut i = 0;
            while i < chars.len() {
                match chars[i] {
                    '*' if chars.get(i + 1) == Some(&'*') => {
                        out.push(Tok::DoubleStar);
                        i += 1;
                    }
                    '*' => out.push(Tok::Star),
                    '?' => out.push(Tok::One),
                    c => out.push(Tok::Lit(c)),
                }
                i += 1;
            }
            out
        }

        fn reference(pattern: &[Tok], value: &[char]) -> bool {
            match pattern.split_first() {
                None => value.is_empty(),
                Some((Tok::Lit(c), rest)) => value.first() == Some(c) && reference(rest, &value[1..]),
                Some((Tok::One, rest)) => value.first().is_some_and(|c| *c != '/') && reference(rest, &value[1..]),
                Some((Tok::Star, rest)) => {
                    let run = value.iter().take_while(|c| **c != '/').count();
                    (0..=run).any(|i| reference(rest, &value[i..]))
                }
                Some((Tok::DoubleStar, rest)) => (0..=value.len()).any(|i| reference(rest, &value[i..])),
            }
        }

        fn reference_matches(pattern: &str, value: &str) -> bool {
            reference(&tokens(pattern), &value.chars().collect::<Vec<_>>())
        }

        fn real_matches(pattern: &str, value: &str) -> bool {
            Pattern::parse(pattern).expect("a glob always compiles").matches(value)
        }

        /// No `:`, so never a `re:` pattern; regex metacharacters, `[`, `{` and `\` included.
        const PATTERN: &str = r"[ab/*?\[\]{}.\\^$|()+\n]{0,10}";
        const VALUE: &str = r"[ab/\[\]{}.\\^$|()+\n]{0,12}";
        const FILL: &str = r"[ab/.\[]{0,3}";

        /// A value built from `pattern` by filling its wildcards: close to matching, so that
        /// both outcomes come up often (a `/` in a fill decides many of them).
        fn near_value(pattern: String) -> impl Strategy<Value = (String, String)> {
            let toks = tokens(&pattern);
            let fills = toks
                .iter()
                .map(|t| match t {
                    Tok::Lit(c) => Just(c.to_string()).boxed(),
                    Tok::One => prop::sample::select(vec!["a".to_owned(), "/".to_owned(), "[".to_owned()]).boxed(),
                    Tok::Star | Tok::DoubleStar => FILL.boxed(),
                })
                .collect::<Vec<_>>();
            (Just(pattern), fills.prop_map(|parts| parts.concat()))
        }

        fn pattern_and_value() -> impl Strategy<Value = (String, String)> {
            prop_oneof![(PATTERN, VALUE), PATTERN.prop_flat_map(near_value)]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn agrees_with_the_reference((pattern, value) in pattern_and_value()) {
                prop_assert_eq!(real_matches(&pattern, &value), reference_matches(&pattern, &value),
                    "pattern {:?} value {:?}", pattern, value);
            }

            /// Without `**`, only literal `/` in the pattern can match a `/`: a single `*` (or
            /// `?`) never crosses one.
            #[test]
            fn single_star_never_crosses_a_slash((pattern, value) in pattern_and_value()) {
                prop_assume!(!pattern.contains("**"));
                if real_matches(&pattern, &value) {
                    prop_assert_eq!(value.matches('/').count(), pattern.matches('/').count(),
                        "pattern {:?} value {:?}", pattern, value);
                }
            }

            /// `**` between two literal parts matches whatever lies between them, slashes included.
            #[test]
            fn double_star_crosses_slashes(a in r"[ab/.\[{]{0,4}", middle in r"[ab/.\n]{0,8}", b in r"[ab/.\[{]{0,4}") {
                let pattern = format!("{a}**{b}");
                let value = format!("{a}{middle}{b}");
                prop_assert!(real_matches(&pattern, &value), "pattern {:?} value {:?}", pattern, value);
            }

            /// A pattern without wildcards matches exactly itself: never a value with anything
            /// before or after it.
            #[test]
            fn literals_match_the_whole_value_only(
                literal in r"[ab/.\[\]{}\\^$|()+]{0,8}",
                before in r"[ab/]{0,3}",
                after in r"[ab/]{0,3}",
            ) {
                prop_assert!(real_matches(&literal, &literal));
                let value = format!("{before}{literal}{after}");
                prop_assert_eq!(real_matches(&literal, &value), value == literal);
            }

            /// Globs with wildcards are anchored too: a match of `v` is not a match of `v` with a
            /// character the pattern cannot absorb appended (`x` is outside every alphabet here,
            /// so only a trailing `*`, `**` or `?` could take it).
            #[test]
            fn globs_match_the_whole_value((pattern, value) in pattern_and_value()) {
                let extended = format!("{value}x");
                let absorbs = pattern.ends_with('*') || pattern.ends_with('?');
                if !absorbs {
                    prop_assert!(!real_matches(&pattern, &extended), "pattern {:?} value {:?}", pattern, extended);
                    let prefixed = format!("x{value}");
                    prop_assert!(!real_matches(&pattern, &prefixed) || pattern.starts_with(['*', '?']));
                }
            }
        }
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
