//! `bridgeflow convert --from SCHEME:IN --to SCHEME:OUT`: a checkpoint from one format to
//! another, assembled from what plugins declare, with no format known here.
//!
//! - The schemes are endpoints readers and writers declare (`hf`, `megatron`, `megatron-lm`…).
//! - If a pipeline file declares this conversion (`[convert] from = "hf", to = "megatron"`),
//!   convert runs it: the bundled `pipelines/*.toml` are the one definition of each conversion
//!   they name, and directories on `BRIDGEFLOW_PIPELINE_PATH` add more.
//! - Otherwise the chain is composed from the declarations: the reader, a stage translating
//!   between the two sides' namings when they differ (the model mapper), and the writer. A
//!   `--to` scheme an exporter declares (`trtllm`) puts the exporter before the writer its
//!   declaration names (`through = "hf"`: the safetensors writer).
//! - Either way, a quantized input (the reader says its `quant_method`) gets the transform that
//!   declares that method right after the reader.
//!
//! Convert's options (`--tp`, `--hf-config`, `--overwrite`…) go where the pipeline's
//! `[convert.options]` or the stages' declarations send them; one that nothing takes is refused.

use crate::host::{Plugin, PluginHost};
use crate::jobs::{run_spec, stage, JobError};
use crate::pipeline::{self, ConvertSpec, Override, PipelineSpec, StageSpec};
use crate::runtime::{RunOptions, RunReport};
use bridgeflow_sdk::declare::option_key;
use bridgeflow_sdk::{EndpointDecl, StageKind, TranslationDecl};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled_pipelines.rs"));
}

/// Where extra conversion pipelines are looked for (`:`-separated directories).
pub const PIPELINE_PATH_ENV: &str = "BRIDGEFLOW_PIPELINE_PATH";

/// One side of a conversion on the command line: `SCHEME:PATH`.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    pub scheme: String,
    pub path: PathBuf,
}

impl Location {
    pub fn parse(s: &str) -> Result<Location, String> {
        match s.split_once(':') {
            Some((scheme, path)) if !scheme.is_empty() && !path.is_empty() => Ok(Location {
                scheme: scheme.to_string(),
                path: path.into(),
            }),
            _ => Err(format!(
                "'{s}': expected SCHEME:PATH (hf:DIR, megatron:DIR, megatron-lm:DIR, …; \
                 `bridgeflow plugins` lists every scheme)"
            )),
        }
    }
}

/// A conversion as the command line gives it.
#[derive(Debug, Clone, Default)]
pub struct Convert {
    pub from: Option<Location>,
    pub to: Option<Location>,
    /// Options given (`tp` = 2, `hf_config` = "…", `overwrite` = true); those left at their
    /// defaults are not listed.
    pub options: Vec<(String, Value)>,
    /// `--set stage.key=value` / `--set var=value`, applied last.
    pub overrides: Vec<Override>,
}

/// The two ends, resolved to the stages that declare them.
struct Ends<'h> {
    reader: End<'h>,
    writer: End<'h>,
    /// The exporter declaring the `--to` scheme, when a writer does not.
    exporter: Option<End<'h>>,
}

/// A resolved endpoint: the plugin and its declaration.
type End<'h> = (&'h Plugin, &'h EndpointDecl);

/// The `--to` side: the writer declaring the scheme, else the exporter declaring it and the
/// writer it goes through: (writer, exporter).
fn output_end<'h>(
    host: &'h PluginHost,
    scheme: &str,
) -> Result<(End<'h>, Option<End<'h>>), JobError> {
    if host.endpoint(StageKind::Writer, scheme).is_some() {
        return Ok((endpoint(host, StageKind::Writer, scheme)?, None));
    }
    let Some((p, e)) = host.endpoint(StageKind::Exporter, scheme) else {
        let mut all = host.schemes(StageKind::Writer);
        all.extend(host.schemes(StageKind::Exporter));
        all.sort();
        return Err(invalid(format!(
            "--to {scheme}: no writer or exporter plugin serves '{scheme}:' (schemes: {})",
            all.join(", ")
        )));
    };
    let writer = host
        .endpoint(StageKind::Writer, &e.through)
        .ok_or_else(|| {
            invalid(format!(
                "--to {scheme}: exporter '{}' writes through '{}:', which no writer plugin serves",
                p.name(),
                e.through
            ))
        })?;
    Ok((writer, Some((p, e))))
}

pub fn convert(req: &Convert, host: &PluginHost, opts: &RunOptions) -> Result<RunReport, JobError> {
    let (from, to) = match (&req.from, &req.to) {
        (Some(f), Some(t)) => (f, t),
        _ => {
            return Err(invalid(
                "convert needs --from SCHEME:PATH and --to SCHEME:PATH",
            ))
        }
    };
    let (writer, exporter) = output_end(host, &to.scheme)?;
    let ends = Ends {
        reader: endpoint(host, StageKind::Reader, &from.scheme)?,
        writer,
        exporter,
    };
    let rs = ends.reader.1.scheme.as_str();
    let ws = ends.exporter.unwrap_or(ends.writer).1.scheme.as_str();
    let mut spec = match find_pipeline(rs, ws)? {
        Some((file, text)) => from_pipeline(&file, &text, from, to, req)?,
        None => composed(host, &ends, from, to, req)?,
    };
    if let Some(dequant) = dequantizer(host, ends.reader.0, &from.path)? {
        insert_after_reader(&mut spec, dequant);
    }
    run_spec(spec, host, opts)
}

fn invalid(msg: impl Into<String>) -> JobError {
    JobError::Invalid(msg.into())
}

fn endpoint<'h>(
    host: &'h PluginHost,
    kind: StageKind,
    scheme: &str,
) -> Result<(&'h Plugin, &'h EndpointDecl), JobError> {
    host.endpoint(kind, scheme).ok_or_else(|| {
        let side = if kind == StageKind::Reader {
            "--from"
        } else {
            "--to"
        };
        invalid(format!(
            "{side} {scheme}: no {kind} plugin serves '{scheme}:' (schemes: {})",
            host.schemes(kind).join(", ")
        ))
    })
}

/// Every pipeline file convert knows: bundled ones first, then those on the pipeline path.
fn pipeline_files() -> Vec<(PathBuf, String)> {
    let mut all: Vec<(PathBuf, String)> = bundled::BUNDLED
        .iter()
        .map(|(name, text)| (PathBuf::from(format!("<bundled>/{name}")), text.to_string()))
        .collect();
    let dirs = std::env::var_os(PIPELINE_PATH_ENV).unwrap_or_default();
    for dir in std::env::split_paths(&dirs) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            if let Ok(text) = std::fs::read_to_string(&f) {
                all.push((f, text));
            }
        }
    }
    all
}

/// The pipeline declaring `from` → `to`; two that do are an error (which would run?).
fn find_pipeline(from: &str, to: &str) -> Result<Option<(PathBuf, String)>, JobError> {
    let matching: Vec<(PathBuf, String)> = pipeline_files()
        .into_iter()
        .filter(|(file, text)| {
            let declared = pipeline::parse(text, file, &[])
                .ok()
                .and_then(|p| p.convert);
            declared.is_some_and(|c| c.from == from && c.to == to)
        })
        .collect();
    match matching.len() {
        0 | 1 => Ok(matching.into_iter().next()),
        _ => {
            let files: Vec<String> = matching
                .iter()
                .map(|(f, _)| f.display().to_string())
                .collect();
            Err(invalid(format!(
                "more than one pipeline declares convert {from} → {to}: {}",
                files.join(", ")
            )))
        }
    }
}

/// The declared pipeline with `input`, `output` and the options set.
fn from_pipeline(
    file: &Path,
    text: &str,
    from: &Location,
    to: &Location,
    req: &Convert,
) -> Result<PipelineSpec, JobError> {
    let declared = pipeline::parse(text, file, &[])
        .map_err(|e| invalid(e.to_string()))?
        .convert
        .unwrap_or_default();
    let mut overrides = vec![
        var("input", path_value(&from.path)),
        var("output", path_value(&to.path)),
    ];
    overrides.extend(option_overrides(&declared, req, file)?);
    overrides.extend(req.overrides.iter().cloned());
    pipeline::parse(text, file, &overrides).map_err(|e| invalid(e.to_string()))
}

fn var(key: &str, value: Value) -> Override {
    Override {
        key: key.into(),
        value,
    }
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// Each given option as the overrides the pipeline's `[convert.options]` names; required ones
/// that are missing, and given ones the pipeline does not take, are refused.
fn option_overrides(
    declared: &ConvertSpec,
    req: &Convert,
    file: &Path,
) -> Result<Vec<Override>, JobError> {
    for (flag, why) in &declared.required {
        if !req.options.iter().any(|(f, _)| f == flag) {
            return Err(invalid(format!("--{}: {why}", flag.replace('_', "-"))));
        }
    }
    let mut out = Vec::new();
    for (flag, value) in &req.options {
        let Some(keys) = declared.options.get(flag) else {
            return Err(not_taken(
                flag,
                &declared.from,
                &declared.to,
                &file.display().to_string(),
            ));
        };
        out.extend(keys.iter().map(|k| var(k, value.clone())));
    }
    Ok(out)
}

fn not_taken(flag: &str, from: &str, to: &str, by: &str) -> JobError {
    invalid(format!(
        "--{} does not apply to converting {from}: to {to}: ({by})",
        flag.replace('_', "-")
    ))
}

/// reader → [translator] → writer, from the declarations alone.
fn composed(
    host: &PluginHost,
    ends: &Ends<'_>,
    from: &Location,
    to: &Location,
    req: &Convert,
) -> Result<PipelineSpec, JobError> {
    let ((reader, rd), (writer, wd)) = (ends.reader, ends.writer);
    let mut read = stage_config(&rd.config, "read", reader)?;
    read.insert("path".into(), path_value(&from.path));
    let mut write = stage_config(&wd.config, "write", writer)?;
    write.insert("path".into(), path_value(&to.path));
    // The naming the stream must reach: the exporter's when there is one.
    let target = ends.exporter.map_or(wd, |(_, ed)| ed);
    let mut export = match ends.exporter {
        Some((plugin, ed)) => Some(stage_config(&ed.config, "export", plugin)?),
        None => None,
    };
    let translator = match rd.naming == target.naming {
        true => None,
        false => Some(translator(host, rd, target)?),
    };
    let mut map = match &translator {
        Some((plugin, _, t)) => Some(stage_config(&t.config, "map", plugin)?),
        None => None,
    };
    for (flag, value) in &req.options {
        let mut taken = false;
        let mut give = |options: &[bridgeflow_sdk::reexports::RString], cfg: &mut Table| {
            if let Some(key) = option_key(options, flag) {
                cfg.insert(key.to_string(), value.clone());
                taken = true;
            }
        };
        give(&rd.options, &mut read);
        give(&wd.options, &mut write);
        if let (Some((_, ed)), Some(cfg)) = (ends.exporter, export.as_mut()) {
            give(&ed.options, cfg);
        }
        if let (Some((_, _, t)), Some(cfg)) = (&translator, map.as_mut()) {
            give(&t.options, cfg);
        }
        if !taken {
            return Err(not_taken(
                flag,
                &rd.scheme,
                &target.scheme,
                "no stage of it takes it",
            ));
        }
    }
    let mut stages = vec![stage("read", reader.name(), "reader", &[], read)];
    let mut last = "read";
    if let (Some((plugin, kind, _)), Some(cfg)) = (&translator, map) {
        stages.push(stage("map", plugin.name(), kind.name(), &["read"], cfg));
        last = "map";
    }
    if let (Some((plugin, _)), Some(cfg)) = (ends.exporter, export) {
        let kind = StageKind::Exporter.name();
        stages.push(stage("export", plugin.name(), kind, &[last], cfg));
        last = "export";
    }
    stages.push(stage("write", writer.name(), "writer", &[last], write));
    let spec = PipelineSpec {
        file: PathBuf::from("<convert>"),
        name: format!("convert {} → {}", rd.scheme, target.scheme),
        description: String::new(),
        vars: Default::default(),
        stages,
        convert: None,
    };
    apply_overrides(spec, &req.overrides)
}

/// `--set` on a composed chain: `stage.key=value` only (it has no variables).
fn apply_overrides(
    mut spec: PipelineSpec,
    overrides: &[Override],
) -> Result<PipelineSpec, JobError> {
    for o in overrides {
        let Some((name, key)) = o.key.split_once('.') else {
            return Err(invalid(format!(
                "--set {}: this conversion has no variables; use stage.key=value (stages: read, map, export, write)",
                o.key
            )));
        };
        let Some(s) = spec.stages.iter_mut().find(|s| s.name == name) else {
            return Err(invalid(format!(
                "--set {}: there is no stage '{name}'",
                o.key
            )));
        };
        s.config.insert(key.to_string(), o.value.clone());
    }
    Ok(spec)
}

fn translator<'h>(
    host: &'h PluginHost,
    rd: &EndpointDecl,
    wd: &EndpointDecl,
) -> Result<(&'h Plugin, StageKind, &'h TranslationDecl), JobError> {
    host.translator(&rd.naming, &wd.naming).ok_or_else(|| {
        invalid(format!(
            "no plugin translates {} names into {} names, which converting {}: to {}: needs",
            rd.naming, wd.naming, rd.scheme, wd.scheme
        ))
    })
}

/// A declaration's config (a JSON object) as a stage config table.
fn stage_config(json: &str, what: &str, plugin: &Plugin) -> Result<Table, JobError> {
    let bad = |e: String| {
        invalid(format!(
            "plugin '{}' declares a bad {what} config: {e}",
            plugin.name()
        ))
    };
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    match toml::Value::try_from(value).map_err(|e| bad(e.to_string()))? {
        Value::Table(t) => Ok(t),
        other => Err(bad(format!("not an object: {other}"))),
    }
}

/// The transform for the input's quantization method, when it has one.
fn dequantizer(
    host: &PluginHost,
    reader: &Plugin,
    input: &Path,
) -> Result<Option<StageSpec>, JobError> {
    let method = host
        .quant_method(reader, input)
        .map_err(|e| invalid(e.message.to_string()))?;
    let Some(method) = method else {
        return Ok(None);
    };
    let plugin = host.dequantizer(&method).map_err(|known| {
        invalid(format!(
            "{}: quant_method \"{method}\" is not one convert dequantizes ({})",
            input.display(),
            known.join(", ")
        ))
    })?;
    let kind = plugin
        .descriptor
        .stages
        .iter()
        .find(|s| s.quant_methods.iter().any(|m| *m == method))
        .map(|s| s.kind)
        .unwrap_or(StageKind::Transform);
    Ok(Some(stage(
        "dequant",
        plugin.name(),
        kind.name(),
        &["read"],
        Table::new(),
    )))
}

/// Puts `dequant` between the reader (the stage without inputs) and its consumers.
fn insert_after_reader(spec: &mut PipelineSpec, mut dequant: StageSpec) {
    let Some(pos) = spec.stages.iter().position(|s| s.inputs.is_empty()) else {
        return;
    };
    let reader = spec.stages[pos].name.clone();
    for s in spec.stages.iter_mut() {
        for input in s.inputs.iter_mut().filter(|i| **i == reader) {
            *input = dequant.name.clone();
        }
    }
    dequant.inputs = vec![reader];
    spec.stages.insert(pos + 1, dequant);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_need_a_scheme_and_a_path() {
        let l = Location::parse("megatron-lm:/ckpt/a:b").unwrap();
        assert_eq!(
            (l.scheme.as_str(), l.path),
            ("megatron-lm", PathBuf::from("/ckpt/a:b"))
        );
        assert!(Location::parse("/no/scheme").is_err());
        assert!(Location::parse("hf:").is_err());
    }

    #[test]
    fn each_bundled_conversion_is_declared_once() {
        let mut seen = std::collections::BTreeSet::new();
        for (file, text) in pipeline_files() {
            let spec = pipeline::parse(&text, &file, &[]).unwrap();
            if let Some(c) = spec.convert {
                assert!(
                    seen.insert((c.from.clone(), c.to.clone())),
                    "{} repeats {c:?}",
                    file.display()
                );
                assert!(spec.vars.contains_key("input") && spec.vars.contains_key("output"));
                for keys in c.options.values() {
                    for k in keys {
                        let stage = k.split_once('.').map(|(s, _)| s);
                        assert!(
                            stage.is_none_or(|s| spec.stages.iter().any(|x| x.name == s)),
                            "{}: option key {k} names no stage",
                            file.display()
                        );
                    }
                }
            }
        }
        assert!(seen.len() >= 4, "{seen:?}");
    }

    #[test]
    fn dequantizer_goes_right_after_the_reader() {
        let mut spec = PipelineSpec {
            file: "<t>".into(),
            name: "t".into(),
            description: String::new(),
            vars: Default::default(),
            stages: vec![
                stage("read", "r", "reader", &[], Table::new()),
                stage("map", "m", "mapper", &["read"], Table::new()),
                stage("write", "w", "writer", &["map"], Table::new()),
            ],
            convert: None,
        };
        insert_after_reader(
            &mut spec,
            stage("dequant", "d", "transform", &[], Table::new()),
        );
        let chain: Vec<(&str, Vec<String>)> = spec
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.inputs.clone()))
            .collect();
        assert_eq!(
            chain,
            [
                ("read", vec![]),
                ("dequant", vec!["read".to_string()]),
                ("map", vec!["dequant".to_string()]),
                ("write", vec!["map".to_string()]),
            ]
        );
    }
}
