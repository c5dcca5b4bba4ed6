//! Parity of our built-in Qwen3 templates with the model's own Jinja `chat_template` (the
//! fixture's tokenizer_config.json), rendered by minijinja as transformers'
//! `apply_chat_template` does (trim_blocks, lstrip_blocks, Python string methods).

use std::path::PathBuf;

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::data::{render, render_prompt, RenderOptions, Template};
use crate::dataset::{Conversation, Message};

fn chat_template() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/hf-reference/tokenizer_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} not found ({e})", path.display()));
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["chat_template"].as_str().unwrap().to_string()
}

/// The Python methods the chat template calls (`dict.get`, `str.split/strip/lstrip`), with
/// Python's semantics.
fn python_method(value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str().map(str::to_string));
    match (value.kind(), method) {
        (ValueKind::Map, "get") => {
            let key = args.first().cloned().unwrap_or_default();
            let found = value.get_item(&key)?;
            Ok(if found.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                found
            })
        }
        (ValueKind::String, "split") => {
            let s = value.as_str().unwrap_or_default();
            let sep = arg(0).ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "split()"))?;
            Ok(Value::from(
                s.split(sep.as_str()).map(Value::from).collect::<Vec<_>>(),
            ))
        }
        (ValueKind::String, "strip" | "lstrip" | "rstrip") => {
            let s = value.as_str().unwrap_or_default();
            let chars = arg(0);
            let strip = |c: char| match &chars {
                Some(set) => set.contains(c),
                None => c.is_whitespace(),
            };
            Ok(Value::from(match method {
                "strip" => s.trim_matches(strip),
                "lstrip" => s.trim_start_matches(strip),
                _ => s.trim_end_matches(strip),
            }))
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

/// What the model's chat template renders for `messages`.
fn jinja(messages: &serde_json::Value, add_generation_prompt: bool) -> String {
    let source = chat_template();
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(|_, value, method, args| python_method(value, method, args));
    let template = env.template_from_str(&source).unwrap();
    template
        .render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
        })
        .unwrap()
}

fn options(template: Template) -> RenderOptions {
    RenderOptions {
        template,
        default_system: None,
        disable_ignore_empty_think: false,
    }
}

fn conversation(messages: &serde_json::Value) -> Conversation {
    let messages: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
    Conversation { messages }
}

fn ours(messages: &serde_json::Value, template: Template) -> String {
    render(&conversation(messages), &options(template))
        .into_iter()
        .map(|s| s.text)
        .collect()
}

/// Conversations covering the template's branches: single- and multi-turn, with and without a
/// system message, `reasoning_content` (also empty, also beside an inline block), an inline
/// `<think>...</think>` prefix (also with text before `<think>` and without the opener), and
/// replies with no think block at all.
fn cases() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        (
            "single turn, reasoning_content, system",
            json!([
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 3 x 7?"},
                {"role": "assistant", "content": "3 x 7 = 21.", "reasoning_content": "3 times 7 is 21."}
            ]),
        ),
        (
            "single turn, reasoning_content with surrounding newlines, no system",
            json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "\n\nhello\n", "reasoning_content": "\n\nthink\n\nmore\n"}
            ]),
        ),
        (
            "single turn, inline think prefix",
            json!([
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}
            ]),
        ),
        (
            "inline think without the opener, and text before <think>",
            json!([
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "reasoning only\n</think>\n\nanswer"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "pre<think>x</think>mid</think>\nend"}
            ]),
        ),
        (
            "no think block, no system",
            json!([
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"}
            ]),
        ),
        (
            "empty reasoning_content and reasoning_content beside an inline block",
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1", "reasoning_content": ""},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "<think>\ninline\n</think>\n\na2", "reasoning_content": "given"}
            ]),
        ),
        (
            "multi-turn mixing reasoning_content, inline and plain replies, with system",
            json!([
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "用一句话介绍你自己。"},
                {"role": "assistant", "content": "我是一个乐于助人的助手。", "reasoning_content": "我是一个语言模型。"},
                {"role": "user", "content": "And 1+1?"},
                {"role": "assistant", "content": "<think>\none plus one\n</think>\n\n2"},
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You're welcome."}
            ]),
        ),
    ]
}

fn has_reasoning(messages: &serde_json::Value) -> bool {
    messages.as_array().unwrap().iter().any(|m| {
        m["role"] == "assistant"
            && (m.get("reasoning_content").is_some()
                || m["content"].as_str().unwrap().contains("</think>"))
    })
}

#[test]
fn thinking_templates_render_what_the_chat_template_renders() {
    let mut hybrid_checked = 0;
    for (name, messages) in cases() {
        let expected = jinja(&messages, false);
        // Thinking-2507: every reply, reasoning or not, gets the think block the chat
        // template writes.
        assert_eq!(
            ours(&messages, Template::Qwen3Thinking),
            expected,
            "qwen3_thinking: {name}"
        );
        // The hybrid template renders the same text (an empty block for a reply without
        // reasoning, as the chat template does); only its labels differ.
        assert_eq!(ours(&messages, Template::Qwen3), expected, "qwen3: {name}");
        hybrid_checked += has_reasoning(&messages) as usize;
    }
    assert!(hybrid_checked >= 5);
}

#[test]
fn reply_without_reasoning_gets_the_empty_block_trained_only_by_qwen3_thinking() {
    let messages = serde_json::json!([
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"}
    ]);
    let expected = jinja(&messages, false);
    assert!(expected.contains("<|im_start|>assistant\n<think>\n\n</think>\n\nhi there<|im_end|>"));
    let trained = |template| -> Vec<String> {
        render(&conversation(&messages), &options(template))
            .into_iter()
            .filter(|s| s.trained)
            .map(|s| s.text)
            .collect()
    };
    assert_eq!(trained(Template::Qwen3), vec!["hi there<|im_end|>"]);
    assert_eq!(
        trained(Template::Qwen3Thinking),
        vec!["<think>\n\n</think>\n\nhi there<|im_end|>"]
    );
    let mut keep_empty = options(Template::Qwen3);
    keep_empty.disable_ignore_empty_think = true;
    let kept: Vec<String> = render(&conversation(&messages), &keep_empty)
        .into_iter()
        .filter(|s| s.trained)
        .map(|s| s.text)
        .collect();
    assert_eq!(kept, vec!["<think>\n\n</think>\n\nhi there<|im_end|>"]);
}

#[test]
fn prompts_render_what_the_chat_template_renders_with_add_generation_prompt() {
    for (name, mut messages) in cases() {
        // The prompt for the last reply: the conversation up to its user message.
        messages.as_array_mut().unwrap().pop();
        let conversation = conversation(&messages);
        let expected = jinja(&messages, true);
        assert!(expected.ends_with("<|im_start|>assistant\n"), "{name}");
        // The fixture's chat template ends its generation prompt at `<|im_start|>assistant\n`.
        // The official Thinking-2507 template goes on with `<think>\n` (the model never emits
        // the opener itself), and ms-swift's qwen3_thinking template mirrors that with its
        // thinking_prefix; that prefix is ours to add, so the Jinja text plus `<think>\n` is
        // what our prompt must be.
        assert_eq!(
            render_prompt(&conversation, &options(Template::Qwen3Thinking), true),
            format!("{expected}<think>\n"),
            "qwen3_thinking prompt: {name}"
        );
        // The hybrid template with thinking on adds nothing after the header.
        assert_eq!(
            render_prompt(&conversation, &options(Template::Qwen3), true),
            expected,
            "qwen3 prompt: {name}"
        );
        // With thinking off it closes an empty block, as the official hybrid template does for
        // enable_thinking=False (the fixture's template has no such switch).
        assert_eq!(
            render_prompt(&conversation, &options(Template::Qwen3), false),
            format!("{expected}<think>\n\n</think>\n\n"),
            "qwen3 prompt without thinking: {name}"
        );
    }
}
