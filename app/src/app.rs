//! The page: a header (presets, language, navigation) over the editor, the data preview or the
//! jobs views.

use leptos::prelude::*;
use whet_shared::fields::Group;
use whet_shared::{presets, share};

use crate::command::{CommandPanel, ImportBox, SharePanel, SubmitPanel};
use crate::compare::CompareView;
use crate::data::DataView;
use crate::derived::DerivedPanel;
use crate::form::GroupSection;
use crate::i18n::{t, Lang};
use crate::jobs::{JobList, JobView};
use crate::route::{self, Route};
use crate::studio::{use_studio, Studio};
use crate::{api, command};

#[component]
pub fn App() -> impl IntoView {
    let studio = Studio::new();
    provide_context(studio);
    let route = RwSignal::new(route::current());

    load_from_hash(studio);
    if let Some(id) = route::short_share_id() {
        command::load_short_link(studio, id);
    }
    api::detect_backend(studio);
    let _listener = window_event_listener(leptos::ev::hashchange, move |_| {
        route.set(route::current());
        load_from_hash(studio);
    });

    let lang = studio.lang;
    view! {
        <header class="top">
            <h1>"whet studio"</h1>
            <nav>
                <a href="#/" id="nav-editor" class:active=move || route.get() == Route::Editor>
                    {t(lang, "Editor", "编辑")}
                </a>
                <Show when=move || studio.backend.get()>
                    <a href="#/data" id="nav-data" class:active=move || route.get() == Route::Data>
                        {t(lang, "Data", "数据")}
                    </a>
                </Show>
                <a
                    href="#/jobs"
                    id="nav-jobs"
                    class:active=move || matches!(route.get(), Route::Jobs | Route::Job(_) | Route::Compare(_))
                >
                    {t(lang, "Jobs", "任务")}
                </a>
            </nav>
            <LangSwitch />
        </header>
        {move || match route.get() {
            Route::Editor => view! { <Editor /> }.into_any(),
            Route::Data => view! { <DataView /> }.into_any(),
            Route::Jobs => view! { <JobList /> }.into_any(),
            Route::Job(id) => view! { <JobView id /> }.into_any(),
            Route::Compare(ids) => view! { <CompareView ids /> }.into_any(),
        }}
    }
}

/// `#cfg=<code>` restores a shared config, offline.
fn load_from_hash(studio: Studio) {
    let hash = route::hash();
    if let Some(code) = hash.strip_prefix("#cfg=") {
        match share::decode(code) {
            Ok(config) => studio.replace(config),
            Err(diagnostics) => studio.load_errors.set(diagnostics.0),
        }
    }
}

#[component]
fn LangSwitch() -> impl IntoView {
    let studio = use_studio();
    let next = move || match studio.lang.get() {
        Lang::En => Lang::Zh,
        Lang::Zh => Lang::En,
    };
    view! {
        <button id="lang" class="lang" title="language / 语言" on:click=move |_| studio.set_lang(next())>
            {move || match next() {
                Lang::Zh => "中文",
                Lang::En => "English",
            }}
        </button>
    }
}

#[component]
fn Presets() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    view! {
        <div class="presets">
            <span class="label">{t(lang, "Presets:", "预设：")}</span>
            {presets::PRESETS
                .iter()
                .map(|preset| {
                    view! {
                        <button
                            class="preset"
                            data-preset=preset.id
                            on:click=move |_| studio.replace(preset.config())
                        >
                            {move || lang.get().pick(preset.title_en, preset.title_zh).to_string()}
                        </button>
                    }
                })
                .collect_view()}
        </div>
    }
}

#[component]
fn Editor() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    view! {
        <Presets />
        <Show when=move || studio.load_errors.with(|e| !e.is_empty())>
            <div class="load-errors" id="load-errors">
                <strong>{t(lang, "The shared config did not load:", "分享的配置未能加载：")}</strong>
                {move || crate::form::diagnostic_list(studio.load_errors.get(), lang.get())}
            </div>
        </Show>
        <main class="editor">
            <section class="form" id="form">
                {Group::ALL.iter().map(|group| view! { <GroupSection group=*group /> }).collect_view()}
            </section>
            <aside class="side">
                <DerivedPanel />
                <CommandPanel />
                <ImportBox />
                <SharePanel />
                <SubmitPanel />
            </aside>
        </main>
    }
}
