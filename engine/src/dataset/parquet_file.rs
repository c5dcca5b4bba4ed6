//! Parquet data files (most Hugging Face hub datasets): each row becomes a JSON object through
//! the parquet crate's record API, so the row formats see the same values as from jsonl.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};

/// Reads every row of a parquet file; a row that cannot be decoded is an `Err`.
pub(super) fn read_rows(path: &Path) -> Result<Vec<Result<Value, String>>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| format!("not a parquet file: {e}"))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| e.to_string())?
        .map(|row| row.map(|row| row_to_json(&row)).map_err(|e| e.to_string()))
        .collect();
    Ok(rows)
}

fn row_to_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_to_json(field)))
            .collect(),
    )
}

fn field_to_json(field: &Field) -> Value {
    let float = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(x) => float(f64::from(*x)),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        // Unannotated binary columns often hold text; other bytes become a list of numbers.
        Field::Bytes(bytes) => match std::str::from_utf8(bytes.data()) {
            Ok(text) => Value::String(text.to_string()),
            Err(_) => Value::Array(bytes.data().iter().map(|b| Value::from(*b)).collect()),
        },
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => Value::String(field.to_string()),
        Field::Group(row) => row_to_json(row),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => {
            let object: Map<String, Value> = map
                .entries()
                .iter()
                .map(|(key, value)| {
                    let key = match field_to_json(key) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(value))
                })
                .collect();
            Value::Object(object)
        }
    }
}
