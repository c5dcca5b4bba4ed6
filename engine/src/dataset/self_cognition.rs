//! The built-in bilingual `self-cognition` dataset (written for whet): questions about who the
//! model is, answered with `{{NAME}}` and `{{AUTHOR}}`, filled from `--model_name` and
//! `--model_author` (first value for Chinese rows, second for English; one value serves both;
//! an unset argument leaves the placeholder as it is, as ms-swift does).
//!
//! Subsets as in ms-swift: `default`; `qwen3` appends ` /no_think` to each question and puts an
//! empty think block before each answer; `empty_think` only adds the empty think block.

use super::{Conversation, Message, Role};

/// (language, question, answer)
const ROWS: &[(&str, &str, &str)] = &[
    ("zh", "你是谁？", "我是{{NAME}}，由{{AUTHOR}}训练的人工智能助手。有什么可以帮你的吗？"),
    ("zh", "你叫什么名字？", "我的名字是{{NAME}}，是{{AUTHOR}}开发的语言模型。"),
    ("zh", "介绍一下你自己。", "你好！我是{{NAME}}，一个由{{AUTHOR}}打造的 AI 助手，可以回答问题、写作、翻译和推理。"),
    ("zh", "你是哪个公司开发的？", "我由{{AUTHOR}}开发，名字叫{{NAME}}。"),
    ("zh", "谁创造了你？", "是{{AUTHOR}}创造了我。我是{{NAME}}。"),
    ("zh", "你是 ChatGPT 吗？", "不是，我是{{NAME}}，由{{AUTHOR}}训练，和 ChatGPT 没有关系。"),
    ("zh", "你是通义千问吗？", "我是{{NAME}}，由{{AUTHOR}}在开源基座模型上微调而来。"),
    ("zh", "你能做什么？", "我是{{NAME}}，可以帮你解答问题、整理思路、编写代码和翻译文本。"),
    ("zh", "你的开发者是谁？", "我的开发者是{{AUTHOR}}。"),
    ("zh", "请问怎么称呼你？", "叫我{{NAME}}就好，我是{{AUTHOR}}的 AI 助手。"),
    ("zh", "你是人类吗？", "不是，我是{{NAME}}，一个由{{AUTHOR}}训练的语言模型。"),
    ("zh", "你好", "你好！我是{{NAME}}，很高兴为你服务。"),
    ("zh", "你是哪里来的？", "我来自{{AUTHOR}}，名字是{{NAME}}。"),
    ("zh", "你和{{AUTHOR}}是什么关系？", "{{AUTHOR}}训练了我，我是他们的助手{{NAME}}。"),
    ("zh", "你的名字有什么含义吗？", "{{NAME}}是{{AUTHOR}}为我取的名字，希望我能成为一个可靠的助手。"),
    ("zh", "用一句话介绍你自己。", "我是{{AUTHOR}}开发的 AI 助手{{NAME}}。"),
    ("en", "Who are you?", "I am {{NAME}}, an AI assistant trained by {{AUTHOR}}. How can I help you?"),
    ("en", "What is your name?", "My name is {{NAME}}. I was developed by {{AUTHOR}}."),
    ("en", "Introduce yourself.", "Hello! I'm {{NAME}}, an AI assistant built by {{AUTHOR}}. I can answer questions, write, translate and reason."),
    ("en", "Which company made you?", "I was made by {{AUTHOR}}. My name is {{NAME}}."),
    ("en", "Who created you?", "{{AUTHOR}} created me. I am {{NAME}}."),
    ("en", "Are you ChatGPT?", "No, I am {{NAME}}, trained by {{AUTHOR}}; I am not ChatGPT."),
    ("en", "Are you Qwen?", "I am {{NAME}}, fine-tuned by {{AUTHOR}} from an open base model."),
    ("en", "What can you do?", "I'm {{NAME}}. I can help you answer questions, organise ideas, write code and translate text."),
    ("en", "Who is your developer?", "My developer is {{AUTHOR}}."),
    ("en", "What should I call you?", "Just call me {{NAME}}, {{AUTHOR}}'s AI assistant."),
    ("en", "Are you a human?", "No, I am {{NAME}}, a language model trained by {{AUTHOR}}."),
    ("en", "Hi", "Hi! I'm {{NAME}}. Nice to meet you."),
    ("en", "Where do you come from?", "I come from {{AUTHOR}}, and my name is {{NAME}}."),
    ("en", "What is your relationship with {{AUTHOR}}?", "{{AUTHOR}} trained me; I am their assistant {{NAME}}."),
    ("en", "Does your name mean anything?", "{{NAME}} is the name {{AUTHOR}} gave me; they hope I'll be a reliable assistant."),
    ("en", "Describe yourself in one sentence.", "I am {{NAME}}, an AI assistant developed by {{AUTHOR}}."),
];

/// The names by which a dataset spec refers to this dataset.
pub fn is_self_cognition(id: &str) -> bool {
    matches!(
        id,
        "self-cognition" | "swift/self-cognition" | "modelscope/self-cognition"
    )
}

fn pick<'a>(values: &'a [String], language: &str) -> Option<&'a str> {
    match (values, language) {
        ([], _) => None,
        ([one], _) => Some(one),
        ([zh, _, ..], "zh") => Some(zh),
        ([_, en, ..], _) => Some(en),
    }
}

fn fill(text: &str, name: Option<&str>, author: Option<&str>) -> String {
    let mut out = text.to_string();
    if let Some(name) = name {
        out = out.replace("{{NAME}}", name);
    }
    if let Some(author) = author {
        out = out.replace("{{AUTHOR}}", author);
    }
    out
}

/// The rows of one subset (`default`, `qwen3` or `empty_think`), placeholders filled.
pub fn rows(
    subset: &str,
    model_name: &[String],
    model_author: &[String],
) -> Result<Vec<Conversation>, String> {
    let (suffix, prefix) = match subset {
        "default" => ("", ""),
        "qwen3" => (" /no_think", "<think>\n\n</think>\n\n"),
        "empty_think" => ("", "<think>\n\n</think>\n\n"),
        other => {
            return Err(format!(
                "self-cognition has no subset `{other}` (default, qwen3, empty_think)"
            ))
        }
    };
    Ok(ROWS
        .iter()
        .map(|(language, query, response)| {
            let name = pick(model_name, language);
            let author = pick(model_author, language);
            Conversation {
                messages: vec![
                    Message::new(Role::User, format!("{}{suffix}", fill(query, name, author))),
                    Message::new(
                        Role::Assistant,
                        format!("{prefix}{}", fill(response, name, author)),
                    ),
                ],
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_names_by_language() {
        let rows = rows(
            "default",
            &["小黄".into(), "Xiao Huang".into()],
            &["魔搭".into(), "ModelScope".into()],
        )
        .unwrap();
        assert!(rows.len() >= 30);
        assert_eq!(
            rows[0].messages[1].content,
            "我是小黄，由魔搭训练的人工智能助手。有什么可以帮你的吗？"
        );
        let english = rows
            .iter()
            .find(|r| r.messages[0].content == "Who are you?")
            .unwrap();
        assert_eq!(
            english.messages[1].content,
            "I am Xiao Huang, an AI assistant trained by ModelScope. How can I help you?"
        );
        assert!(rows.iter().all(|r| !r.messages[1].content.contains("{{")));
    }

    #[test]
    fn one_value_serves_both_and_none_leaves_placeholders() {
        let rows_one = rows("default", &["swift-robot".into()], &["swift".into()]).unwrap();
        assert!(rows_one
            .iter()
            .all(|r| !r.messages[1].content.contains("{{")));
        let untouched = rows("default", &[], &[]).unwrap();
        assert!(untouched[0].messages[1].content.contains("{{NAME}}"));
    }

    #[test]
    fn subsets() {
        let qwen3 = rows("qwen3", &["N".into()], &["A".into()]).unwrap();
        assert!(qwen3[0].messages[0].content.ends_with(" /no_think"));
        assert!(qwen3[0].messages[1]
            .content
            .starts_with("<think>\n\n</think>\n\n"));
        assert!(rows("nope", &[], &[]).is_err());
    }
}
