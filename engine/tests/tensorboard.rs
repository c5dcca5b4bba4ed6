//! Our TensorBoard event files read by TensorBoard's own loader (`EventAccumulator`) in the
//! reference Python environment.

#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;

use whet_engine::tensorboard::EventWriter;

#[test]
fn tensorboard_python_reads_our_file() {
    let python = match prerequisites::reference_python_with("tensorboard") {
        Ok(python) => python,
        Err(why) => return prerequisites::skip("tensorboard_python_reads_our_file", &why),
    };
    let dir = std::env::temp_dir().join(format!("whet-tb-python-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut writer = EventWriter::create_for_host(&dir, 1_700_000_000.0, "pyhost").unwrap();
    for step in 1..=3i64 {
        let wall = 1_700_000_000.0 + step as f64;
        writer
            .add_scalar("train/loss", 3.0 / step as f32, step, wall)
            .unwrap();
        writer
            .add_scalar("train/token_acc", 0.25 * step as f32, step, wall)
            .unwrap();
    }
    writer
        .add_scalar("eval/loss", 0.75, 3, 1_700_000_010.0)
        .unwrap();
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
out = {tag: [[e.step, e.value, e.wall_time] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
print(json.dumps(out))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tensorboard failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let series = |tag: &str| -> Vec<(i64, f64)> {
        parsed[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no tag {tag} in {parsed}"))
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(
        series("train/loss"),
        vec![(1, 3.0), (2, 1.5), (3, f64::from(1.0f32))]
    );
    assert_eq!(
        series("train/token_acc"),
        vec![(1, 0.25), (2, 0.5), (3, 0.75)]
    );
    assert_eq!(series("eval/loss"), vec![(3, 0.75)]);
    assert_eq!(parsed["eval/loss"][0][2].as_f64(), Some(1_700_000_010.0));
    std::fs::remove_dir_all(dir).ok();
}
