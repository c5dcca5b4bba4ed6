//! The language switch: every label, help text and diagnostic comes in English and Chinese.

use leptos::prelude::*;
use whet_shared::Diagnostic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    pub fn pick<'a>(self, en: &'a str, zh: &'a str) -> &'a str {
        match self {
            Lang::En => en,
            Lang::Zh => zh,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        }
    }

    pub fn from_code(code: &str) -> Option<Lang> {
        match code {
            "en" => Some(Lang::En),
            "zh" => Some(Lang::Zh),
            _ => None,
        }
    }

    pub fn message(self, d: &Diagnostic) -> String {
        self.pick(&d.message_en, &d.message_zh).to_string()
    }

    pub fn fix(self, d: &Diagnostic) -> String {
        let fix = self.pick(&d.fix, &d.fix_zh);
        // A diagnostic with only an English fix still shows it.
        if fix.is_empty() {
            d.fix.clone()
        } else {
            fix.to_string()
        }
    }
}

/// A label in the current language, for use in a view.
pub fn t(
    lang: RwSignal<Lang>,
    en: &'static str,
    zh: &'static str,
) -> impl Fn() -> &'static str + Copy + Send + Sync + 'static {
    move || lang.get().pick(en, zh)
}
