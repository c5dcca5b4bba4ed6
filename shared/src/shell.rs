//! Shell import and export: reads a whole training script (environment variables, `export`
//! lines, comments, continuations, quotes, `torchrun` or `python -m torch.distributed.run`,
//! then `swift sft` or `whet sft` and its flags) into a `JobConfig`, and writes one back as a
//! readable script that reads back to an equal config.
//!
//! This is a small POSIX-shell word splitter, not a shell: it expands only variables the script
//! itself assigned, and ignores commands other than the training command.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::builder::ConfigBuilder;
use crate::config::JobConfig;
use crate::diagnostics::{closest_word, shorten, Diagnostic, Diagnostics};
use crate::fields::{self, Kind, Section, FIELDS};
use crate::files::{self, Format};

/// Which command the exported script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `torchrun ... swift sft ...` for ms-swift 4.x.
    Swift,
    /// `whet sft ...`, which launches its own ranks.
    Whet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShellOptions {
    pub dialect: Dialect,
    /// Print every field, not only those that differ from the defaults.
    pub all: bool,
}

// ---------------------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    /// Literal text; `quoted` if it came from inside quotes.
    Text { text: String, quoted: bool },
    /// `$NAME` or `${NAME}` outside single quotes.
    Var { name: String, braced: bool },
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Word {
    pieces: Vec<Piece>,
}

impl Word {
    fn push_char(&mut self, c: char, quoted: bool) {
        if let Some(Piece::Text { text, quoted: q }) = self.pieces.last_mut() {
            if *q == quoted {
                text.push(c);
                return;
            }
        }
        self.pieces.push(Piece::Text {
            text: c.to_string(),
            quoted,
        });
    }

    /// Whether the word begins inside quotes (then it is a value, never a `--flag`).
    fn starts_quoted(&self) -> bool {
        matches!(self.pieces.first(), Some(Piece::Text { quoted: true, .. }))
    }

    /// `NAME=value` with an unquoted `NAME=`: the name and the pieces of the value.
    fn assignment(&self) -> Option<(String, Word)> {
        let Piece::Text {
            text,
            quoted: false,
        } = self.pieces.first()?
        else {
            return None;
        };
        let (name, rest) = text.split_once('=')?;
        if !is_identifier(name) {
            return None;
        }
        let mut value = Word::default();
        if !rest.is_empty() {
            value.pieces.push(Piece::Text {
                text: rest.to_string(),
                quoted: false,
            });
        }
        value.pieces.extend(self.pieces[1..].iter().cloned());
        Some((name.to_string(), value))
    }

    fn expand(&self, vars: &BTreeMap<String, String>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text { text, .. } => out.push_str(text),
                Piece::Var { name, braced } => match vars.get(name) {
                    Some(value) => out.push_str(value),
                    None if *braced => {
                        out.push_str("${");
                        out.push_str(name);
                        out.push('}');
                    }
                    None => {
                        out.push('$');
                        out.push_str(name);
                    }
                },
            }
        }
        out
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn shell_error(code: &str, en: String, zh: String, fix_en: &str, fix_zh: &str) -> Diagnostic {
    Diagnostic::error("shell", code, en, zh).with_fix(fix_en, fix_zh)
}

/// Splits a script into commands made of words.
fn lex(script: &str) -> Result<Vec<Vec<Word>>, Diagnostic> {
    let mut commands: Vec<Vec<Word>> = Vec::new();
    let mut command: Vec<Word> = Vec::new();
    let mut word: Option<Word> = None;
    let mut chars = script.chars().peekable();
    let mut line = 1usize;

    fn end_word(word: &mut Option<Word>, command: &mut Vec<Word>) {
        if let Some(w) = word.take() {
            command.push(w);
        }
    }
    fn end_command(
        word: &mut Option<Word>,
        command: &mut Vec<Word>,
        commands: &mut Vec<Vec<Word>>,
    ) {
        end_word(word, command);
        if !command.is_empty() {
            commands.push(std::mem::take(command));
        }
    }
    // Reads `$NAME` / `${NAME}` after a `$`; returns false when the `$` is just a character.
    fn read_var(chars: &mut std::iter::Peekable<std::str::Chars>, word: &mut Word) -> bool {
        match chars.peek() {
            Some('{') => {
                let mut lookahead = chars.clone();
                lookahead.next();
                let name: String = lookahead.clone().take_while(|c| *c != '}').collect();
                if is_identifier(&name) && lookahead.nth(name.chars().count()) == Some('}') {
                    chars.next();
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                    word.pieces.push(Piece::Var { name, braced: true });
                    true
                } else {
                    false
                }
            }
            Some(c) if *c == '_' || c.is_ascii_alphabetic() => {
                let mut name = String::new();
                while let Some(c) = chars.peek() {
                    if *c == '_' || c.is_ascii_alphanumeric() {
                        name.push(*c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                word.pieces.push(Piece::Var {
                    name,
                    braced: false,
                });
                true
            }
            _ => false,
        }
    }

    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                line += 1;
                end_command(&mut word, &mut command, &mut commands);
            }
            ' ' | '\t' | '\r' => end_word(&mut word, &mut command),
            ';' | '|' | '&' => end_command(&mut word, &mut command, &mut commands),
            '#' if word.is_none() => {
                // A comment runs to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        end_command(&mut word, &mut command, &mut commands);
                        break;
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => line += 1,
                Some('\r') if chars.peek() == Some(&'\n') => {
                    chars.next();
                    line += 1;
                }
                Some(escaped) => word
                    .get_or_insert_with(Word::default)
                    .push_char(escaped, true),
                None => {}
            },
            '\'' => {
                let w = word.get_or_insert_with(Word::default);
                let start = line;
                let mut closed = false;
                // Mark the word as quoted even when the quotes are empty ('').
                w.pieces.push(Piece::Text {
                    text: String::new(),
                    quoted: true,
                });
                for c in chars.by_ref() {
                    if c == '\'' {
                        closed = true;
                        break;
                    }
                    if c == '\n' {
                        line += 1;
                    }
                    w.push_char(c, true);
                }
                if !closed {
                    return Err(shell_error(
                        "shell_unclosed_quote",
                        format!("a single quote opened on line {start} is never closed"),
                        format!("第 {start} 行的单引号没有闭合"),
                        "add the closing ' (a value containing ' is written 'it'\\''s')",
                        "补上闭合的 '（值中含 ' 时写成 'it'\\''s'）",
                    ));
                }
            }
            '"' => {
                let w = word.get_or_insert_with(Word::default);
                let start = line;
                let mut closed = false;
                w.pieces.push(Piece::Text {
                    text: String::new(),
                    quoted: true,
                });
                while let Some(c) = chars.next() {
                    match c {
                        '"' => {
                            closed = true;
                            break;
                        }
                        '\\' => match chars.peek().copied() {
                            Some(e @ ('"' | '\\' | '$' | '`')) => {
                                chars.next();
                                w.push_char(e, true);
                            }
                            Some('\n') => {
                                chars.next();
                                line += 1;
                            }
                            _ => w.push_char('\\', true),
                        },
                        '$' => {
                            if !read_var(&mut chars, w) {
                                w.push_char('$', true);
                            }
                        }
                        other => {
                            if other == '\n' {
                                line += 1;
                            }
                            w.push_char(other, true);
                        }
                    }
                }
                if !closed {
                    return Err(shell_error(
                        "shell_unclosed_quote",
                        format!("a double quote opened on line {start} is never closed"),
                        format!("第 {start} 行的双引号没有闭合"),
                        "add the closing \"",
                        "补上闭合的 \"",
                    ));
                }
            }
            '$' => {
                let w = word.get_or_insert_with(Word::default);
                if !read_var(&mut chars, w) {
                    w.push_char('$', false);
                }
            }
            other => word
                .get_or_insert_with(Word::default)
                .push_char(other, false),
        }
    }
    end_command(&mut word, &mut command, &mut commands);
    Ok(commands)
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// No training script or config file comes near this; larger input is refused, not parsed.
pub const MAX_SCRIPT_BYTES: usize = 1024 * 1024;

pub(crate) fn too_long(field: &str, bytes: usize) -> Diagnostic {
    Diagnostic::error(
        field,
        "input_too_long",
        format!("the input is {bytes} bytes; a config or script is never more than 1 MiB"),
        format!("输入有 {bytes} 字节；配置或脚本不会超过 1 MiB"),
    )
    .with_fix(
        "paste only the training command or config file",
        "只粘贴训练命令或配置文件",
    )
}

/// Reads a script or command line into a config. `--config FILE` is an error here (whet-shared
/// reads no files); use `parse_shell_with` to let the caller read it.
pub fn parse_shell(script: &str) -> Result<JobConfig, Diagnostics> {
    parse_shell_with(script, &|path: &str| {
        Err(format!(
            "config file `{path}` cannot be read here; paste its contents or use `whet check --config`"
        ))
    })
}

/// Like `parse_shell`, with `read_file` reading the config files a `--config FILE` names.
pub fn parse_shell_with(
    script: &str,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<JobConfig, Diagnostics> {
    parse_shell_onto(&JobConfig::default(), script, read_file)
}

/// Like `parse_shell_with`, starting from `base` instead of the defaults (flags given after a
/// config file or script override it).
pub fn parse_shell_onto(
    base: &JobConfig,
    script: &str,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<JobConfig, Diagnostics> {
    if script.len() > MAX_SCRIPT_BYTES {
        return Err(too_long("shell", script.len()).into());
    }
    let commands = lex(script).map_err(Diagnostics::from)?;
    let mut builder = ConfigBuilder::from_config(base);
    // Variables the script assigned (for `$VAR`); exported ones also go into the job's env.
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut found_training_command = false;
    // `swift infer ...` and the like: not training, but worth naming if nothing else is found.
    let mut other_subcommand: Option<String> = None;

    for words in commands {
        let mut index = 0;
        let mut prefix_assignments = Vec::new();
        while let Some((name, value)) = words.get(index).and_then(Word::assignment) {
            prefix_assignments.push((name, value.expand(&vars)));
            index += 1;
        }
        let rest: Vec<(String, bool)> = words[index..]
            .iter()
            .map(|w| (w.expand(&vars), w.starts_quoted()))
            .collect();
        if rest.is_empty() {
            // `NAME=value` alone: a shell variable. Launcher variables still count (people write
            // `CUDA_VISIBLE_DEVICES=0,1` on its own line and expect it to apply).
            for (name, value) in prefix_assignments {
                if fields::find_by_env(&name).is_some() {
                    builder.set_env(&name, &value);
                }
                vars.insert(name, value);
            }
            continue;
        }
        let program = basename(&rest[0].0);
        if program == "export" {
            for (name, value) in prefix_assignments {
                vars.insert(name, value);
            }
            for word in &words[index + 1..] {
                if let Some((name, value)) = word.assignment() {
                    let value = value.expand(&vars);
                    builder.set_env(&name, &value);
                    vars.insert(name, value);
                }
            }
            continue;
        }
        let Some(start) = training_start(&rest) else {
            if (program == "swift" || program == "whet") && other_subcommand.is_none() {
                other_subcommand = Some(format!(
                    "{program} {}",
                    rest.get(1).map_or("", |w| w.0.as_str())
                ));
            }
            continue; // another command (cd, mkdir, echo, set -e, swift export, ...)
        };
        if found_training_command {
            builder.push(shell_error(
                "shell_two_commands",
                "the script runs more than one training command".into(),
                "脚本中有多条训练命令".into(),
                "keep one `swift sft` / `whet sft` command per script",
                "每个脚本只保留一条 `swift sft` / `whet sft` 命令",
            ));
            continue;
        }
        found_training_command = true;
        for (name, value) in &prefix_assignments {
            builder.set_env(name, value);
        }
        parse_training_command(&rest, start, "whet sft", &mut builder, read_file);
    }

    if let (false, Some(command)) = (found_training_command, &other_subcommand) {
        builder.push(shell_error(
            "shell_not_sft",
            format!(
                "`{}` is not a training command; whet reads `sft`",
                shorten(command)
            ),
            format!("`{}` 不是训练命令；whet 只读取 `sft`", shorten(command)),
            "use `swift sft ...` or `whet sft ...`",
            "请使用 `swift sft ...` 或 `whet sft ...`",
        ));
    } else if !found_training_command {
        builder.push(shell_error(
            "shell_no_command",
            "no `swift sft` or `whet sft` command found".into(),
            "没有找到 `swift sft` 或 `whet sft` 命令".into(),
            "paste the whole command, e.g. `swift sft --model Qwen/Qwen3-8B --dataset data.jsonl`",
            "请粘贴完整命令，例如 `swift sft --model Qwen/Qwen3-8B --dataset data.jsonl`",
        ));
    }
    builder.finish()
}

/// Reads the ms-swift arguments of `whet sft` / `whet check` as a program receives them (no
/// shell quoting left to undo), on top of `base`: `--config` files first, wherever they stand,
/// then the flags. `command` (`whet check`) is named where a message points to its `--help`.
pub fn parse_args_onto(
    base: &JobConfig,
    args: &[String],
    command: &str,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<JobConfig, Diagnostics> {
    let mut builder = ConfigBuilder::from_config(base);
    let mut words: Vec<(String, bool)> = vec![("whet".into(), false), ("sft".into(), false)];
    words.extend(args.iter().map(|a| (a.clone(), false)));
    parse_training_command(&words, 0, command, &mut builder, read_file);
    builder.finish()
}

fn basename(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

/// Where the training command starts: the index of its program word (`torchrun`, `python`,
/// `swift`, `whet`), if this command trains.
fn training_start(words: &[(String, bool)]) -> Option<usize> {
    let program = basename(&words[0].0);
    let is_launcher = program == "torchrun"
        || (program.starts_with("python")
            && words.get(1).is_some_and(|w| w.0 == "-m")
            && words.get(2).is_some_and(|w| {
                w.0 == "torch.distributed.run" || w.0 == "torch.distributed.launch"
            }));
    let is_sft =
        (program == "swift" || program == "whet") && words.get(1).is_some_and(|w| w.0 == "sft");
    let is_script = program.ends_with("sft.py");
    (is_launcher || is_sft || is_script).then_some(0)
}

const LAUNCHER_VALUE_OPTIONS: &[&str] = &[
    "nproc_per_node",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
];
const LAUNCHER_IGNORED_FLAGS: &[&str] = &["no_python", "standalone"];
const LAUNCHER_IGNORED_VALUES: &[&str] = &[
    "rdzv_backend",
    "rdzv_endpoint",
    "rdzv_id",
    "max_restarts",
    "monitor_interval",
    "log_dir",
    "redirects",
    "tee",
    "role",
    "local_addr",
];

/// `help_command` is the command whose `--help` lists the flags (`whet check` for its own
/// arguments, `whet sft` for a script).
fn parse_training_command(
    words: &[(String, bool)],
    start: usize,
    help_command: &str,
    builder: &mut ConfigBuilder,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) {
    let mut i = start;
    let program = basename(&words[i].0).to_string();
    // --- the launcher, if any
    if program == "torchrun" || program.starts_with("python") {
        i += if program == "torchrun" { 1 } else { 3 };
        while i < words.len() && words[i].0.starts_with('-') && !words[i].1 {
            let raw = words[i].0.trim_start_matches('-');
            let (name, inline) = match raw.split_once('=') {
                Some((n, v)) => (n.replace('-', "_"), Some(v.to_string())),
                None => (raw.replace('-', "_"), None),
            };
            i += 1;
            if LAUNCHER_IGNORED_FLAGS.contains(&name.as_str()) {
                continue;
            }
            let takes_value = LAUNCHER_VALUE_OPTIONS.contains(&name.as_str())
                || LAUNCHER_IGNORED_VALUES.contains(&name.as_str());
            if !takes_value {
                let hint = closest_word(
                    &name,
                    LAUNCHER_VALUE_OPTIONS
                        .iter()
                        .chain(LAUNCHER_IGNORED_FLAGS)
                        .copied(),
                );
                builder.push(
                    Diagnostic::error(
                        "launcher",
                        "unknown_launcher_option",
                        format!("unknown torchrun option `--{}`", shorten(&name)),
                        format!("未知的 torchrun 参数 `--{}`", shorten(&name)),
                    )
                    .with_fix(
                        match hint {
                            Some(h) => format!("did you mean `--{h}`?"),
                            None => "remove it".into(),
                        },
                        match hint {
                            Some(h) => format!("是否想写 `--{h}`？"),
                            None => "删除该参数".into(),
                        },
                    ),
                );
                // Skip the unknown option's value too, unless the next word is the program.
                if inline.is_none() {
                    if let Some((next, _)) = words.get(i) {
                        let program = basename(next);
                        if !next.starts_with('-')
                            && program != "swift"
                            && program != "whet"
                            && !program.ends_with("sft.py")
                        {
                            i += 1;
                        }
                    }
                }
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None if i < words.len() => {
                    i += 1;
                    words[i - 1].0.clone()
                }
                None => String::new(),
            };
            if LAUNCHER_VALUE_OPTIONS.contains(&name.as_str()) {
                if let Some(field) = fields::find(&name) {
                    builder.set_words(field, &format!("--{name}"), &[value]);
                }
            }
        }
        if i >= words.len() {
            builder.push(shell_error(
                "shell_no_command",
                "torchrun has no command to run".into(),
                "torchrun 后面没有要运行的命令".into(),
                "end the line with `--no_python swift sft ...` or `--no_python whet sft ...`",
                "在末尾加上 `--no_python swift sft ...` 或 `--no_python whet sft ...`",
            ));
            return;
        }
    }
    // --- the program: `swift sft`, `whet sft`, or a script ending in sft.py
    let program = basename(&words[i].0);
    if program == "swift" || program == "whet" {
        i += 1;
        match words.get(i).map(|w| w.0.as_str()) {
            Some("sft") => i += 1,
            other => {
                let sub = other.unwrap_or("");
                builder.push(shell_error(
                    "shell_not_sft",
                    format!(
                        "`{program} {}` is not a training command; whet reads `sft`",
                        shorten(sub)
                    ),
                    format!(
                        "`{program} {}` 不是训练命令；whet 只读取 `sft`",
                        shorten(sub)
                    ),
                    "use `swift sft ...` or `whet sft ...`",
                    "请使用 `swift sft ...` 或 `whet sft ...`",
                ));
                return;
            }
        }
    } else if program.ends_with("sft.py") {
        i += 1;
    } else {
        builder.push(shell_error(
            "shell_not_sft",
            format!(
                "torchrun runs `{}`, not `swift sft` or `whet sft`",
                shorten(program)
            ),
            format!(
                "torchrun 运行的是 `{}`，而不是 `swift sft` 或 `whet sft`",
                shorten(program)
            ),
            "write `torchrun ... --no_python swift sft ...`",
            "写成 `torchrun ... --no_python swift sft ...`",
        ));
        return;
    }

    // --- the flags. A config file is the base wherever it stands and the flags override it, as
    // transformers' HfArgumentParser (and ms-swift's config launch) layer them; among the flags
    // later ones win.
    let mut flags: Vec<(&str, Vec<String>)> = Vec::new();
    while i < words.len() {
        let (word, quoted) = &words[i];
        i += 1;
        if !word.starts_with("--") || *quoted {
            if is_config_path(word) {
                apply_config_file(word, builder, read_file);
                continue;
            }
            builder.push(shell_error(
                "shell_unexpected_word",
                format!(
                    "unexpected word `{}` where a --flag was expected",
                    shorten(word)
                ),
                format!("此处应为 --参数，却出现了 `{}`", shorten(word)),
                "quote a value that contains spaces, and start each flag with --",
                "含空格的值请加引号，每个参数以 -- 开头",
            ));
            continue;
        }
        let body = &word[2..];
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let mut values: Vec<String> = inline.into_iter().collect();
        while i < words.len() && (words[i].1 || !words[i].0.starts_with("--")) {
            values.push(words[i].0.clone());
            i += 1;
        }
        if name != "config" {
            flags.push((name, values));
            continue;
        }
        match values.as_slice() {
            [path] => apply_config_file(path, builder, read_file),
            _ => builder.push(shell_error(
                "empty_value",
                "`--config` needs exactly one file".into(),
                "`--config` 需要且只需要一个文件".into(),
                "write `--config job.yaml`",
                "写成 `--config job.yaml`",
            )),
        }
    }
    for (name, values) in flags {
        match fields::find(name) {
            Some(field) if field.is_flag => builder.set_words(field, &format!("--{name}"), &values),
            _ => builder.push(unknown_flag(name, help_command)),
        }
    }
}

/// An ms-swift flag whet does not know, with the closest known one or where the list is.
fn unknown_flag(name: &str, help_command: &str) -> Diagnostic {
    let shown = shorten(name);
    let (fix_en, fix_zh) = match fields::closest(name) {
        Some(h) => (
            format!("did you mean `--{h}`?"),
            format!("是否想写 `--{h}`？"),
        ),
        None => (
            format!("remove it; `{help_command} --help` lists the flags"),
            format!("删除该参数；`{help_command} --help` 列出了所有参数"),
        ),
    };
    Diagnostic::error(
        name,
        "unknown_flag",
        format!("unknown flag `--{shown}`"),
        format!("未知参数 `--{shown}`"),
    )
    .with_fix(fix_en, fix_zh)
}

fn is_config_path(word: &str) -> bool {
    Format::from_path(word).is_some()
}

fn apply_config_file(
    path: &str,
    builder: &mut ConfigBuilder,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) {
    let Some(format) = Format::from_path(path) else {
        builder.push(shell_error(
            "config_format",
            format!(
                "`{}` is not a .json, .yaml, .yml or .toml file",
                shorten(path)
            ),
            format!("`{}` 不是 .json、.yaml、.yml 或 .toml 文件", shorten(path)),
            "give the config file one of those extensions",
            "请使用这些扩展名之一",
        ));
        return;
    };
    match read_file(path) {
        Ok(text) => match files::parse_document(&text, format) {
            Ok(document) => builder.apply_document(document),
            Err(d) => builder.push(d),
        },
        Err(message) => builder.push(shell_error(
            "config_unreadable",
            message.clone(),
            format!("无法读取配置文件：{message}"),
            "check the path",
            "请检查路径",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Export

/// A readable multi-line script that `parse_shell` reads back to an equal config.
pub fn to_shell(config: &JobConfig, dialect: Dialect) -> String {
    to_shell_with(
        config,
        ShellOptions {
            dialect,
            all: false,
        },
    )
}

pub fn to_shell_with(config: &JobConfig, options: ShellOptions) -> String {
    let launch = &config.launch;
    let defaults = JobConfig::default();
    let mut lines: Vec<String> = Vec::new();

    if let Some(devices) = &launch.cuda_visible_devices {
        lines.push(format!("CUDA_VISIBLE_DEVICES={}", quote(devices)));
    }
    for (name, value) in &launch.env {
        lines.push(format!("{name}={}", quote(value)));
    }
    let multi_node = launch.nnodes != 1
        || launch.node_rank != defaults.launch.node_rank
        || launch.master_addr != defaults.launch.master_addr;
    match options.dialect {
        Dialect::Swift => {
            if launch.nproc_per_node.is_some() || multi_node {
                let mut torchrun = String::from("torchrun");
                if let Some(n) = launch.nproc_per_node {
                    torchrun += &format!(" --nproc_per_node={n}");
                }
                if multi_node {
                    torchrun += &format!(
                        " --nnodes={} --node_rank={} --master_addr={}",
                        launch.nnodes,
                        launch.node_rank,
                        quote(&launch.master_addr)
                    );
                }
                torchrun += &format!(" --master_port={} --no_python", launch.master_port);
                lines.push(torchrun);
            } else if launch.master_port != defaults.launch.master_port || options.all {
                lines.push(format!("MASTER_PORT={}", launch.master_port));
            }
            lines.push("swift sft".into());
        }
        Dialect::Whet => lines.push("whet sft".into()),
    }

    let actual = serde_json::to_value(config).unwrap_or(Value::Null);
    let default = serde_json::to_value(&defaults).unwrap_or(Value::Null);
    for field in FIELDS {
        if !field.is_flag {
            continue;
        }
        let section = match field.section {
            Section::Launch => "launch",
            Section::Sft => "sft",
        };
        if field.section == Section::Launch && options.dialect == Dialect::Swift {
            continue; // already on the torchrun line
        }
        let value = &actual[section][field.name];
        if value.is_null() || (!options.all && *value == default[section][field.name]) {
            continue;
        }
        if let Some(text) = format_value(field.kind, value) {
            lines.push(format!("    --{} {text}", field.name));
        }
    }
    let mut script = String::new();
    let last = lines.len().saturating_sub(1);
    for (n, line) in lines.iter().enumerate() {
        script.push_str(line);
        script.push_str(if n == last { "\n" } else { " \\\n" });
    }
    script
}

/// A value as shell words; `None` for an empty list (which no flag can express).
fn format_value(kind: Kind, value: &Value) -> Option<String> {
    match value {
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(match (kind, n.as_f64()) {
            (Kind::Float, Some(x)) => format_float(x),
            _ => n.to_string(),
        }),
        Value::String(s) => Some(quote(s)),
        Value::Array(items) if !items.is_empty() => Some(
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => quote(s),
                    other => quote(&other.to_string()),
                })
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// `1e-5` rather than `0.00001`; both read back to the same f64.
pub fn format_float(x: f64) -> String {
    let plain = format!("{x}");
    let scientific = format!("{x:e}");
    if scientific.len() < plain.len() {
        scientific
    } else {
        plain
    }
}

/// Quotes a word for POSIX shells when it needs it.
pub fn quote(word: &str) -> String {
    let safe = !word.is_empty()
        && !word.starts_with('~')
        && !word.starts_with('-')
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
