//! JSON as Python's `json.loads` reads it. serde_json does the parsing; the only syntax Python
//! accepts beyond the JSON standard is the bare constants `NaN`, `Infinity` and `-Infinity`,
//! which are rewritten (outside strings) before parsing. Duplicate keys already resolve to the
//! last value in serde_json's maps, as in Python's dicts.

use serde_json::Value;
use std::borrow::Cow;

/// Replaces `NaN`, `Infinity`, `-Infinity` outside strings with `null`.
fn neutralise_constants(line: &str) -> Cow<'_, str> {
    if !(line.contains("NaN") || line.contains("Infinity")) {
        return Cow::Borrowed(line);
    }
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let (mut i, mut last, mut in_str) = (0usize, 0usize, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
        } else if c == b'"' {
            in_str = true;
        } else {
            let rest = &b[i..];
            let token = [&b"-Infinity"[..], b"Infinity", b"NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push_str(&line[last..i]);
                out.push_str("null");
                i += t.len();
                last = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&line[last..]);
    Cow::Owned(out)
}

/// Parses one line; the error says why, in words.
pub fn parse_line(line: &str) -> Result<Value, String> {
    if line.starts_with('\u{feff}') {
        return Err("unexpected UTF-8 byte order mark at the start of the line".into());
    }
    if line.trim_matches([' ', '\t', '\n', '\r']).is_empty() {
        return Err("empty line (not a JSON document)".into());
    }
    let text = neutralise_constants(line);
    serde_json::from_str(&text).map_err(|e| {
        let m = e.to_string();
        if m.contains("surrogate") || m.contains("end of hex escape") {
            // Python would accept the escape, and the tokenizer then refuses the string.
            format!(
                "a \\u escape is a lone UTF-16 surrogate, not Unicode text (column {})",
                e.column()
            )
        } else {
            format!("invalid JSON: {m}")
        }
    })
}

/// The strings of `key` in a document: a string is one sentence, a list of strings is several.
pub fn sentences(doc: &Value, key: &str) -> Result<Vec<String>, String> {
    let obj = doc
        .as_object()
        .ok_or_else(|| format!("the line is a JSON {}, not an object", kind(doc)))?;
    match obj.get(key) {
        None => Err(format!("missing key '{key}'")),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "key '{key}' is a list whose item {i} is a {}, not a string",
                    kind(other)
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "key '{key}' is {}, expected a string or a list of strings",
            match other {
                Value::Null => "null".to_string(),
                v => format!("a {}", kind(v)),
            }
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_extensions() {
        let v = parse_line(
            r#"{"a": NaN, "b": -Infinity, "t": "NaN Infinity \" NaN", "c": [Infinity]}"#,
        )
        .unwrap();
        assert_eq!(v["t"], "NaN Infinity \" NaN");
        assert!(v["a"].is_null() && v["b"].is_null() && v["c"][0].is_null());
        let d = parse_line(r#"{"text": "first", "text": "last"}"#).unwrap();
        assert_eq!(sentences(&d, "text").unwrap(), vec!["last"]);
        let big = parse_line(r#"{"n": 123456789012345678901234567890, "text": "x"}"#).unwrap();
        assert_eq!(sentences(&big, "text").unwrap(), vec!["x"]);
    }

    #[test]
    fn errors_say_why() {
        assert!(parse_line("").unwrap_err().contains("empty line"));
        assert!(parse_line("\u{feff}{}")
            .unwrap_err()
            .contains("byte order mark"));
        assert!(parse_line("{\"a\": 1,}")
            .unwrap_err()
            .contains("invalid JSON"));
        assert!(parse_line("{\"a\": \"x\ty\"}")
            .unwrap_err()
            .contains("control character"));
        let e = parse_line(r#"{"a": "x \ud800 y"}"#).unwrap_err();
        assert!(e.contains("lone UTF-16 surrogate"), "{e}");
        let arr = parse_line("[1]").unwrap();
        assert_eq!(
            sentences(&arr, "text").unwrap_err(),
            "the line is a JSON list, not an object"
        );
        let n = parse_line(r#"{"text": null}"#).unwrap();
        assert_eq!(
            sentences(&n, "text").unwrap_err(),
            "key 'text' is null, expected a string or a list of strings"
        );
        let l = parse_line(r#"{"text": ["ok", 5]}"#).unwrap();
        assert!(sentences(&l, "text")
            .unwrap_err()
            .contains("item 1 is a number"));
        assert_eq!(sentences(&l, "title").unwrap_err(), "missing key 'title'");
    }
}
