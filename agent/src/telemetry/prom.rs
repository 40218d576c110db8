//! A strict, bounded parser of the Prometheus text exposition format (version 0.0.4), the
//! format apps serve on their `metrics_path`.
//!
//! The input comes from the app, which the agent runs but does not trust to be well formed:
//! the parser never panics, whatever the bytes, and bounds what it keeps ([`MAX_LINES`],
//! [`MAX_SERIES`], [`MAX_LABELS`], [`MAX_LINE_BYTES`]). It is strict: a malformed line fails
//! the whole exposition with the line number and the reason, rather than yielding a partial
//! picture that would skew the rates derived from it. Values are kept as written, including
//! `NaN` and `±Inf` (valid in the format); deciding what is usable is the caller's job.
//!
//! Pure: text in, series out.

use std::collections::HashMap;

/// Most lines (comments included) in one exposition.
pub const MAX_LINES: usize = 10_000;
/// Most series (sample lines) in one exposition.
pub const MAX_SERIES: usize = 4_096;
/// Most labels on one series.
pub const MAX_LABELS: usize = 16;
/// Longest line, in bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// A metric family's declared type (`# TYPE name kind`); undeclared families are untyped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line: a metric name, its labels in the order written, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    /// The value of the label `name`, if the series has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition: every series in the order written, and the declared family types.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub series: Vec<Series>,
    kinds: HashMap<String, Kind>,
}

impl Exposition {
    /// The type of the family a series named `name` belongs to: its own declaration, or for
    /// `x_bucket`/`x_sum`/`x_count` that of a histogram or summary `x`.
    pub fn kind_of(&self, name: &str) -> Kind {
        if let Some(kind) = self.kinds.get(name) {
            return *kind;
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            let Some(base) = name.strip_suffix(suffix) else {
                continue;
            };
            match self.kinds.get(base) {
                Some(Kind::Histogram) => return Kind::Histogram,
                Some(Kind::Summary) if suffix != "_bucket" => return Kind::Summary,
                _ => {}
            }
        }
        Kind::Untyped
    }
}

/// Why an exposition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: &'static str },
    #[error("line {line} is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong { line: usize },
    #[error("more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("more than {MAX_SERIES} series")]
    TooManySeries,
}

/// Parses an exposition; see the module doc for what is accepted.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut exposition = Exposition::default();
    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        if index >= MAX_LINES {
            // A final newline leaves one empty piece; that is not a line of its own.
            if raw.is_empty() && index == MAX_LINES {
                continue;
            }
            return Err(ParseError::TooManyLines);
        }
        if raw.len() > MAX_LINE_BYTES {
            return Err(ParseError::LineTooLong { line });
        }
        let malformed = |reason| ParseError::Malformed { line, reason };
        let trimmed = raw.strip_suffix('\r').unwrap_or(raw).trim_matches(BLANK);
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            if let Some((name, kind)) = type_line(comment).map_err(malformed)? {
                if exposition.kinds.insert(name.to_owned(), kind).is_some() {
                    return Err(malformed("a second TYPE line for the same metric"));
                }
            }
            continue;
        }
        if exposition.series.len() >= MAX_SERIES {
            return Err(ParseError::TooManySeries);
        }
        exposition
            .series
            .push(sample_line(trimmed).map_err(malformed)?);
    }
    Ok(exposition)
}

const BLANK: &[char] = &[' ', '\t'];

/// `# TYPE name kind` → the declaration; any other comment (`# HELP`, free text) → `None`.
fn type_line(comment: &str) -> Result<Option<(&str, Kind)>, &'static str> {
    let mut words = comment.split(BLANK).filter(|w| !w.is_empty());
    if words.next() != Some("TYPE") {
        return Ok(None);
    }
    let name = words.next().ok_or("TYPE without a metric name")?;
    if !is_metric_name(name) {
        return Err("TYPE names an invalid metric name");
    }
    let kind = match words.next().ok_or("TYPE without a type")? {
        "counter" => Kind::Counter,
        "gauge" => Kind::Gauge,
        "histogram" => Kind::Histogram,
        "summary" => Kind::Summary,
        "untyped" => Kind::Untyped,
        _ => return Err("unknown metric type"),
    };
    if words.next().is_some() {
        return Err("text after the type");
    }
    Ok(Some((name, kind)))
}

/// `name[{labels}] value [timestamp]`, already trimmed.
fn sample_line(line: &str) -> Result<Series, &'static str> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("invalid metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    // Blanks may separate the name from its labels, as Prometheus' own parser allows.
    if let Some(inside) = rest.trim_start_matches(BLANK).strip_prefix('{') {
        rest = label_set(inside, &mut labels)?;
    }
    let mut fields = rest.split(BLANK).filter(|f| !f.is_empty());
    if !rest.starts_with(BLANK) {
        return Err("no blank between the series and its value");
    }
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| "the timestamp is not an integer")?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Series {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses labels after the opening `{` up to and including the closing `}`; returns the
/// rest of the line.
fn label_set<'a>(
    mut text: &'a str,
    labels: &mut Vec<(String, String)>,
) -> Result<&'a str, &'static str> {
    loop {
        text = text.trim_start_matches(BLANK);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok(rest);
        }
        let name_end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("unterminated label set")?;
        let name = &text[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("invalid label name");
        }
        text = text[name_end..].trim_start_matches(BLANK);
        text = text.strip_prefix('=').ok_or("label without '='")?;
        text = text.trim_start_matches(BLANK);
        text = text.strip_prefix('"').ok_or("label value not quoted")?;
        let (value, rest) = quoted(text)?;
        if labels.iter().any(|(k, _)| k == name) {
            return Err("a label appears twice");
        }
        if labels.len() >= MAX_LABELS {
            return Err("too many labels");
        }
        labels.push((name.to_owned(), value));
        text = rest.trim_start_matches(BLANK);
        if let Some(rest) = text.strip_prefix(',') {
            text = rest;
        } else if !text.starts_with('}') {
            return Err("labels not separated by ','");
        }
    }
}

/// A label value after its opening quote, with the format's three escapes; returns the value
/// and the text after the closing quote.
fn quoted(text: &str) -> Result<(String, &str), &'static str> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                _ => return Err("invalid escape in a label value"),
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value")
}

/// A sample value: a float as Go's `ParseFloat` reads it, or `NaN`, `+Inf`, `-Inf`.
fn parse_value(text: &str) -> Result<f64, &'static str> {
    match text {
        "NaN" => return Ok(f64::NAN),
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    // Rust also reads "inf", "infinity" and "nan" in any case; the format does not write
    // them, so only digits, signs, a point and an exponent are let through.
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
    {
        return Err("the value is not a number");
    }
    text.parse().map_err(|_| "the value is not a number")
}

fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_APP: &str = r#"# HELP http_requests_total Traffic requests answered, by status code.
# TYPE http_requests_total counter
http_requests_total{code="200"} 1027
http_requests_total{code="500"} 3
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.005"} 1000
http_request_duration_seconds_bucket{le="+Inf"} 1030
http_request_duration_seconds_sum 3.25
http_request_duration_seconds_count 1030
# TYPE process_uptime_seconds gauge
process_uptime_seconds 12.5
app_info{version="a\"b\\c\nd",} 1 1700000000000
"#;

    #[test]
    fn a_well_formed_exposition_yields_every_series_with_labels_and_types() {
        let e = parse(SAMPLE_APP).unwrap();
        assert_eq!(e.series.len(), 8);
        assert_eq!(e.series[0].name, "http_requests_total");
        assert_eq!(e.series[0].label("code"), Some("200"));
        assert_eq!(e.series[0].value, 1027.0);
        assert_eq!(e.series[3].value, 1030.0);
        assert_eq!(e.series[3].label("le"), Some("+Inf"));
        assert_eq!(e.series[6].value, 12.5);
        assert_eq!(e.series[7].label("version"), Some("a\"b\\c\nd"));
        assert_eq!(e.kind_of("http_requests_total"), Kind::Counter);
        assert_eq!(
            e.kind_of("http_request_duration_seconds_bucket"),
            Kind::Histogram
        );
        assert_eq!(
            e.kind_of("http_request_duration_seconds_count"),
            Kind::Histogram
        );
        assert_eq!(e.kind_of("process_uptime_seconds"), Kind::Gauge);
        assert_eq!(e.kind_of("app_info"), Kind::Untyped);
    }

    #[test]
    fn blanks_crlf_and_exponents_are_accepted() {
        let e = parse("\r\n  up\t{ a = \"1\" , b=\"2\" }   1.5e3  \r\n\n").unwrap();
        assert_eq!(e.series.len(), 1);
        assert_eq!(e.series[0].value, 1500.0);
        assert_eq!(
            e.series[0].labels,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
    }

    #[test]
    fn nan_and_infinities_are_values_of_the_format() {
        let e = parse("a NaN\nb +Inf\nc -Inf\nd Inf\n").unwrap();
        assert!(e.series[0].value.is_nan());
        assert_eq!(e.series[1].value, f64::INFINITY);
        assert_eq!(e.series[2].value, f64::NEG_INFINITY);
        assert_eq!(e.series[3].value, f64::INFINITY);
        // Rust's spellings are not the format's.
        for other in ["a nan", "a inf", "a infinity", "a 0x10", "a 1_000"] {
            assert!(parse(other).is_err(), "{other}");
        }
    }

    #[test]
    fn malformed_lines_fail_with_their_line_number() {
        for (text, line) in [
            ("ok 1\n9bad 1\n", 2),
            ("a{b=\"1\" 1", 1),
            ("a{b=1} 1", 1),
            ("a{b=\"1\"c=\"2\"} 1", 1),
            ("a{b=\"1\",b=\"2\"} 1", 1),
            ("a{b=\"\\x\"} 1", 1),
            ("a{9=\"1\"} 1", 1),
            ("a", 1),
            ("a 1 2 3", 1),
            ("a 1 1.5", 1),
            ("a{}1", 1),
            ("a-b 1", 1),
            ("\n\n# TYPE a bogus\n", 3),
            ("# TYPE a counter\n# TYPE a gauge\n", 2),
            ("# TYPE\n", 1),
            ("# TYPE a counter extra\n", 1),
        ] {
            match parse(text) {
                Err(ParseError::Malformed { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn help_and_free_comments_are_ignored() {
        let e = parse("# HELP a anything at all { \" \\\n# just a comment\n#\na 1\n").unwrap();
        assert_eq!(e.series.len(), 1);
    }

    #[test]
    fn oversized_expositions_are_refused() {
        let many_series = "a 1\n".repeat(MAX_SERIES + 1);
        assert_eq!(parse(&many_series), Err(ParseError::TooManySeries));
        assert_eq!(
            parse(&"a 1\n".repeat(MAX_SERIES)).unwrap().series.len(),
            MAX_SERIES
        );
        let many_lines = "#\n".repeat(MAX_LINES + 1);
        assert_eq!(parse(&many_lines), Err(ParseError::TooManyLines));
        assert!(parse(&"#\n".repeat(MAX_LINES)).is_ok());
        let long = format!("a{{b=\"{}\"}} 1", "x".repeat(MAX_LINE_BYTES));
        assert_eq!(parse(&long), Err(ParseError::LineTooLong { line: 1 }));
        let labels: Vec<String> = (0..=MAX_LABELS).map(|i| format!("l{i}=\"x\"")).collect();
        let text = format!("a{{{}}} 1", labels.join(","));
        assert!(matches!(parse(&text), Err(ParseError::Malformed { .. })));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random walk over bytes that matter to the grammar.
        let alphabet = b"ab_:{}=\",\\ \t\n#01.e+-InfNaTYPE\xc3\xa9";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            let len = (state % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse(&text);
        }
    }
}
