//! Match patterns: globs over whole claim values, or anchored regexes after `re:`.
//!
//! `*` matches any run of characters except `/`; `**` any run including `/`; `?` one character
//! other than `/`; every other character is literal (`[`, `{`, `\` included).

/// A compiled match pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Pattern, String> {
        Ok(Pattern { source: source.to_owned() })
    }

    pub fn matches(&self, value: &str) -> bool {
        let _ = value;
        todo!("glob matching of {}", self.source)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}
