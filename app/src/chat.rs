//! Chat with a job's checkpoint: `POST /api/jobs/{id}/chat` streams the reply as Server-Sent
//! Events (`text` pieces, then `done` or `error`), read from fetch's body stream since
//! EventSource cannot POST. With "also ask the base model" the same conversation then goes to
//! the model the job started from (one reply per job at a time, so one after the other). The
//! conversation is kept and sent whole; think blocks show muted.

use leptos::prelude::*;
use leptos::task::spawn_local;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::ReadableStreamDefaultReader;
use whet_shared::api::{
    ChatDone, ChatMessage, ChatRequest, CheckpointInfo, CHAT_DONE_EVENT, CHAT_ERROR_EVENT,
    CHAT_TEXT_EVENT,
};
use whet_shared::Diagnostic;

use crate::api;
use crate::form::diagnostic_list;
use crate::i18n::t;
use crate::studio::use_studio;

/// Server-Sent Events read from bytes as they come: complete events out, the rest kept.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Feeds bytes; answers the events (name, data) they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buffer.extend(bytes.iter().filter(|&&b| b != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let frame = String::from_utf8_lossy(&frame);
            let (mut name, mut data) = (String::from("message"), Vec::new());
            for line in frame.lines() {
                let (key, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match key {
                    "event" => name = value.to_string(),
                    "data" => data.push(value),
                    // Comments (keep-alives) and other fields.
                    _ => {}
                }
            }
            if !data.is_empty() {
                events.push((name, data.join("\n")));
            }
        }
        events
    }
}

/// How one reply ended.
enum Ended {
    Done { cancelled: bool },
    Failed(Vec<Diagnostic>),
}

fn chat_error(message: &str) -> Vec<Diagnostic> {
    vec![Diagnostic::error(
        "chat",
        "chat_failed",
        format!("the reply failed: {message}"),
        format!("回复失败：{message}"),
    )]
}

/// Posts `request` and feeds each `text` piece to `piece` until the stream ends.
async fn stream_reply(
    url: &str,
    request: &ChatRequest,
    token: String,
    reader_slot: StoredValue<Option<ReadableStreamDefaultReader>, LocalStorage>,
    mut piece: impl FnMut(&str),
) -> Ended {
    let body = serde_json::to_string(request).unwrap_or_default();
    let response = match api::fetch("POST", url, Some(body), Some(token)).await {
        Ok(response) => response,
        Err(e) => return Ended::Failed(api::unreachable(e)),
    };
    if !(200..300).contains(&response.status()) {
        let text = api::text_of(&response).await;
        return Ended::Failed(api::diagnostics_of(response.status(), &text));
    }
    let Some(reader) = response.body().and_then(|b| {
        b.get_reader()
            .dyn_into::<ReadableStreamDefaultReader>()
            .ok()
    }) else {
        return Ended::Failed(chat_error("the answer has no body"));
    };
    let _ = reader_slot.try_set_value(Some(reader.clone()));
    let mut parser = SseParser::default();
    let ended = 'read: loop {
        let chunk = match JsFuture::from(reader.read()).await {
            Ok(chunk) => chunk,
            Err(_) => break Ended::Failed(chat_error("the stream broke off")),
        };
        let done = js_sys::Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            break Ended::Failed(chat_error("the stream ended without `done`"));
        }
        let Ok(value) = js_sys::Reflect::get(&chunk, &"value".into()) else {
            continue;
        };
        let bytes = js_sys::Uint8Array::new(&value).to_vec();
        for (name, data) in parser.push(&bytes) {
            match name.as_str() {
                CHAT_TEXT_EVENT => {
                    piece(&serde_json::from_str::<String>(&data).unwrap_or(data));
                }
                CHAT_DONE_EVENT => {
                    let cancelled = serde_json::from_str::<ChatDone>(&data)
                        .map(|d| d.cancelled)
                        .unwrap_or(false);
                    break 'read Ended::Done { cancelled };
                }
                CHAT_ERROR_EVENT => {
                    let message = serde_json::from_str::<serde_json::Value>(&data)
                        .ok()
                        .and_then(|v| v.get("message")?.as_str().map(String::from))
                        .unwrap_or(data);
                    break 'read Ended::Failed(chat_error(&message));
                }
                _ => {}
            }
        }
    };
    let _ = reader.cancel();
    let _ = reader_slot.try_set_value(None);
    ended
}

/// One exchange: the user's message, the checkpoint's reply and, when asked, the base model's.
#[derive(Debug, Clone, Default, PartialEq)]
struct Turn {
    user: String,
    reply: String,
    base: Option<String>,
    /// Stopped before it finished.
    cancelled: bool,
    /// The checkpoint's reply is complete (it goes into the conversation sent next).
    complete: bool,
}

/// The conversation so far as messages, then the new user message.
fn messages_of(turns: &[Turn], user: &str) -> Vec<ChatMessage> {
    let message = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let mut messages = Vec::new();
    for turn in turns.iter().filter(|t| t.complete && !t.cancelled) {
        messages.push(message("user", &turn.user));
        messages.push(message("assistant", &turn.reply));
    }
    messages.push(message("user", user));
    messages
}

/// A reply with its `<think>…</think>` blocks apart (an unclosed one runs to the end).
fn segments(text: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<think>") {
        if start > 0 {
            out.push((false, rest[..start].to_string()));
        }
        let inner = &rest[start + "<think>".len()..];
        match inner.find("</think>") {
            Some(end) => {
                out.push((true, inner[..end].to_string()));
                rest = &inner[end + "</think>".len()..];
            }
            None => {
                out.push((true, inner.to_string()));
                rest = "";
            }
        }
    }
    if !rest.is_empty() {
        out.push((false, rest.to_string()));
    }
    out
}

fn reply_view(text: &str) -> impl IntoView {
    segments(text)
        .into_iter()
        .map(|(think, text)| {
            // The blank lines around a think block are the template's, not the answer's.
            let text = text.trim().to_string();
            if think {
                view! { <div class="think">{text}</div> }.into_any()
            } else {
                view! { <span class="answer">{text}</span> }.into_any()
            }
        })
        .collect_view()
}

#[component]
pub fn ChatBox(id: String, checkpoints: RwSignal<Vec<CheckpointInfo>>) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let input = RwSignal::new(String::new());
    let with_base = RwSignal::new(false);
    let max_new_tokens = RwSignal::new("256".to_string());
    let temperature = RwSignal::new("0".to_string());
    let top_p = RwSignal::new("1".to_string());
    let checkpoint = RwSignal::new(String::new());
    let turns = RwSignal::new(Vec::<Turn>::new());
    let busy = RwSignal::new(false);
    let stop = RwSignal::new(false);
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let reader = StoredValue::new_local(None::<ReadableStreamDefaultReader>);
    // Leaving the view stops the reply: the server stops whet when the stream is dropped.
    on_cleanup(move || {
        if let Some(Some(reader)) = reader.try_get_value() {
            let _ = reader.cancel();
        }
    });

    let chat_url = StoredValue::new(format!("/api/jobs/{id}/chat"));
    let send = move || {
        let user = input.get_untracked().trim().to_string();
        if user.is_empty() || busy.get_untracked() {
            return;
        }
        let number = |text: &str, what: &str| -> Result<f64, Vec<Diagnostic>> {
            text.trim().parse::<f64>().map_err(|_| {
                vec![Diagnostic::error(
                    what,
                    "not_a_number",
                    format!("{what}: `{text}` is not a number"),
                    format!("{what}：`{text}` 不是数字"),
                )]
            })
        };
        let settings = (|| {
            Ok::<_, Vec<Diagnostic>>((
                number(&max_new_tokens.get_untracked(), "max_new_tokens")? as u32,
                number(&temperature.get_untracked(), "temperature")?,
                number(&top_p.get_untracked(), "top_p")?,
            ))
        })();
        let (max_new_tokens, temperature, top_p) = match settings {
            Ok(settings) => settings,
            Err(diagnostics) => {
                errors.set(diagnostics);
                return;
            }
        };
        let chosen = checkpoint.get_untracked();
        let mut request = ChatRequest {
            messages: turns.with_untracked(|t| messages_of(t, &user)),
            checkpoint: (!chosen.is_empty()).then_some(chosen),
            base: false,
            max_new_tokens,
            temperature,
            top_p,
        };
        let ask_base = with_base.get_untracked();
        errors.set(Vec::new());
        stop.set(false);
        busy.set(true);
        input.set(String::new());
        turns.update(|t| {
            t.push(Turn {
                user,
                base: ask_base.then(String::new),
                ..Turn::default()
            })
        });
        let token = studio.token.get_untracked();
        let url = chat_url.get_value();
        spawn_local(async move {
            let append = |base: bool| {
                move |piece: &str| {
                    let _ = turns.try_update(|t| {
                        if let Some(turn) = t.last_mut() {
                            match (&mut turn.base, base) {
                                (Some(text), true) => text.push_str(piece),
                                _ => turn.reply.push_str(piece),
                            }
                        }
                    });
                }
            };
            let mut ended =
                stream_reply(&url, &request, token.clone(), reader, append(false)).await;
            if let Ended::Done { cancelled: false } = ended {
                let _ = turns.try_update(|t| {
                    if let Some(turn) = t.last_mut() {
                        turn.complete = true;
                    }
                });
                if ask_base && !stop.get_untracked() {
                    request.base = true;
                    ended = stream_reply(&url, &request, token, reader, append(true)).await;
                }
            }
            match ended {
                Ended::Done { cancelled } => {
                    if cancelled {
                        let _ = turns.try_update(|t| {
                            if let Some(turn) = t.last_mut() {
                                turn.cancelled = true;
                            }
                        });
                    }
                }
                Ended::Failed(diagnostics) => {
                    let _ = errors.try_set(diagnostics);
                }
            }
            let _ = busy.try_set(false);
        });
    };
    let cancel_url = StoredValue::new(format!("/api/jobs/{id}/chat/cancel"));
    let cancel = move |_| {
        stop.set(true);
        let url = cancel_url.get_value();
        let token = studio.token.get_untracked();
        spawn_local(async move {
            match api::request("POST", &url, Some("{}".into()), Some(token)).await {
                // 409: the reply had ended already.
                Ok((200..=299 | 409, _)) => {}
                Ok((code, body)) => {
                    let _ = errors.try_set(api::diagnostics_of(code, &body));
                }
                Err(e) => {
                    let _ = errors.try_set(api::unreachable(e));
                }
            }
        });
    };

    let latest = move || checkpoints.with(|c| c.last().map(|c| c.name.clone()).unwrap_or_default());
    let turn_view = move |(index, turn): (usize, Turn), last: bool| {
        let base = turn.base.clone().map(|text| {
            view! {
                <div class="chat-base">
                    <div class="who">{t(lang, "base model", "基座模型")}</div>
                    <div class="reply" id=last.then_some("chat-base-reply")>{reply_view(&text)}</div>
                </div>
            }
        });
        view! {
            <div class="chat-turn" data-turn=index>
                <div class="chat-user"><span class="who">{t(lang, "you", "你")}</span> " " {turn.user.clone()}</div>
                <div class="chat-answers">
                    <div class="chat-checkpoint">
                        <div class="who">{t(lang, "checkpoint", "检查点")}</div>
                        <div class="reply" id=last.then_some("chat-reply")>{reply_view(&turn.reply)}</div>
                    </div>
                    {base}
                </div>
                {turn.cancelled.then(|| view! { <div class="note">{t(lang, "(stopped)", "（已停止）")}</div> })}
            </div>
        }
    };

    view! {
        <section class="panel chat" id="chat">
            <h3>{t(lang, "Chat with a checkpoint", "与检查点对话")}</h3>
            <div class="chat-history" id="chat-history">
                {move || {
                    let all = turns.get();
                    let n = all.len();
                    all.into_iter().enumerate().map(|turn| {
                        let last = turn.0 + 1 == n;
                        turn_view(turn, last)
                    }).collect_view()
                }}
            </div>
            <textarea
                id="chat-input"
                rows=3
                placeholder=move || lang.get().pick("Ask something…", "输入问题…")
                prop:value=move || input.get()
                on:input=move |ev| input.set(event_target_value(&ev))
                on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                    if ev.key() == "Enter" && (ev.ctrl_key() || ev.meta_key()) {
                        ev.prevent_default();
                        send();
                    }
                }
            ></textarea>
            <div class="chat-settings">
                <label>
                    {t(lang, "checkpoint", "检查点")} " "
                    <select id="chat-checkpoint" class="in" on:change=move |ev| checkpoint.set(event_target_value(&ev))>
                        <option value="" selected=move || checkpoint.get().is_empty()>
                            {move || format!("{} ({})", lang.get().pick("latest", "最新"), latest())}
                        </option>
                        {move || checkpoints.get().into_iter().map(|c| {
                            let (value, selected) = (c.name.clone(), c.name.clone());
                            view! { <option value=value selected=move || checkpoint.get() == selected>{c.name}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>
                    "max_new_tokens "
                    <input id="chat-max-new-tokens" class="in num" type="number" min="1" prop:value=move || max_new_tokens.get() on:input=move |ev| max_new_tokens.set(event_target_value(&ev)) />
                </label>
                <label>
                    "temperature "
                    <input id="chat-temperature" class="in num" type="number" min="0" step="0.1" prop:value=move || temperature.get() on:input=move |ev| temperature.set(event_target_value(&ev)) />
                </label>
                <label>
                    "top_p "
                    <input id="chat-top-p" class="in num" type="number" min="0" max="1" step="0.05" prop:value=move || top_p.get() on:input=move |ev| top_p.set(event_target_value(&ev)) />
                </label>
                <label class="check">
                    <input id="chat-with-base" type="checkbox" prop:checked=move || with_base.get() on:change=move |ev| with_base.set(event_target_checked(&ev)) />
                    " " {t(lang, "also ask the base model", "同时询问基座模型")}
                </label>
            </div>
            <p>
                <button id="chat-send" disabled=move || busy.get() || input.with(|i| i.trim().is_empty()) on:click=move |_| send()>
                    {t(lang, "Send", "发送")}
                </button>
                " "
                <button id="chat-cancel" disabled=move || !busy.get() on:click=cancel>{t(lang, "Stop", "停止")}</button>
                " "
                <button id="chat-clear" disabled=move || busy.get() on:click=move |_| turns.set(Vec::new())>
                    {t(lang, "New conversation", "新对话")}
                </button>
            </p>
            <div id="chat-errors">{move || diagnostic_list(errors.get(), lang.get())}</div>
        </section>
    }
}
