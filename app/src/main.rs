//! whet studio: a form over every `swift sft` / `whet sft` field with live diagnostics, derived
//! figures, the command in both dialects, share links and (with a whet-server behind it) jobs
//! and the dataset preview.
//! The page only wires signals to views: validation, derived figures, schedules, share codes
//! and shell import/export all come from whet-shared.

mod api;
mod app;
mod chart;
mod chat;
mod checkpoints;
mod command;
mod compare;
mod data;
mod derived;
mod form;
mod i18n;
mod jobs;
mod route;
mod studio;

fn main() {
    leptos::mount::mount_to_body(app::App);
}
