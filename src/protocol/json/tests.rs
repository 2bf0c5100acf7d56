use super::form::{Format, Id, write_str};
use super::parse::Value;
use super::*;

#[test]
fn strings_escape_what_json_requires() {
    let mut out = String::new();
    write_str(&mut out, "a\"b\\c\n\r\t\u{1}\u{7f}é😀");
    assert_eq!(out, r#""a\"b\\c\n\r\t\u0001é😀""#.replace('é', "\u{7f}é"));
    let back: String = serde_json::from_str(&out).unwrap();
    assert_eq!(back, "a\"b\\c\n\r\t\u{1}\u{7f}é😀");
}

#[test]
fn ids_read_from_strings_and_safe_integers_only() {
    assert_eq!(
        Id::read(Value::Str("18446744073709551615".into())),
        Ok(u64::MAX)
    );
    assert_eq!(Id::read(Value::Str("0".into())), Ok(0));
    assert_eq!(Id::read(Value::Int(JSON_SAFE_INTEGER_MAX)), Ok(1 << 53));
    for bad in [
        Value::Int(JSON_SAFE_INTEGER_MAX + 1),
        Value::Str("18446744073709551616".into()),
        Value::Str("".into()),
        Value::Str("+1".into()),
        Value::Str(" 1".into()),
        Value::Str("1e3".into()),
        Value::OtherNumber,
        Value::Null,
    ] {
        assert!(
            matches!(Id::read(bad.clone()), Err(JsonProblem::WrongType { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn nested_problems_name_their_path() {
    let p = JsonProblem::MissingField("text".into())
        .at("message")
        .at("[2]")
        .at("entries");
    assert_eq!(
        p,
        JsonProblem::MissingField("entries[2].message.text".into())
    );
    let p = JsonProblem::WrongType {
        field: String::new(),
        expected: "a string",
    }
    .at("to");
    assert_eq!(p.to_string(), "field to: expected a string");
}

#[test]
fn kind_names_are_the_snake_case_of_every_kind() {
    for raw in 0..=u16::MAX {
        let Some(kind) = Kind::from_u16(raw) else {
            continue;
        };
        let name = kind_name(kind);
        assert_eq!(kind_from_name(name), Some(kind));
        let camel: String = name
            .split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        let expected = match kind {
            Kind::Error => "Error".to_owned(),
            other => format!("{other:?}"),
        };
        assert_eq!(camel, expected);
    }
}
