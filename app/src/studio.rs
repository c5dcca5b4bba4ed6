//! The studio's state: the config being edited, the language, the GPU and row count the
//! estimate uses, and the check report (diagnostics + derived figures) recomputed from them on
//! every change. Shared through context; every field is a Copy signal.

use std::collections::BTreeMap;

use leptos::prelude::*;
use serde_json::Value;
use whet_shared::fields::Field;
use whet_shared::gpus::{self, Gpu};
use whet_shared::{check, form, CheckContext, CheckReport, Diagnostic, Diagnostics, JobConfig};

use crate::i18n::Lang;

#[derive(Clone, Copy)]
pub struct Studio {
    pub lang: RwSignal<Lang>,
    pub config: RwSignal<JobConfig>,
    /// Bumped when the whole config is replaced (preset, import, share link): text inputs
    /// re-read their value then, and not while the user types.
    pub revision: RwSignal<u64>,
    /// Values typed that do not fit their field (the config keeps the last good value).
    pub input_errors: RwSignal<BTreeMap<&'static str, Diagnostic>>,
    pub gpu: RwSignal<&'static Gpu>,
    pub dataset_rows: RwSignal<Option<u64>>,
    pub report: Memo<CheckReport>,
    /// How long the last check (validate + derive) took, in milliseconds.
    pub check_ms: StoredValue<f64>,
    /// Diagnostics of a share link or short link that did not load.
    pub load_errors: RwSignal<Vec<Diagnostic>>,
    /// Whether a whet-server answers /api/health on this origin.
    pub backend: RwSignal<bool>,
    pub token: RwSignal<String>,
}

pub fn now_ms() -> f64 {
    window().performance().map(|p| p.now()).unwrap_or(0.0)
}

pub fn storage_get(key: &str) -> Option<String> {
    window()
        .local_storage()
        .ok()
        .flatten()?
        .get_item(key)
        .ok()
        .flatten()
}

pub fn storage_set(key: &str, value: &str) {
    if let Some(storage) = window().local_storage().ok().flatten() {
        let _ = storage.set_item(key, value);
    }
}

impl Studio {
    pub fn new() -> Studio {
        let lang = storage_get("whet.lang")
            .and_then(|c| Lang::from_code(&c))
            .unwrap_or_else(|| {
                let browser = window().navigator().language().unwrap_or_default();
                if browser.starts_with("zh") {
                    Lang::Zh
                } else {
                    Lang::En
                }
            });
        let config = RwSignal::new(JobConfig::default());
        let gpu = RwSignal::new(gpus::default_gpu());
        let dataset_rows = RwSignal::new(None);
        let check_ms = StoredValue::new(0.0);
        let report = Memo::new(move |_| {
            let context = CheckContext {
                model_facts: None,
                dataset_rows: dataset_rows.get(),
                gpu: gpu.get(),
            };
            config.with(|config| {
                let start = now_ms();
                let report = check(config, &context);
                check_ms.set_value(now_ms() - start);
                report
            })
        });
        Studio {
            lang: RwSignal::new(lang),
            config,
            revision: RwSignal::new(0),
            input_errors: RwSignal::new(BTreeMap::new()),
            gpu,
            dataset_rows,
            report,
            check_ms,
            load_errors: RwSignal::new(Vec::new()),
            backend: RwSignal::new(false),
            token: RwSignal::new(storage_get("whet.token").unwrap_or_default()),
        }
    }

    pub fn set_lang(self, lang: Lang) {
        storage_set("whet.lang", lang.code());
        self.lang.set(lang);
    }

    /// Replaces the whole config (preset, import, share link).
    pub fn replace(self, config: JobConfig) {
        self.input_errors.set(BTreeMap::new());
        self.load_errors.set(Vec::new());
        self.config.set(config);
        self.revision.update(|r| *r += 1);
    }

    fn apply(self, field: &'static Field, result: Result<JobConfig, Diagnostic>) {
        match result {
            Ok(config) => {
                if self
                    .input_errors
                    .with_untracked(|e| e.contains_key(field.name))
                {
                    self.input_errors.update(|e| {
                        e.remove(field.name);
                    });
                }
                self.config.set(config);
            }
            Err(diagnostic) => self.input_errors.update(|e| {
                e.insert(field.name, diagnostic);
            }),
        }
    }

    /// The user typed `text` into a field's input.
    pub fn set_text(self, field: &'static Field, text: &str) {
        let result = self
            .config
            .with_untracked(|c| form::set_text(c, field, text));
        self.apply(field, result);
    }

    pub fn set_list(self, field: &'static Field, items: &[String]) {
        let result = self
            .config
            .with_untracked(|c| form::set_list(c, field, items));
        self.apply(field, result);
    }

    pub fn set_value(self, field: &'static Field, value: Value) {
        let result = self.config.with_untracked(|c| {
            form::set_value(c, field, value).map_err(|d: Diagnostics| {
                d.0.into_iter().next().unwrap_or_else(|| {
                    Diagnostic::error(field.name, "wrong_type", "invalid value", "取值无效")
                })
            })
        });
        self.apply(field, result);
    }

    /// Every diagnostic about one field: what was typed, then what validation says.
    pub fn field_diagnostics(self, field: &'static Field) -> Vec<Diagnostic> {
        let mut out: Vec<Diagnostic> = self
            .input_errors
            .with(|e| e.get(field.name).cloned())
            .into_iter()
            .collect();
        self.report.with(|r| {
            out.extend(
                r.diagnostics
                    .iter()
                    .filter(|d| d.field == field.name)
                    .cloned(),
            )
        });
        out
    }
}

pub fn use_studio() -> Studio {
    expect_context::<Studio>()
}
