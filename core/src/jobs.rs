//! The common jobs behind one-line commands (`bridgeflow preprocess`, `bridgeflow merge`,
//! `bridgeflow verify`; `bridgeflow convert` is in [`crate::convert`]): each
//! builds an ordinary pipeline from plugins and runs it through the same runtime, so they
//! validate, stream, cancel and report exactly as pipeline files do.

use crate::error::RunError;
use crate::graph;
use crate::host::PluginHost;
use crate::pipeline::{PipelineSpec, StageSpec};
use crate::runtime::{run_blocking, RunOptions, RunReport};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

#[derive(Debug)]
pub enum JobError {
    Invalid(String),
    Run(RunError),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Invalid(s) => f.write_str(s),
            JobError::Run(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for JobError {}

pub(crate) fn stage(
    name: &str,
    plugin: &str,
    kind: &str,
    inputs: &[&str],
    config: Table,
) -> StageSpec {
    StageSpec {
        name: name.into(),
        plugin: plugin.into(),
        kind: kind.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        config,
        line: None,
    }
}

pub(crate) fn table(pairs: Vec<(&str, Value)>) -> Table {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().cloned().map(Value::String).collect())
}

fn run(
    name: &str,
    stages: Vec<StageSpec>,
    host: &PluginHost,
    opts: &RunOptions,
) -> Result<RunReport, JobError> {
    let spec = PipelineSpec {
        file: PathBuf::from(format!("<{name}>")),
        name: name.into(),
        description: String::new(),
        vars: Default::default(),
        stages,
        convert: None,
    };
    run_spec(spec, host, opts)
}

/// Validates, builds and runs a pipeline spec.
pub(crate) fn run_spec(
    spec: PipelineSpec,
    host: &PluginHost,
    opts: &RunOptions,
) -> Result<RunReport, JobError> {
    let graph = graph::build(spec, host).map_err(|e| JobError::Invalid(e.to_string()))?;
    run_blocking(graph, opts.clone()).map_err(JobError::Run)
}

#[derive(Debug, Clone)]
pub struct Preprocess {
    pub input: String,
    pub tokenizer: PathBuf,
    pub output_prefix: String,
    pub json_keys: Vec<String>,
    pub append_eod: bool,
    pub workers: usize,
    pub skip_bad_lines: bool,
    /// Split the input round-robin into this many partitions, run each, then merge (the order
    /// of `preprocess_data.py --partitions`). Finished partitions are kept and skipped on a
    /// re-run, so a failed job resumes where it stopped.
    pub partitions: u64,
    pub overwrite: bool,
}

fn part_prefix(prefix: &str, k: u64, n: u64) -> String {
    format!("{prefix}.part{k}-of-{n}")
}

fn dataset_exists(prefix: &str) -> bool {
    Path::new(&format!("{prefix}.idx")).is_file() && Path::new(&format!("{prefix}.bin")).is_file()
}

/// Most partitions and workers `preprocess` takes: each partition is a pipeline run and a
/// dataset to merge, each worker a thread; beyond these a typo stalls the machine.
const MAX_PARTITIONS: u64 = 1024;
const MAX_WORKERS: usize = 1024;

/// `--partitions` and `--workers` against their ranges, before anything is built.
fn check_counts(p: &Preprocess) -> Result<(), JobError> {
    if !(1..=MAX_PARTITIONS).contains(&p.partitions) {
        return Err(JobError::Invalid(format!(
            "--partitions is {}; allowed: 1 to {MAX_PARTITIONS}",
            p.partitions
        )));
    }
    if p.workers > MAX_WORKERS {
        return Err(JobError::Invalid(format!(
            "--workers is {}; allowed: 0 (all cores) to {MAX_WORKERS}",
            p.workers
        )));
    }
    Ok(())
}

/// Tokenizes JSON Lines into `{output_prefix}_{key}_document.{bin,idx}`.
pub fn preprocess(
    p: &Preprocess,
    host: &PluginHost,
    opts: &RunOptions,
) -> Result<Vec<RunReport>, JobError> {
    let pipeline = |out: &str, partition: Option<(u64, u64)>| {
        let mut read = table(vec![
            ("path", Value::String(p.input.clone())),
            ("json_keys", strings(&p.json_keys)),
            ("skip_bad_lines", Value::Boolean(p.skip_bad_lines)),
        ]);
        if let Some((k, n)) = partition {
            read.insert(
                "partition".into(),
                Value::Table(table(vec![
                    ("index", Value::Integer(k as i64)),
                    ("count", Value::Integer(n as i64)),
                ])),
            );
        }
        vec![
            stage("read", "jsonl", "reader", &[], read),
            stage(
                "tokenize",
                "tokenize",
                "transform",
                &["read"],
                table(vec![
                    (
                        "tokenizer",
                        Value::String(p.tokenizer.to_string_lossy().into()),
                    ),
                    ("json_keys", strings(&p.json_keys)),
                    ("append_eod", Value::Boolean(p.append_eod)),
                    ("workers", Value::Integer(p.workers as i64)),
                ]),
            ),
            stage(
                "write",
                "megatron-indexed",
                "writer",
                &["tokenize"],
                table(vec![
                    ("output_prefix", Value::String(out.into())),
                    ("overwrite", Value::Boolean(p.overwrite)),
                ]),
            ),
        ]
    };
    check_counts(p)?;
    if p.partitions <= 1 {
        return Ok(vec![run(
            "preprocess",
            pipeline(&p.output_prefix, None),
            host,
            opts,
        )?]);
    }
    let n = p.partitions;
    let mut reports = Vec::new();
    for k in 0..n {
        let prefix = part_prefix(&p.output_prefix, k, n);
        let done = p
            .json_keys
            .iter()
            .all(|key| dataset_exists(&format!("{prefix}_{key}_document")));
        if done && !p.overwrite {
            tracing::info!(partition = k, "already written; skipping");
            continue;
        }
        reports.push(run(
            &format!("preprocess partition {k} of {n}"),
            pipeline(&prefix, Some((k, n))),
            host,
            opts,
        )?);
    }
    for key in &p.json_keys {
        let parts: Vec<String> = (0..n)
            .map(|k| format!("{}_{key}_document", part_prefix(&p.output_prefix, k, n)))
            .collect();
        let out = format!("{}_{key}_document", p.output_prefix);
        reports.push(merge(&parts, &out, p.overwrite, host, opts)?);
        for part in &parts {
            let _ = std::fs::remove_file(format!("{part}.bin"));
            let _ = std::fs::remove_file(format!("{part}.idx"));
        }
    }
    Ok(reports)
}

/// Concatenates indexed datasets into `{output}.bin/.idx`, as `tools/merge_datasets.py` does.
pub fn merge(
    inputs: &[String],
    output: &str,
    overwrite: bool,
    host: &PluginHost,
    opts: &RunOptions,
) -> Result<RunReport, JobError> {
    let stages = vec![
        stage(
            "read",
            "megatron-indexed",
            "reader",
            &[],
            table(vec![("path", strings(inputs))]),
        ),
        stage(
            "write",
            "megatron-indexed",
            "writer",
            &["read"],
            table(vec![
                ("output_prefix", Value::String(output.into())),
                ("exact_prefix", Value::Boolean(true)),
                ("overwrite", Value::Boolean(overwrite)),
            ]),
        ),
    ];
    run("merge", stages, host, opts)
}

/// What `bridgeflow verify` checks.
#[derive(Debug, Clone)]
pub enum VerifyTarget {
    /// Two checkpoints of any readable format, tensor by tensor (exact, or within a tolerance).
    Compare {
        a: PathBuf,
        b: PathBuf,
        tolerance: f64,
    },
    /// A checkpoint against the blake3 manifest written beside it.
    Manifest { path: PathBuf },
    /// A Megatron checkpoint's fp32 logits against an HF model's reference logits.
    Logits {
        megatron: PathBuf,
        hf: PathBuf,
        tolerance: f64,
    },
}

fn reader_stage(
    name: &str,
    path: &Path,
    host: &PluginHost,
    extra: Vec<(&str, Value)>,
) -> Result<StageSpec, JobError> {
    let plugin = host.probe_reader(path).ok_or_else(|| {
        JobError::Invalid(format!("no reader plugin recognises {}", path.display()))
    })?;
    let mut cfg = table(vec![(
        "path",
        Value::String(path.to_string_lossy().into_owned()),
    )]);
    for (k, v) in extra {
        cfg.insert(k.into(), v);
    }
    Ok(stage(name, plugin.name(), "reader", &[], cfg))
}

/// `bridgeflow verify`: one of the checks, as a pipeline; its summary says what was compared.
pub fn verify(
    target: &VerifyTarget,
    host: &PluginHost,
    opts: &RunOptions,
) -> Result<RunReport, JobError> {
    let stages = match target {
        VerifyTarget::Compare { a, b, tolerance } => vec![
            reader_stage("a", a, host, vec![])?,
            reader_stage("b", b, host, vec![])?,
            stage(
                "compare",
                "verify",
                "transform",
                &["a", "b"],
                table(vec![("tolerance", Value::Float(*tolerance))]),
            ),
        ],
        VerifyTarget::Manifest { path } => {
            vec![reader_stage(
                "read",
                path,
                host,
                vec![("verify", Value::Boolean(true))],
            )?]
        }
        VerifyTarget::Logits {
            megatron,
            hf,
            tolerance,
        } => vec![
            stage(
                "read",
                "torch-dist",
                "reader",
                &[],
                table(vec![
                    (
                        "path",
                        Value::String(megatron.to_string_lossy().into_owned()),
                    ),
                    ("split_layers", Value::Boolean(true)),
                ]),
            ),
            stage(
                "check",
                "llama-logits",
                "transform",
                &["read"],
                table(vec![
                    (
                        "hf_config",
                        Value::String(hf.join("config.json").to_string_lossy().into_owned()),
                    ),
                    (
                        "reference",
                        Value::String(
                            hf.join("reference/logits.safetensors")
                                .to_string_lossy()
                                .into_owned(),
                        ),
                    ),
                    ("tolerance", Value::Float(*tolerance)),
                ]),
            ),
        ],
    };
    run("verify", stages, host, opts)
}
