//! Rows in ms-swift's dataset formats become conversations: messages (also `conversation(s)`
//! with `from`/`value` keys), sharegpt pairs, alpaca, and query/response/history — with
//! ms-swift's column aliases, and its rule that an alias is renamed only when it is the one
//! column mapping to its target.
//!
//! Unlike ms-swift, an assistant message's `reasoning_content` is kept (it becomes the think
//! block), and `liucong/Chinese-DeepSeek-R1-Distill-data-110k` rows keep their reasoning.

use serde_json::{Map, Value};

use super::{Conversation, Message, Role};

/// How a dataset's rows are read, decided by its registration (or auto-detected per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// Detect per row, as ms-swift's AutoPreprocessor does.
    Auto,
    /// `liucong/Chinese-DeepSeek-R1-Distill-data-110k`: input, content, reasoning_content.
    R1Distill,
}

/// Why a row could not be read (the row is dropped, or with `--strict` the run stops).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowError {
    #[error("row is not a JSON object")]
    NotAnObject,
    #[error("no messages, query/response or instruction/output columns")]
    NoConversation,
    #[error("message {0} has an unknown role `{1}`")]
    UnknownRole(usize, String),
    #[error("message {0} has no text content")]
    NoContent(usize),
    #[error("the conversation has no assistant reply to train on")]
    NoAssistant,
    #[error("`{0}` is not valid: {1}")]
    BadColumn(&'static str, String),
}

const QUERY_ALIASES: &[&str] = &[
    "query",
    "prompt",
    "input",
    "instruction",
    "question",
    "problem",
];
const RESPONSE_ALIASES: &[&str] = &[
    "response",
    "answer",
    "output",
    "targets",
    "target",
    "answer_key",
    "answers",
    "solution",
    "text",
    "completion",
    "content",
];
const SYSTEM_ALIASES: &[&str] = &["system", "system_prompt"];

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        // A list response (RANDOM_DATASET_RESPONSE aside, ms-swift takes the first).
        Value::Array(items) => items.first().and_then(text_of),
        _ => None,
    }
}

/// The one column among `aliases` present in the row; `None` when none or several are.
fn unique_alias<'a>(row: &'a Map<String, Value>, aliases: &[&str]) -> Option<&'a Value> {
    let mut found = aliases
        .iter()
        .filter_map(|a| row.get(*a))
        .filter(|v| !v.is_null());
    let first = found.next()?;
    match found.next() {
        Some(_) => None,
        None => Some(first),
    }
}

fn role_of(name: &str) -> Option<Role> {
    match name {
        "system" => Some(Role::System),
        "user" | "human" => Some(Role::User),
        "assistant" | "gpt" | "bot" => Some(Role::Assistant),
        "tool" | "tool_response" | "function_response" | "observation" | "observations" => {
            Some(Role::Tool)
        }
        _ => None,
    }
}

/// Which of the formats a row is in, as ms-swift's AutoPreprocessor tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowKind {
    /// `messages` (also `conversation(s)`, sharegpt pairs, `from`/`value` keys).
    Messages,
    /// instruction/input/output.
    Alpaca,
    /// query/response (and their aliases), with an optional history.
    QueryResponse,
    /// `liucong/Chinese-DeepSeek-R1-Distill-data-110k`'s input, content, reasoning_content.
    R1Distill,
}

impl RowKind {
    /// The name the dataset preview reports.
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Messages => "messages",
            RowKind::Alpaca => "alpaca",
            RowKind::QueryResponse => "query_response",
            RowKind::R1Distill => "r1_distill",
        }
    }
}

const MESSAGES_KEYS: [&str; 3] = ["messages", "conversation", "conversations"];

/// The row's format: the dataset's registration decides, else the row's columns.
pub fn row_kind(row: &Map<String, Value>, format: RowFormat) -> RowKind {
    match format {
        RowFormat::R1Distill => RowKind::R1Distill,
        RowFormat::Auto if MESSAGES_KEYS.iter().any(|k| row.contains_key(*k)) => RowKind::Messages,
        RowFormat::Auto if row.contains_key("instruction") && row.contains_key("input") => {
            RowKind::Alpaca
        }
        RowFormat::Auto => RowKind::QueryResponse,
    }
}

/// Converts one row.
pub fn row_to_conversation(row: &Value, format: RowFormat) -> Result<Conversation, RowError> {
    row_to_conversation_of_kind(row, format).map(|(conversation, _)| conversation)
}

/// Converts one row; also answers the format it was read in.
pub fn row_to_conversation_of_kind(
    row: &Value,
    format: RowFormat,
) -> Result<(Conversation, RowKind), RowError> {
    let row = row.as_object().ok_or(RowError::NotAnObject)?;
    let kind = row_kind(row, format);
    let conversation = match kind {
        RowKind::R1Distill => r1_distill(row)?,
        RowKind::Messages => {
            let messages = MESSAGES_KEYS
                .iter()
                .find_map(|k| row.get(*k))
                .ok_or(RowError::NoConversation)?;
            let system = unique_alias(row, SYSTEM_ALIASES).and_then(text_of);
            messages_format(messages, system)?
        }
        RowKind::Alpaca => alpaca(row)?,
        RowKind::QueryResponse => query_response(row)?,
    };
    if !conversation
        .messages
        .iter()
        .any(|m| m.role == Role::Assistant)
    {
        return Err(RowError::NoAssistant);
    }
    Ok((conversation, kind))
}

fn messages_format(messages: &Value, system: Option<String>) -> Result<Conversation, RowError> {
    let items = match messages {
        Value::Array(items) => items.clone(),
        // Some exports store the list as a JSON string.
        Value::String(text) => serde_json::from_str::<Vec<Value>>(text)
            .map_err(|e| RowError::BadColumn("messages", e.to_string()))?,
        _ => return Err(RowError::BadColumn("messages", "not a list".into())),
    };
    let mut out = Vec::new();
    if let Some(system) = system.filter(|s| !s.is_empty()) {
        out.push(Message::new(Role::System, system));
    }
    for (index, item) in items.iter().enumerate() {
        let item = item.as_object().ok_or(RowError::NoContent(index))?;
        // sharegpt pairs: {"human": ..., "assistant": ...}
        if item.contains_key("human")
            || (item.contains_key("assistant") && !item.contains_key("role"))
        {
            if let Some(q) = item.get("human").and_then(text_of) {
                out.push(Message::new(Role::User, q));
            }
            if let Some(a) = item
                .get("assistant")
                .or_else(|| item.get("gpt"))
                .and_then(text_of)
            {
                out.push(Message::new(Role::Assistant, a));
            }
            continue;
        }
        let role_name = item
            .get("role")
            .or_else(|| item.get("from"))
            .and_then(|r| r.as_str())
            .unwrap_or("");
        let role = role_of(role_name)
            .ok_or_else(|| RowError::UnknownRole(index, role_name.to_string()))?;
        let content = item
            .get("content")
            .or_else(|| item.get("value"))
            .and_then(text_of)
            .ok_or(RowError::NoContent(index))?;
        let mut message = Message::new(role, content);
        if role == Role::Assistant {
            message.reasoning_content = item.get("reasoning_content").and_then(text_of);
            message.loss = item.get("loss").and_then(|l| l.as_bool());
        }
        out.push(message);
    }
    Ok(Conversation { messages: out })
}

fn alpaca(row: &Map<String, Value>) -> Result<Conversation, RowError> {
    let instruction = row.get("instruction").and_then(text_of).unwrap_or_default();
    let input = row.get("input").and_then(text_of).unwrap_or_default();
    let query = match (instruction.is_empty(), input.is_empty()) {
        (false, false) => format!("{instruction}\n{input}"),
        (false, true) => instruction,
        (true, _) => input,
    };
    let response = row
        .get("output")
        .or_else(|| row.get("response"))
        .and_then(text_of)
        .ok_or(RowError::NoConversation)?;
    let system = row.get("system").and_then(text_of);
    Ok(single_turn(system, query, response, Vec::new()))
}

fn query_response(row: &Map<String, Value>) -> Result<Conversation, RowError> {
    let query = unique_alias(row, QUERY_ALIASES).and_then(text_of);
    let response = unique_alias(row, RESPONSE_ALIASES).and_then(text_of);
    let (Some(query), Some(response)) = (query, response) else {
        return Err(RowError::NoConversation);
    };
    let system = unique_alias(row, SYSTEM_ALIASES).and_then(text_of);
    let history = match row.get("history") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => serde_json::from_str::<Vec<(String, String)>>(text)
            .map_err(|e| RowError::BadColumn("history", e.to_string()))?,
        Some(value) => serde_json::from_value::<Vec<(String, String)>>(value.clone())
            .map_err(|e| RowError::BadColumn("history", e.to_string()))?,
    };
    Ok(single_turn(system, query, response, history))
}

fn single_turn(
    system: Option<String>,
    query: String,
    response: String,
    history: Vec<(String, String)>,
) -> Conversation {
    let mut messages = Vec::new();
    if let Some(system) = system.filter(|s| !s.is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    for (q, a) in history {
        messages.push(Message::new(Role::User, q));
        messages.push(Message::new(Role::Assistant, a));
    }
    messages.push(Message::new(Role::User, query));
    messages.push(Message::new(Role::Assistant, response));
    Conversation { messages }
}

/// The raw R1 distillation rows: the reasoning becomes the think block (ms-swift drops it).
fn r1_distill(row: &Map<String, Value>) -> Result<Conversation, RowError> {
    let query = row
        .get("input")
        .and_then(text_of)
        .ok_or(RowError::NoConversation)?;
    let content = row
        .get("content")
        .and_then(text_of)
        .ok_or(RowError::NoConversation)?;
    let response = match row.get("reasoning_content").and_then(text_of) {
        Some(reasoning) => format!("<think>\n{reasoning}\n</think>\n\n{content}"),
        None => content,
    };
    Ok(single_turn(None, query, response, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roles(c: &Conversation) -> Vec<Role> {
        c.messages.iter().map(|m| m.role).collect()
    }

    #[test]
    fn messages_with_reasoning_and_sharegpt_keys() {
        let c = row_to_conversation(
            &json!({"messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A", "reasoning_content": "R"}]}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(roles(&c), vec![Role::System, Role::User, Role::Assistant]);
        assert_eq!(c.messages[2].reasoning_content.as_deref(), Some("R"));

        let c = row_to_conversation(
            &json!({"system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(roles(&c), vec![Role::System, Role::User, Role::Assistant]);
        let c = row_to_conversation(
            &json!({"conversation": [{"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}]}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(c.messages.len(), 4);
    }

    #[test]
    fn alpaca_and_query_response_with_aliases() {
        let c = row_to_conversation(
            &json!({"instruction": "Translate", "input": "hello", "output": "你好"}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(c.messages[0].content, "Translate\nhello");
        assert_eq!(c.messages[1].content, "你好");
        let c = row_to_conversation(
            &json!({"instruction": "Say hi", "input": "", "output": "hi"}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(c.messages[0].content, "Say hi");

        let c = row_to_conversation(
            &json!({"question": "1+1?", "answer": "2", "history": [["hi", "hello"]], "system_prompt": "S"}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(
            roles(&c),
            vec![
                Role::System,
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant
            ]
        );
        assert_eq!(c.messages[3].content, "1+1?");
        // history as a string literal
        let c = row_to_conversation(
            &json!({"query": "q", "response": "r", "history": "[[\"a\", \"b\"]]"}),
            RowFormat::Auto,
        )
        .unwrap();
        assert_eq!(c.messages.len(), 4);
    }

    #[test]
    fn ambiguous_aliases_are_not_renamed() {
        // Two query aliases: neither is used, so the row has no query.
        let err = row_to_conversation(
            &json!({"prompt": "a", "question": "b", "response": "r"}),
            RowFormat::Auto,
        )
        .unwrap_err();
        assert_eq!(err, RowError::NoConversation);
    }

    #[test]
    fn r1_distill_keeps_the_reasoning() {
        let row = json!({"input": "1+1=?", "content": "2", "reasoning_content": "one plus one", "repo_name": "x", "score": 9});
        let c = row_to_conversation(&row, RowFormat::R1Distill).unwrap();
        assert_eq!(
            c.messages[1].content,
            "<think>\none plus one\n</think>\n\n2"
        );
        // Read without its registration it would lose the reasoning, as ms-swift does.
        let auto = row_to_conversation(&row, RowFormat::Auto).unwrap();
        assert_eq!(auto.messages[1].content, "2");
    }

    #[test]
    fn malformed_rows_are_errors() {
        assert_eq!(
            row_to_conversation(&json!([1, 2]), RowFormat::Auto).unwrap_err(),
            RowError::NotAnObject
        );
        assert!(matches!(
            row_to_conversation(
                &json!({"messages": [{"role": "wizard", "content": "x"}]}),
                RowFormat::Auto
            ),
            Err(RowError::UnknownRole(0, _))
        ));
        assert_eq!(
            row_to_conversation(
                &json!({"messages": [{"role": "user", "content": "x"}]}),
                RowFormat::Auto
            )
            .unwrap_err(),
            RowError::NoAssistant
        );
        assert!(row_to_conversation(&json!({"foo": 1}), RowFormat::Auto).is_err());
    }
}
