//! `cargo xtask demo-data`: writes the demo's synthetic task to examples/demo/.
//!
//! The task is two-number addition, asked in English or Chinese, answered with a short think
//! block (the assistant's `reasoning_content`, rendered as `<think>...</think>`) that adds
//! column by column (least significant digit first, with carries) and then the
//! sum alone, so an answer can be checked exactly. Train, validation and held-out test sets use
//! disjoint problems; the generator is seeded, so the files are reproducible byte for byte.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const TRAIN_ROWS: usize = 4000;
pub const VAL_ROWS: usize = 200;
pub const TEST_ROWS: usize = 100;
const SEED: u64 = 20261128;
const MAX_OPERAND: u32 = 99;

/// The column-by-column addition, e.g. 47 + 38 -> "7+8=15\n4+3+1=8".
pub fn think(a: u32, b: u32) -> String {
    let (mut x, mut y, mut carry) = (a, b, 0);
    let mut lines = Vec::new();
    loop {
        let (dx, dy) = (x % 10, y % 10);
        let sum = dx + dy + carry;
        let mut line = format!("{dx}+{dy}");
        if carry > 0 {
            let _ = write!(line, "+{carry}");
        }
        let _ = write!(line, "={sum}");
        lines.push(line);
        carry = sum / 10;
        x /= 10;
        y /= 10;
        if x == 0 && y == 0 {
            if carry > 0 {
                lines.push(format!("carry {carry}"));
            }
            break;
        }
    }
    lines.join("\n")
}

fn row(a: u32, b: u32, chinese: bool) -> serde_json::Value {
    let question = if chinese {
        format!("计算 {a} + {b}")
    } else {
        format!("What is {a} + {b}?")
    };
    serde_json::json!({
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": (a + b).to_string(), "reasoning_content": think(a, b)}
        ]
    })
}

pub fn write(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut used = BTreeSet::new();
    for (name, rows) in [
        ("test.jsonl", TEST_ROWS),
        ("val.jsonl", VAL_ROWS),
        ("train.jsonl", TRAIN_ROWS),
    ] {
        let mut text = String::new();
        let mut written = 0;
        while written < rows {
            let (a, b) = (
                rng.random_range(0..=MAX_OPERAND),
                rng.random_range(0..=MAX_OPERAND),
            );
            // Held-out problems never appear in training; training may repeat its own.
            if name != "train.jsonl" && !used.insert((a, b)) {
                continue;
            }
            if name == "train.jsonl" && used.contains(&(a, b)) {
                continue;
            }
            text.push_str(&row(a, b, rng.random_bool(0.5)).to_string());
            text.push('\n');
            written += 1;
        }
        std::fs::write(dir.join(name), text)?;
        eprintln!("wrote {rows} rows to {}", dir.join(name).display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinks_column_by_column() {
        assert_eq!(think(47, 38), "7+8=15\n4+3+1=8");
        assert_eq!(think(5, 7), "5+7=12\ncarry 1");
        assert_eq!(think(90, 9), "0+9=9\n9+0=9");
        assert_eq!(think(0, 0), "0+0=0");
    }
}
