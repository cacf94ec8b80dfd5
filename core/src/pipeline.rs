//! Pipeline files: TOML with named stages, variables and command-line overrides.
//!
//! ```toml
//! [pipeline]
//! name = "hf-to-bf16"
//!
//! [vars]
//! input = "model/"
//!
//! [stages.read]
//! plugin = "safetensors"
//! kind = "reader"
//! config = { path = "${input}" }
//!
//! [stages.cast]
//! plugin = "cast"
//! kind = "transform"
//! inputs = ["read"]
//! config = { to = "bf16" }
//! ```

use crate::error::{LocatedError, ValidationErrors};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub file: PathBuf,
    pub name: String,
    pub description: String,
    pub vars: BTreeMap<String, Value>,
    /// Stages in file order.
    pub stages: Vec<StageSpec>,
    /// Set when the file is `bridgeflow convert`'s definition of one conversion.
    pub convert: Option<ConvertSpec>,
}

/// A pipeline file's `[convert]` table: `bridgeflow convert --from FROM:IN --to TO:OUT` runs
/// this pipeline with the variables `input` = IN and `output` = OUT.
///
/// ```toml
/// [convert]
/// from = "hf"
/// to = "megatron"
/// options = { tp = ["write.tp", "map.tensor_parallel"], overwrite = ["write.overwrite"] }
/// required = { hf_config = "give --hf-config HF_DIR/config.json" }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertSpec {
    /// The reader's scheme.
    pub from: String,
    /// The writer's scheme.
    pub to: String,
    /// Each of convert's options (`tp`, `hf_config`, `overwrite`, …) as the `--set` keys its
    /// value goes to: `stage.key` for a config key, `name` for a variable.
    #[serde(default)]
    pub options: BTreeMap<String, Vec<String>>,
    /// Options this conversion cannot go without, each with the message saying why.
    #[serde(default)]
    pub required: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub plugin: String,
    pub kind: String,
    pub inputs: Vec<String>,
    /// The config table after variable substitution and overrides.
    pub config: Table,
    pub line: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetaRaw {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRaw {
    #[serde(default)]
    pipeline: MetaRaw,
    #[serde(default)]
    vars: BTreeMap<String, Value>,
    #[serde(default)]
    stages: toml::map::Map<String, Value>,
    #[serde(default)]
    convert: Option<ConvertSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageRaw {
    plugin: String,
    kind: String,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    config: Table,
}

/// A `--set key=value` override: `stage.key[.sub]=v` sets a config key, `name=v` a variable.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: Value,
}

impl Override {
    /// Parses `key=value`; the value is read as a TOML value when it parses as one
    /// (`4`, `true`, `[1, 2]`, `"quoted"`), else taken as a plain string.
    pub fn parse(s: &str) -> Result<Override, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--set expects key=value, got '{s}'"))?;
        let key = k.trim();
        if key.is_empty() {
            return Err(format!("--set expects key=value, got '{s}'"));
        }
        let value = toml::from_str::<Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(v.to_string()));
        Ok(Override {
            key: key.to_string(),
            value,
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line of `[stages.NAME]` (or a `stages.NAME` dotted key) for error messages.
fn stage_line(text: &str, name: &str) -> Option<usize> {
    let header = format!("[stages.{name}]");
    let quoted = format!("[stages.\"{name}\"]");
    let dotted = format!("stages.{name}.");
    text.lines()
        .position(|l| {
            let t = l.trim();
            t.starts_with(&header) || t.starts_with(&quoted) || t.starts_with(&dotted)
        })
        .map(|i| i + 1)
}

/// Reads and parses a pipeline file, applying `overrides`.
pub fn load(path: &Path, overrides: &[Override]) -> Result<PipelineSpec, ValidationErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ValidationErrors(vec![LocatedError::file(
            path,
            format!("cannot read pipeline file: {e}"),
        )])
    })?;
    parse(&text, path, overrides)
}

/// Parses pipeline text (the file name is used in messages only).
pub fn parse(
    text: &str,
    file: &Path,
    overrides: &[Override],
) -> Result<PipelineSpec, ValidationErrors> {
    let fail = |line: Option<usize>, stage: Option<&str>, message: String| LocatedError {
        file: file.to_path_buf(),
        line,
        stage: stage.map(str::to_owned),
        message,
    };
    let raw: FileRaw = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        ValidationErrors(vec![fail(
            line,
            None,
            format!("invalid pipeline TOML: {}", e.message()),
        )])
    })?;

    let mut errors = Vec::new();
    let mut vars = raw.vars;
    let dir = file
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    vars.entry("pipeline_dir".into())
        .or_insert(Value::String(if dir.is_empty() { ".".into() } else { dir }));
    // Variable overrides first, so stage configs see them.
    let config_overrides = split_overrides(overrides, &mut vars);

    let mut stages = Vec::new();
    // Substitution may repeat a variable many times: the file's expansion is bounded.
    let mut expansion_left = MAX_EXPANSION;
    for (name, value) in raw.stages {
        let line = stage_line(text, &name);
        let built = stage_spec(
            name.clone(),
            value,
            line,
            &config_overrides,
            &vars,
            &mut expansion_left,
        );
        match built {
            Ok((spec, problem)) => {
                stages.push(spec);
                if let Some(msg) = problem {
                    errors.push(fail(line, Some(&name), msg));
                }
            }
            Err(msg) => errors.push(fail(line, Some(&name), msg)),
        }
    }
    // File order makes listings and reports read like the file.
    stages.sort_by_key(|s| s.line.unwrap_or(usize::MAX));

    for (stage, key, _) in &config_overrides {
        if !stages.iter().any(|s| &s.name == stage) {
            errors.push(fail(
                None,
                None,
                format!("--set {stage}.{key}: there is no stage '{stage}'"),
            ));
        }
    }
    if stages.is_empty() {
        errors.push(fail(None, None, "the pipeline has no stages".into()));
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    Ok(PipelineSpec {
        file: file.to_path_buf(),
        name: raw.pipeline.name.unwrap_or_else(|| {
            file.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into()
        }),
        description: raw.pipeline.description.unwrap_or_default(),
        vars,
        stages,
        convert: raw.convert,
    })
}

/// `name=v` overrides go into `vars`; the `stage.key=v` ones are returned as (stage, key, v).
fn split_overrides<'a>(
    overrides: &'a [Override],
    vars: &mut BTreeMap<String, Value>,
) -> Vec<(String, String, &'a Override)> {
    let mut config_overrides = Vec::new();
    for o in overrides {
        match o.key.split_once('.') {
            None => {
                vars.insert(o.key.clone(), o.value.clone());
            }
            Some((stage, key)) => config_overrides.push((stage.to_string(), key.to_string(), o)),
        }
    }
    config_overrides
}

/// One `[stages.NAME]` table, its overrides applied and variables substituted (with the
/// substitution's problem, if any).
fn stage_spec(
    name: String,
    value: Value,
    line: Option<usize>,
    config_overrides: &[(String, String, &Override)],
    vars: &BTreeMap<String, Value>,
    expansion_left: &mut usize,
) -> Result<(StageSpec, Option<String>), String> {
    let stage_raw: StageRaw = value
        .try_into()
        .map_err(|e: toml::de::Error| format!("invalid stage: {}", e.message()))?;
    let mut config = stage_raw.config;
    for (stage, key, o) in config_overrides {
        if stage == &name {
            set_path(&mut config, key, o.value.clone());
        }
    }
    // A stage whose substitution fails is still listed (its other problems are found too).
    let substituted = substitute_table(&mut config, vars, expansion_left).err();
    let spec = StageSpec {
        name,
        plugin: stage_raw.plugin,
        kind: stage_raw.kind,
        inputs: stage_raw.inputs,
        config,
        line,
    };
    Ok((spec, substituted))
}

fn set_path(table: &mut Table, dotted: &str, value: Value) {
    let mut parts = dotted.split('.').peekable();
    let mut cur = table;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_string(), value);
            return;
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        cur = entry.as_table_mut().expect("just made a table");
    }
}

fn var_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Replaces `${name}` (and `${env:NAME}`) in every string of the table; `$$` is a literal `$`.
fn substitute_table(
    table: &mut Table,
    vars: &BTreeMap<String, Value>,
    left: &mut usize,
) -> Result<(), String> {
    for (_, v) in table.iter_mut() {
        substitute_value(v, vars, left)?;
    }
    Ok(())
}

/// Most bytes that variable substitution may produce in one pipeline file: far above any real
/// pipeline (paths, numbers), far below what a file repeating a long variable could ask for.
const MAX_EXPANSION: usize = 16 << 20;

/// Charges `n` substituted bytes against what the file may still expand to.
fn charge(left: &mut usize, n: usize) -> Result<(), String> {
    *left = left.checked_sub(n).ok_or_else(|| {
        format!(
            "variable substitution expands past {} MiB (a variable repeated too often?)",
            MAX_EXPANSION >> 20
        )
    })?;
    Ok(())
}

fn substitute_value(
    v: &mut Value,
    vars: &BTreeMap<String, Value>,
    left: &mut usize,
) -> Result<(), String> {
    match v {
        Value::String(s) => {
            // A string that is exactly one variable takes the variable's type (numbers stay
            // numbers).
            if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                if !name.contains("${") && !name.starts_with("env:") {
                    let val = vars.get(name).ok_or_else(|| unknown_var(name, vars))?;
                    charge(left, var_text(val).len())?;
                    *v = val.clone();
                    return Ok(());
                }
            }
            *s = substitute_str_within(s, vars, left)?;
        }
        Value::Array(a) => {
            for x in a {
                substitute_value(x, vars, left)?;
            }
        }
        Value::Table(t) => substitute_table(t, vars, left)?,
        _ => {}
    }
    Ok(())
}

fn unknown_var(name: &str, vars: &BTreeMap<String, Value>) -> String {
    let known: Vec<&str> = vars.keys().map(String::as_str).collect();
    format!(
        "unknown variable '${{{name}}}' (defined: {}; set one with --set {name}=VALUE)",
        known.join(", ")
    )
}

pub fn substitute_str(s: &str, vars: &BTreeMap<String, Value>) -> Result<String, String> {
    let mut left = MAX_EXPANSION;
    substitute_str_within(s, vars, &mut left)
}

fn substitute_str_within(
    s: &str,
    vars: &BTreeMap<String, Value>,
    left: &mut usize,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unterminated '${{' in \"{s}\""))?;
            let name = &r[..end];
            if let Some(env) = name.strip_prefix("env:") {
                let val = std::env::var(env)
                    .map_err(|_| format!("environment variable {env} is not set"))?;
                out.push_str(&val);
            } else {
                let val = var_text(vars.get(name).ok_or_else(|| unknown_var(name, vars))?);
                charge(left, val.len())?;
                out.push_str(&val);
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_is_bounded() {
        let mut vars = BTreeMap::new();
        vars.insert("v".to_string(), Value::String("x".repeat(1 << 16)));
        let mut left = MAX_EXPANSION;
        let e = substitute_str_within(&"${v}".repeat(300), &vars, &mut left).unwrap_err();
        assert!(e.contains("expands past 16 MiB"), "{e}");
        // Whole-value references count too, across a table.
        let mut t = Table::new();
        t.insert(
            "many".into(),
            Value::Array(vec![Value::String("${v}".into()); 300]),
        );
        let mut left = MAX_EXPANSION;
        let e = substitute_table(&mut t, &vars, &mut left).unwrap_err();
        assert!(e.contains("expands past"), "{e}");
        assert_eq!(substitute_str("a${v}", &vars).unwrap().len(), 1 + (1 << 16));
    }

    const P: &str = r#"
[pipeline]
name = "t"

[vars]
input = "in"
n = 3

[stages.read]
plugin = "safetensors"
kind = "reader"
config = { path = "${input}/model", count = "${n}", literal = "$$HOME" }

[stages.write]
plugin = "safetensors"
kind = "writer"
inputs = ["read"]
[stages.write.config]
path = "out"
"#;

    #[test]
    fn vars_and_overrides() {
        let o = vec![
            Override::parse("input=/data").unwrap(),
            Override::parse("write.max_shard_size=1000").unwrap(),
            Override::parse("write.nested.flag=true").unwrap(),
        ];
        let p = parse(P, Path::new("p.toml"), &o).unwrap();
        assert_eq!(p.stages[0].name, "read");
        assert_eq!(p.stages[0].line, Some(9));
        let c = &p.stages[0].config;
        assert_eq!(c["path"].as_str(), Some("/data/model"));
        assert_eq!(c["count"].as_integer(), Some(3));
        assert_eq!(c["literal"].as_str(), Some("$HOME"));
        let w = &p.stages[1].config;
        assert_eq!(w["max_shard_size"].as_integer(), Some(1000));
        assert_eq!(w["nested"]["flag"].as_bool(), Some(true));
    }

    #[test]
    fn unknown_variable_is_located() {
        let text = P.replace("${input}/model", "${nope}/model");
        let e = parse(&text, Path::new("p.toml"), &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("p.toml:9: stage 'read': unknown variable '${nope}'"),
            "{msg}"
        );
    }

    #[test]
    fn toml_syntax_error_has_line() {
        let e = parse("[stages.a]\nplugin = \n", Path::new("x.toml"), &[]).unwrap_err();
        assert!(
            e.to_string().contains("x.toml:2: invalid pipeline TOML"),
            "{e}"
        );
    }

    #[test]
    fn override_of_missing_stage() {
        let o = vec![Override::parse("nosuch.key=1").unwrap()];
        let e = parse(P, Path::new("p.toml"), &o).unwrap_err();
        assert!(e.to_string().contains("there is no stage 'nosuch'"), "{e}");
    }

    #[test]
    fn missing_field_in_stage() {
        let e = parse("[stages.a]\nkind = \"reader\"\n", Path::new("x.toml"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("x.toml:1: stage 'a': invalid stage: missing field `plugin`"),
            "{e}"
        );
    }
}
