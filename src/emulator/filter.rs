//! The subset of Compute Engine's list `filter` language the emulator
//! understands: comparisons `FIELD = VALUE` and `FIELD != VALUE` (values may
//! be quoted and may use `*` as a wildcard), joined by `AND`, `OR`, or by
//! juxtaposed parenthesised terms (an implicit AND), with parentheses for
//! grouping. Fields: `name`, `status`, `zone`, `labels.KEY`.

use std::collections::BTreeMap;

/// A parsed filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Matches everything (empty filter).
    All,
    /// A comparison.
    Compare {
        /// The field, e.g. `labels.team`.
        field: String,
        /// True for `=`, false for `!=`.
        equal: bool,
        /// The value, possibly with `*` wildcards.
        value: String,
    },
    /// All must match.
    And(Vec<Filter>),
    /// One must match.
    Or(Vec<Filter>),
}

/// What a filter looks at in an instance.
pub struct Subject<'a> {
    /// Instance name.
    pub name: &'a str,
    /// Status, e.g. `RUNNING`.
    pub status: &'a str,
    /// Zone name.
    pub zone: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// A filter that could not be parsed; the message is what Compute Engine's
/// 400 response carries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Invalid list filter expression '{expression}': {problem}")]
pub struct FilterError {
    /// The filter as given.
    pub expression: String,
    /// What is wrong.
    pub problem: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    Eq,
    Ne,
    Word(String),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '=' => {
                chars.next();
                tokens.push(Token::Eq);
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("'!' must be followed by '='".into());
                }
                tokens.push(Token::Ne);
            }
            '"' | '\'' => {
                let quote = c;
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        Some(ch) if ch == quote => break,
                        Some('\\') => word.extend(chars.next()),
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated quoted value".into()),
                    }
                }
                tokens.push(Token::Word(word));
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, '(' | ')' | '=' | '!') {
                        break;
                    }
                    word.push(ch);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w == keyword)
    }

    /// or := and ("OR" and)*
    fn or(&mut self) -> Result<Filter, String> {
        let mut parts = vec![self.and()?];
        while self.is_keyword("OR") {
            self.next();
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::Or(parts) })
    }

    /// and := primary (("AND")? primary)*
    fn and(&mut self) -> Result<Filter, String> {
        let mut parts = vec![self.primary()?];
        loop {
            if self.is_keyword("AND") {
                self.next();
                parts.push(self.primary()?);
            } else if matches!(self.peek(), Some(Token::Open)) {
                parts.push(self.primary()?);
            } else {
                break;
            }
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::And(parts) })
    }

    /// primary := "(" or ")" | FIELD ("=" | "!=") VALUE
    fn primary(&mut self) -> Result<Filter, String> {
        match self.next() {
            Some(Token::Open) => {
                let inner = self.or()?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Token::Word(field)) => {
                let equal = match self.next() {
                    Some(Token::Eq) => true,
                    Some(Token::Ne) => false,
                    _ => return Err(format!("expected '=' or '!=' after '{field}'")),
                };
                let value = match self.next() {
                    Some(Token::Word(v)) => v,
                    _ => return Err(format!("expected a value after '{field}'")),
                };
                check_field(&field)?;
                Ok(Filter::Compare { field, equal, value })
            }
            Some(other) => Err(format!("unexpected {other:?}")),
            None => Err("unexpected end of expression".into()),
        }
    }
}

fn check_field(field: &str) -> Result<(), String> {
    match field {
        "name" | "status" | "zone" => Ok(()),
        f if f.strip_prefix("labels.").is_some_and(|k| !k.is_empty()) => Ok(()),
        f => Err(format!("unsupported field '{f}'")),
    }
}

impl Filter {
    /// Parses a filter; an empty or absent filter matches everything.
    pub fn parse(expression: &str) -> Result<Self, FilterError> {
        let fail = |problem: String| FilterError { expression: expression.to_string(), problem };
        if expression.trim().is_empty() {
            return Ok(Self::All);
        }
        let tokens = tokenize(expression).map_err(fail)?;
        let mut parser = Parser { tokens, at: 0 };
        let filter = parser.or().map_err(fail)?;
        if parser.at != parser.tokens.len() {
            return Err(fail(format!("unexpected {:?}", parser.tokens[parser.at])));
        }
        Ok(filter)
    }

    /// Whether an instance matches.
    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        match self {
            Self::All => true,
            Self::And(parts) => parts.iter().all(|p| p.matches(subject)),
            Self::Or(parts) => parts.iter().any(|p| p.matches(subject)),
            Self::Compare { field, equal, value } => {
                let actual = match field.as_str() {
                    "name" => Some(subject.name),
                    "status" => Some(subject.status),
                    "zone" => Some(subject.zone),
                    f => f.strip_prefix("labels.").and_then(|k| subject.labels.get(k)).map(String::as_str),
                };
                let hit = actual.is_some_and(|a| wildcard_match(value, a));
                hit == *equal
            }
        }
    }
}

/// `*` matches any run of characters; everything else literally.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(labels: &BTreeMap<String, String>) -> Subject<'_> {
        Subject { name: "tr-abc-0-1", status: "RUNNING", zone: "us-central1-a", labels }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn check(filter: &str, l: &[(&str, &str)]) -> bool {
        let l = labels(l);
        Filter::parse(filter).expect("valid filter").matches(&subject(&l))
    }

    #[test]
    fn label_equality_in_every_spelling() {
        let l = [("managed-by", "testrun-controller"), ("installation", "a")];
        assert!(check("labels.managed-by = testrun-controller", &l));
        assert!(check("labels.managed-by=\"testrun-controller\"", &l));
        assert!(check("(labels.managed-by = \"testrun-controller\") (labels.installation = \"a\")", &l));
        assert!(check("(labels.managed-by = \"testrun-controller\") AND (labels.installation = \"a\")", &l));
        assert!(!check("(labels.managed-by = \"testrun-controller\") AND (labels.installation = \"b\")", &l));
        assert!(check("labels.installation = b OR labels.installation = a", &l));
        assert!(!check("labels.missing = x", &l));
        assert!(check("labels.missing != x", &l));
        assert!(check("labels.installation != b", &l));
    }

    #[test]
    fn other_fields_and_wildcards() {
        assert!(check("name = tr-*", &[]));
        assert!(check("name = \"*-0-1\"", &[]));
        assert!(check("name = tr-*-0-*", &[]));
        assert!(!check("name = pb-*", &[]));
        assert!(check("status = RUNNING AND zone = us-central1-a", &[]));
        assert!(check("", &[]));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "labels.x",
            "labels.x =",
            "(labels.x = y",
            "labels.x = y)",
            "foo = bar",
            "labels. = x",
            "a ! b",
            "name = \"x",
        ] {
            let err = Filter::parse(bad).expect_err(bad);
            assert!(err.to_string().starts_with("Invalid list filter expression"), "{err}");
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*", "abc"));
        assert!(!wildcard_match("a*c*e", "abcd"));
        assert!(wildcard_match("a*c*e", "abcde"));
        assert!(!wildcard_match("ab*ba", "aba"));
    }
}
