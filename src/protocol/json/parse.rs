//! A strict JSON tree for text a client sent: nesting, keys per object and duplicate keys
//! are bounded or refused while parsing, so a hostile text costs at most a tree of its own
//! size and an ambiguous one (a key twice) is never read two ways.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::limits::{JSON_DEPTH_MAX, JSON_OBJECT_KEYS_MAX};

/// One parsed value. Numbers keep only what a frame field can hold: a non-negative integer
/// that fits `u64`; every other number (negative, fractional, exponent, beyond `u64`) is
/// `OtherNumber`, which no field accepts.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Bool(bool),
    Int(u64),
    OtherNumber,
    Str(String),
    Array(Vec<Value>),
    /// Keys in text order; no key twice, at most `JSON_OBJECT_KEYS_MAX`.
    Object(Vec<(String, Value)>),
}

/// Why a text is not a value of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ParseError {
    /// Not JSON (or not UTF-8): serde_json's description, with line and column.
    Syntax(String),
    TooDeep,
    TooManyKeys,
    DuplicateKey(String),
}

/// Parses one JSON value filling the whole text (whitespace around it is fine).
pub(super) fn parse(text: &[u8]) -> Result<Value, ParseError> {
    // A bound hit inside the visitor travels out as serde's error; this says which.
    let bound = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(text);
    let seed = Seed {
        depth: 0,
        bound: &bound,
    };
    let parsed = seed.deserialize(&mut de).and_then(|value| {
        de.end()?;
        Ok(value)
    });
    parsed.map_err(|e| {
        bound
            .take()
            .unwrap_or_else(|| ParseError::Syntax(e.to_string()))
    })
}

#[derive(Clone, Copy)]
struct Seed<'b> {
    /// Containers open around the value this seed parses.
    depth: usize,
    bound: &'b Cell<Option<ParseError>>,
}

impl<'b> Seed<'b> {
    fn inner<E: de::Error>(self) -> Result<Seed<'b>, E> {
        if self.depth >= JSON_DEPTH_MAX {
            return Err(self.fail(ParseError::TooDeep));
        }
        Ok(Seed {
            depth: self.depth + 1,
            bound: self.bound,
        })
    }

    fn fail<E: de::Error>(self, error: ParseError) -> E {
        let text = format!("{error:?}");
        self.bound.set(Some(error));
        E::custom(text)
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(u64::try_from(v).map_or(Value::OtherNumber, Value::Int))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::OtherNumber)
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut fields: Vec<(String, Value)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.len() == JSON_OBJECT_KEYS_MAX {
                return Err(self.fail(ParseError::TooManyKeys));
            }
            // Linear: an object holds at most JSON_OBJECT_KEYS_MAX keys.
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(self.fail(ParseError::DuplicateKey(key)));
            }
            let value = map.next_value_seed(inner)?;
            fields.push((key, value));
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_into_the_tree() {
        let v = parse(br#" {"a":[1,-1,1.5,1e3,18446744073709551616,"x",true,null]} "#).unwrap();
        let Value::Object(fields) = v else {
            panic!("an object")
        };
        assert_eq!(fields[0].0, "a");
        assert_eq!(
            fields[0].1,
            Value::Array(vec![
                Value::Int(1),
                Value::OtherNumber,
                Value::OtherNumber,
                Value::OtherNumber,
                Value::OtherNumber,
                Value::Str("x".into()),
                Value::Bool(true),
                Value::Null,
            ])
        );
    }

    #[test]
    fn bounds_are_refused_by_name() {
        let deep = "[".repeat(JSON_DEPTH_MAX + 1) + &"]".repeat(JSON_DEPTH_MAX + 1);
        assert_eq!(parse(deep.as_bytes()), Err(ParseError::TooDeep));
        let ok = "[".repeat(JSON_DEPTH_MAX) + &"]".repeat(JSON_DEPTH_MAX);
        assert!(parse(ok.as_bytes()).is_ok());
        let keys: Vec<String> = (0..=JSON_OBJECT_KEYS_MAX)
            .map(|i| format!("\"k{i}\":0"))
            .collect();
        let wide = format!("{{{}}}", keys.join(","));
        assert_eq!(parse(wide.as_bytes()), Err(ParseError::TooManyKeys));
        assert_eq!(
            parse(br#"{"a":1,"a":2}"#),
            Err(ParseError::DuplicateKey("a".into()))
        );
        for bad in [&b"{"[..], b"{} {}", b"\"\\ud800\"", b"\xff", b""] {
            assert!(matches!(parse(bad), Err(ParseError::Syntax(_))), "{bad:?}");
        }
    }
}
