//! The `bridgeflow` command.

use anyhow::{anyhow, Context};
use bridgeflow_core::convert::{convert, Convert, Location};
use bridgeflow_core::host::{default_search_path, PluginHost};
use bridgeflow_core::jobs::{merge, preprocess, verify, JobError, Preprocess, VerifyTarget};
use bridgeflow_core::pipeline::Override;
use bridgeflow_core::runtime::{run_blocking, RunOptions, RunReport};
use bridgeflow_sdk::units::{human, parse_size};
use bridgeflow_sdk::{StageKind, StreamPlan};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "bridgeflow",
    version,
    about = "Move LLM checkpoints and datasets between Hugging Face and Megatron formats, streaming, with plugins",
    long_about = "bridgeflow runs dataflow pipelines declared in TOML files. Stages come from plugins \
                  (dynamic libraries) found on the plugin search path: --plugin-path, \
                  BRIDGEFLOW_PLUGIN_PATH, a plugins/ folder beside this binary, the binary's own \
                  folder and the workspace's target/{release,debug}.\n\nLogs: RUST_LOG=info (or debug) \
                  on stderr."
)]
struct Cli {
    /// Extra folder to search for plugin libraries (repeatable).
    #[arg(long = "plugin-path", global = true, value_name = "DIR")]
    plugin_path: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and run a pipeline file.
    Run(RunArgs),
    /// Run a training recipe (a pipeline file with a trainer stage, e.g. pipelines/pretrain.toml):
    /// one line per logged iteration (loss, lr, grad norm, tokens/s, ETA), the loss curve in
    /// the report (--report) and in the trainer's `metrics_file`.
    Train(RunArgs),
    /// Check a pipeline file without running it: plugins, kinds, inputs, cycles, port types, configs.
    Validate {
        pipeline: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = Override::parse)]
        set: Vec<Override>,
    },
    /// List the plugins found: name, version, stage kinds, file.
    Plugins {
        #[arg(long)]
        json: bool,
        /// Print the config schema (JSON Schema) of each stage of this plugin.
        #[arg(long, value_name = "PLUGIN")]
        schema: Option<String>,
    },
    /// Tokenize JSON Lines into Megatron indexed datasets, as Megatron-LM's
    /// tools/preprocess_data.py (byte-identical output): {PREFIX}_{KEY}_document.{bin,idx}.
    Preprocess {
        /// A .jsonl/.jsonl.gz/.jsonl.zst file, a folder of them, or a glob ('data/*.jsonl.zst').
        #[arg(long)]
        input: String,
        /// Folder with tokenizer.json (+ tokenizer_config.json naming the eos/EOD token).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        output_prefix: String,
        /// Keys to tokenize, each to its own dataset.
        #[arg(long, num_args = 1.., default_value = "text")]
        json_keys: Vec<String>,
        /// Append the end-of-document token to every non-empty document.
        #[arg(long)]
        append_eod: bool,
        /// Tokenizer threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Skip (and count) lines that are not valid documents instead of failing.
        #[arg(long)]
        skip_bad_lines: bool,
        /// Split the input round-robin into N partitions, run each, then merge (as
        /// preprocess_data.py --partitions). Finished partitions are skipped on a re-run.
        #[arg(long, default_value_t = 1)]
        partitions: u64,
        /// Replace existing output files.
        #[arg(long)]
        overwrite: bool,
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        memory_budget: u64,
        #[arg(long)]
        no_progress: bool,
    },
    /// Convert a checkpoint between formats, each side SCHEME:PATH as reader and writer plugins
    /// declare them (`bridgeflow plugins` lists them): `--from hf:DIR --to megatron:DIR`,
    /// `--from megatron:DIR --to hf:DIR` (the HF config is rebuilt from the checkpoint's
    /// run_config.yaml unless --hf-config is given), `--to megatron-lm:DIR --tp 2 --pp 2 [--vpp N]
    /// [--ep N]` from hf: or megatron:, and `--from megatron-lm:DIR` to hf: (with --hf-config) or
    /// megatron:. A conversion a pipeline file declares ([convert] in pipelines/*.toml) runs
    /// that pipeline; others are composed from the plugins' declarations.
    Convert(ConvertArgs),
    /// Verify a conversion: two checkpoints tensor by tensor (`--a DIR --b DIR`), a checkpoint
    /// against its blake3 manifest (`--manifest DIR`), or a Megatron checkpoint's logits against an
    /// HF model's reference logits (`--logits CKPT --hf HF_DIR`).
    Verify(VerifyArgs),
    /// Merge Megatron indexed datasets in the order given, as tools/merge_datasets.py.
    Merge {
        /// Dataset prefixes (path/name_text_document, or their .bin/.idx paths).
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Output prefix: writes OUTPUT.bin and OUTPUT.idx.
        #[arg(long)]
        output: String,
        #[arg(long)]
        overwrite: bool,
    },
    /// Remove what killed runs left beside an output: hidden staging `.NAME.TAG-PID` (folders or
    /// files) of processes that are gone, and stale `.NAME.lock` files. PATH is the output (a
    /// checkpoint folder, a dataset file) or a folder, whose outputs are then all cleaned. Lists
    /// what it removed; refuses (exit status 1) to touch what a live process may still be
    /// writing: staging whose pid is alive, or any of an output whose lock is held. Runs clean
    /// up the same way by themselves before writing an output.
    Clean { path: PathBuf },
    /// Show the tensors of a checkpoint any reader plugin understands.
    Inspect {
        path: PathBuf,
        #[arg(long)]
        json: bool,
        /// Use this reader plugin instead of probing.
        #[arg(long, value_name = "PLUGIN")]
        reader: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The pipeline file (for `train`: the recipe).
    pipeline: PathBuf,
    /// Set a variable (`name=value`) or a stage config key (`stage.key=value`).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = Override::parse)]
    set: Vec<Override>,
    /// Bytes of tensor data allowed in flight (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    memory_budget: u64,
    /// Never draw progress bars (they are drawn only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Write the run report (per-stage counts, timings, peak bytes in flight, metrics) as JSON.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// What to read, as SCHEME:PATH (hf:, megatron: (torch_dist), megatron-lm:, or any scheme a
    /// reader plugin declares).
    #[arg(long, value_parser = Location::parse, value_name = "SCHEME:PATH")]
    from: Location,
    /// What to write, as SCHEME:PATH (any scheme a writer plugin declares).
    #[arg(long, value_parser = Location::parse, value_name = "SCHEME:PATH")]
    to: Location,
    /// The HF config.json to export with (default: rebuilt from the checkpoint's run_config.yaml;
    /// required from a Megatron-LM checkpoint).
    #[arg(long)]
    hf_config: Option<PathBuf>,
    /// Tensor-parallel ranks of the output (Megatron-LM: its rank files; torch_dist: written
    /// as that many ranks would, each rank's chunks in its own files).
    #[arg(long, default_value_t = 1, value_parser = degree())]
    tp: u64,
    /// Pipeline stages of the output.
    #[arg(long, default_value_t = 1, value_parser = degree())]
    pp: u64,
    /// Megatron-LM output: virtual pipeline chunks per stage.
    #[arg(long, default_value_t = 1, value_parser = degree())]
    vpp: u64,
    /// Megatron-LM output: expert-parallel ranks.
    #[arg(long, default_value_t = 1, value_parser = degree())]
    ep: u64,
    /// Replace an existing output (atomically, once the new one is complete).
    #[arg(long)]
    overwrite: bool,
    /// Exporters: the weights' dtype in the output (auto, fp32, bf16, fp16; GGUF also q8_0).
    #[arg(long)]
    dtype: Option<String>,
    /// TensorRT-LLM output: split the embedding over the TP ranks too, by rows (0) or columns
    /// (1) (TensorRT-LLM's `--use_parallel_embedding --embedding_sharding_dim`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1))]
    parallel_embedding: Option<u64>,
    /// Override a stage's config (`write.max_shard_size=2GB`) or a pipeline variable.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = Override::parse)]
    set: Vec<Override>,
    /// Bytes of tensor data in flight between stages.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    memory_budget: u64,
    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[arg(long, requires = "b")]
    a: Option<PathBuf>,
    #[arg(long, requires = "a")]
    b: Option<PathBuf>,
    #[arg(long, conflicts_with_all = ["a", "b", "logits"])]
    manifest: Option<PathBuf>,
    #[arg(long, requires = "hf", conflicts_with_all = ["a", "b"])]
    logits: Option<PathBuf>,
    #[arg(long)]
    hf: Option<PathBuf>,
    /// Largest accepted |difference| (default: exact for --a/--b, 1e-4 for --logits).
    #[arg(long)]
    tolerance: Option<f64>,
}

/// The largest parallel degree the command line takes (writers check their own limits too).
const MAX_DEGREE: u64 = 65536;

/// A parallel degree on the command line: 1 to 65536 (clap names the option when it is not).
fn degree() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=MAX_DEGREE)
}

fn main() -> ExitCode {
    // Die quietly when stdout is a closed pipe (`bridgeflow inspect … | head`), as CLIs do.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // glibc raises its mmap threshold after each large free, so later tensor-sized buffers come
    // from the heap and stay resident after they are freed; a fixed threshold keeps every
    // buffer of 4 MiB or more its own mapping, returned to the system when dropped (the memory
    // budget then bounds RSS, not the allocator's history).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
    init_tracing();
    let cli = Cli::parse();
    if let Command::Clean { path } = &cli.command {
        return cmd_clean(path);
    }
    let host = PluginHost::discover(default_search_path(&cli.plugin_path));
    let result = match cli.command {
        Command::Run(args) => cmd_run(&host, args, false),
        Command::Train(args) => cmd_run(&host, args, true),
        Command::Validate { pipeline, set } => cmd_validate(&host, pipeline, &set),
        Command::Plugins { json, schema } => cmd_plugins(&host, json, schema),
        Command::Clean { .. } => unreachable!("handled before plugin discovery"),
        Command::Inspect { path, json, reader } => cmd_inspect(&host, path, json, reader),
        Command::Preprocess {
            input,
            tokenizer,
            output_prefix,
            json_keys,
            append_eod,
            workers,
            skip_bad_lines,
            partitions,
            overwrite,
            memory_budget,
            no_progress,
        } => cmd_preprocess(
            &host,
            Preprocess {
                input,
                tokenizer,
                output_prefix,
                json_keys,
                append_eod,
                workers,
                skip_bad_lines,
                partitions,
                overwrite,
            },
            RunOptions {
                memory_budget,
                progress: !no_progress,
                ..Default::default()
            },
        ),
        Command::Convert(args) => cmd_convert(&host, args),
        Command::Verify(args) => cmd_verify(&host, args),
        Command::Merge {
            inputs,
            output,
            overwrite,
        } => match merge(&inputs, &output, overwrite, &host, &RunOptions::default()) {
            Ok(r) => {
                print_report(&r);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => job_failed(e),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `bridgeflow clean PATH`.
fn cmd_clean(path: &std::path::Path) -> ExitCode {
    let done = match bridgeflow_sdk::fsutil::clean(path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    for p in &done.removed {
        println!("removed {}", p.display());
    }
    for (from, to) in &done.restored {
        println!(
            "restored {} as {} (an overwrite was killed half-way)",
            from.display(),
            to.display()
        );
    }
    for (p, why) in &done.kept {
        eprintln!("refusing to remove {}: {why}", p.display());
    }
    if done.removed.is_empty() && done.restored.is_empty() && done.kept.is_empty() {
        println!("nothing to clean at {}", path.display());
    }
    if done.kept.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A training step frees and allocates the same tensor-sized buffers every iteration (logits,
/// activations, gradients: hundreds of MB each), from the runtime's worker threads. glibc gives
/// each thread its own arena and serves anything above 64 MiB there with a fresh mapping, so
/// every step faulted in its whole working set again as zeroed pages: 330k page faults and
/// about a quarter of the step in the kernel on the 32M-parameter benchmark model. One arena
/// (the main one, which grows with brk), no mappings and no trimming keep the freed buffers
/// for the next step: +18 % tokens/s and a lower peak RSS there, since the live set, not the
/// allocator's history, is what a step needs. A stage cannot do this itself (the arenas exist
/// by the time it runs): `cmd_run` calls it once the pipeline has a trainer stage, while the
/// process still has one thread. Conversions keep main's policy (every large buffer returned
/// when dropped).
fn allocate_for_training() {
    threads_for_training();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Two settings of candle's CPU threads, each left alone when the user has set it:
/// - candle asks for its thread count before every matrix product and elementwise op, and
///   unless `RAYON_NUM_THREADS` is set that means `num_cpus::get_physical()`: /proc/cpuinfo
///   read and parsed each time, ~27 times a step, a sixth of a step on the tiny fixture (60k →
///   72k tokens/s). Fixed once to the same count (physical cores), for candle and rayon alike.
/// - candle's elementwise workers spin 25,000 times between ops before they sleep; with as
///   many workers as cores they took a third of the CPU from the step's own threads (the
///   profile's top entry on the tiny fixture). 200 spins: 78k → 95–108k tokens/s there, the
///   32M model unchanged or slightly faster.
///
/// Called before the runtime starts any thread, so nothing reads the environment concurrently.
fn threads_for_training() {
    let defaults = [
        (
            "RAYON_NUM_THREADS",
            num_cpus::get_physical().max(1).to_string(),
        ),
        ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200".to_string()),
    ];
    for (key, value) in defaults {
        if std::env::var_os(key).is_none() {
            std::env::set_var(key, value);
        }
    }
}

fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `bridgeflow run` (any pipeline) and `bridgeflow train` (one with a trainer stage).
fn cmd_run(host: &PluginHost, a: RunArgs, training: bool) -> anyhow::Result<ExitCode> {
    let graph = match bridgeflow_core::load_pipeline(&a.pipeline, &a.set, host) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if training && !graph.nodes.iter().any(|n| n.kind == StageKind::Trainer) {
        eprintln!(
            "error: {} has no trainer stage (kind = \"trainer\"); `bridgeflow run` runs any pipeline",
            a.pipeline.display()
        );
        return Ok(ExitCode::from(2));
    }
    if graph.nodes.iter().any(|n| n.kind == StageKind::Trainer) {
        allocate_for_training();
    }
    let report_path = a.report;
    let opts = RunOptions {
        memory_budget: a.memory_budget,
        progress: !a.no_progress,
        ..Default::default()
    };
    match run_blocking(graph, opts) {
        Ok(report) => {
            print_report(&report);
            if let Some(p) = report_path {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing report {}", p.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// `bridgeflow convert`: only options that differ from their defaults are passed on (see
/// `bridgeflow_core::convert`).
fn cmd_convert(host: &PluginHost, a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let mut options: Vec<(String, toml::Value)> =
        [("tp", a.tp), ("pp", a.pp), ("vpp", a.vpp), ("ep", a.ep)]
            .into_iter()
            .filter(|&(_, v)| v != 1)
            .map(|(k, v)| (k.to_string(), toml::Value::Integer(v as i64)))
            .collect();
    if let Some(c) = a.hf_config {
        options.push((
            "hf_config".into(),
            toml::Value::String(c.to_string_lossy().into()),
        ));
    }
    if a.overwrite {
        options.push(("overwrite".into(), toml::Value::Boolean(true)));
    }
    if let Some(d) = a.dtype {
        options.push(("dtype".into(), toml::Value::String(d)));
    }
    if let Some(d) = a.parallel_embedding {
        options.push(("parallel_embedding".into(), toml::Value::Integer(d as i64)));
    }
    let req = Convert {
        from: Some(a.from),
        to: Some(a.to),
        options,
        overrides: a.set,
    };
    let opts = RunOptions {
        memory_budget: a.memory_budget,
        progress: !a.no_progress,
        ..Default::default()
    };
    match convert(&req, host, &opts) {
        Ok(r) => {
            print_report(&r);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => job_failed(e),
    }
}

fn cmd_verify(host: &PluginHost, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let target = match (a.a, a.b, a.manifest, a.logits, a.hf) {
        (Some(x), Some(y), None, None, _) => VerifyTarget::Compare {
            a: x,
            b: y,
            tolerance: a.tolerance.unwrap_or(0.0),
        },
        (None, None, Some(path), None, _) => VerifyTarget::Manifest { path },
        (None, None, None, Some(megatron), Some(hf)) => VerifyTarget::Logits {
            megatron,
            hf,
            tolerance: a.tolerance.unwrap_or(1e-4),
        },
        _ => {
            eprintln!("error: give --a and --b, or --manifest, or --logits with --hf");
            return Ok(ExitCode::from(2));
        }
    };
    match verify(&target, host, &RunOptions::default()) {
        Ok(r) => {
            print_report(&r);
            println!("verified: OK");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => job_failed(e),
    }
}

fn job_failed(e: JobError) -> anyhow::Result<ExitCode> {
    eprintln!("error: {e}");
    Ok(ExitCode::from(match e {
        JobError::Invalid(_) => 2,
        JobError::Run(_) => 1,
    }))
}

fn cmd_preprocess(host: &PluginHost, p: Preprocess, opts: RunOptions) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let reports = match preprocess(&p, host, &opts) {
        Ok(r) => r,
        Err(e) => return job_failed(e),
    };
    let secs = started.elapsed().as_secs_f64();
    for r in &reports {
        for s in &r.stages {
            if !s.summary.is_empty() {
                println!("  {}: {}", s.name, s.summary);
            }
        }
    }
    // What the stages reported: documents of the first key's output, bytes the reader read.
    let first = format!("{}_{}_document", p.output_prefix, p.json_keys[0]);
    let metrics = || {
        reports
            .iter()
            .flat_map(|r| r.stages.iter())
            .map(|s| &s.metrics)
    };
    let docs = metrics()
        .filter_map(|m| m["outputs"].as_array())
        .flatten()
        .filter(|o| o["prefix"].as_str() == Some(first.as_str()))
        .filter_map(|o| o["documents"].as_u64())
        .next_back()
        .unwrap_or(0);
    let input_bytes = metrics()
        .filter_map(|m| m["input_bytes"].as_u64())
        .max()
        .unwrap_or(0);
    println!(
        "preprocessed {docs} documents ({}) in {secs:.2} s: {:.0} docs/s, {:.1} MB/s",
        human(input_bytes),
        docs as f64 / secs,
        input_bytes as f64 / 1e6 / secs
    );
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &RunReport) {
    println!("pipeline '{}' finished in {:.2} s", r.pipeline, r.seconds);
    for s in &r.stages {
        let moved = if s.items_out > 0 {
            format!("{} items out, {}", s.items_out, human(s.bytes_out))
        } else {
            format!("{} items in, {}", s.items_in, human(s.bytes_in))
        };
        let rate = if s.seconds > 0.0 {
            format!(
                ", {}/s",
                human(((s.bytes_in.max(s.bytes_out)) as f64 / s.seconds) as u64)
            )
        } else {
            String::new()
        };
        print!(
            "  {:<14} {:<12} {moved}{rate} in {:.2} s",
            s.name,
            format!("{} {}", s.plugin, s.kind),
            s.seconds
        );
        if !s.summary.is_empty() {
            print!(" — {}", s.summary);
        }
        println!();
        if let Some(m) = metrics_line(&s.metrics) {
            println!("  {:<14} {m}", "");
        }
    }
    println!(
        "  peak tensor data in flight: {} (budget {})",
        human(r.peak_in_flight),
        human(r.budget)
    );
    if r.peak_retained > 0 {
        println!(
            "  peak tensor data retained by stateful stages: {} (apart from the budget)",
            human(r.peak_retained)
        );
    }
}

/// A stage's metrics on one line: its top-level numbers, strings and booleans (`key=value`),
/// lists by their length and last value (a loss curve: `loss=[20 values, last 2.31]`).
fn metrics_line(m: &serde_json::Value) -> Option<String> {
    let obj = m.as_object()?;
    let parts: Vec<String> = obj
        .iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Array(a) => match a.last() {
                Some(last) if last.is_object() || last.is_array() => None,
                Some(last) => Some(format!("{k}=[{} values, last {last}]", a.len())),
                None => None,
            },
            serde_json::Value::Object(_) | serde_json::Value::Null => None,
            serde_json::Value::String(t) => Some(format!("{k}={t}")),
            other => Some(format!("{k}={other}")),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn cmd_validate(
    host: &PluginHost,
    pipeline: PathBuf,
    set: &[Override],
) -> anyhow::Result<ExitCode> {
    match bridgeflow_core::load_pipeline(&pipeline, set, host) {
        Ok(g) => {
            println!(
                "{}: ok, {} stage{}",
                pipeline.display(),
                g.nodes.len(),
                if g.nodes.len() == 1 { "" } else { "s" }
            );
            for n in &g.nodes {
                let ins: Vec<String> = n
                    .inputs
                    .iter()
                    .map(|u| {
                        let up = &g.nodes[u.node];
                        match up.descriptor.outputs.len() {
                            1 => up.name.clone(),
                            _ => format!("{}.{}", up.name, up.descriptor.outputs[u.port].name),
                        }
                    })
                    .collect();
                println!(
                    "  {:<14} {} {}{}",
                    n.name,
                    n.plugin,
                    n.kind,
                    if ins.is_empty() {
                        String::new()
                    } else {
                        format!(" <- {}", ins.join(", "))
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn cmd_plugins(host: &PluginHost, json: bool, schema: Option<String>) -> anyhow::Result<ExitCode> {
    if let Some(name) = schema {
        let p = host
            .plugin(&name)
            .ok_or_else(|| anyhow!("no plugin named '{name}'"))?;
        for s in p.descriptor.stages.iter() {
            println!("# {} {}: {}", name, s.kind, s.description);
            println!("{}", s.config_schema);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        let list: Vec<serde_json::Value> = host
            .plugins
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name(),
                    "version": p.descriptor.version.as_str(),
                    "sdk_version": p.descriptor.sdk_version.as_str(),
                    "kinds": p.kinds().iter().map(|k| k.name()).collect::<Vec<_>>(),
                    "stages": p.descriptor.stages.iter().map(stage_json).collect::<Vec<_>>(),
                    "file": host.library_of(p).path,
                    "description": p.descriptor.description.as_str(),
                })
            })
            .collect();
        let refused: Vec<serde_json::Value> = host
            .refused
            .iter()
            .map(|r| serde_json::json!({"file": r.path, "reason": r.reason}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"plugins": list, "refused": refused})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if host.plugins.is_empty() {
        println!("no plugins found; searched:");
        for d in &host.search_path {
            println!("  {}", d.display());
        }
    }
    for p in &host.plugins {
        let kinds: Vec<&str> = p.kinds().iter().map(|k| k.name()).collect();
        println!(
            "{:<14} {:<8} {:<28} {}",
            p.name(),
            p.descriptor.version.as_str(),
            kinds.join(","),
            host.library_of(p).path.display()
        );
        println!("{:<14} {}", "", p.descriptor.description.as_str());
        for s in p.descriptor.stages.iter() {
            for e in s.endpoints.iter() {
                println!(
                    "{:<14} {} {}: ({} names) {}",
                    "", s.kind, e.scheme, e.naming, e.description
                );
            }
        }
    }
    for r in &host.refused {
        println!("refused {}: {}", r.path.display(), r.reason);
    }
    Ok(ExitCode::SUCCESS)
}

/// A stage's declaration for `plugins --json`.
fn stage_json(s: &bridgeflow_sdk::StageDescriptor) -> serde_json::Value {
    serde_json::json!({
        "kind": s.kind.name(),
        "description": s.description.as_str(),
        "inputs": s.inputs.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "outputs": s.outputs.iter()
            .map(|o| serde_json::json!({"name": o.name.as_str(), "type": o.ty.name()}))
            .collect::<Vec<_>>(),
        "retains_inputs": s.retains_inputs,
        "endpoints": s.endpoints.iter()
            .map(|e| serde_json::json!({
                "scheme": e.scheme.as_str(),
                "aliases": e.aliases.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
                "naming": e.naming.as_str(),
                "options": e.options.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>(),
        "translations": s.translations.iter()
            .map(|t| serde_json::json!({"from": t.from.as_str(), "to": t.to.as_str()}))
            .collect::<Vec<_>>(),
        "quant_methods": s.quant_methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
    })
}

fn cmd_inspect(
    host: &PluginHost,
    path: PathBuf,
    json: bool,
    reader: Option<String>,
) -> anyhow::Result<ExitCode> {
    let plugin = match &reader {
        Some(name) => host
            .plugin(name)
            .filter(|p| p.stage(StageKind::Reader).is_some())
            .ok_or_else(|| anyhow!("no reader plugin named '{name}'"))?,
        None => host.probe_reader(&path).ok_or_else(|| {
            anyhow!(
                "no reader plugin recognises {} (readers: {})",
                path.display(),
                host.plugins
                    .iter()
                    .filter(|p| p.stage(StageKind::Reader).is_some())
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
    };
    let config = serde_json::json!({ "path": path }).to_string();
    let mut stage = host
        .create(plugin, StageKind::Reader, &config)
        .map_err(|e| anyhow!("{} reader: {e}", plugin.name()))?;
    let plan: StreamPlan = stage
        .plan(Vec::new().into())
        .into_result()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .into_iter()
        .next()
        .unwrap_or_default();
    if json {
        let tensors: Vec<serde_json::Value> = plan
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name(),
                    "dtype": t.dtype.name(),
                    "shape": t.shape.as_slice(),
                    "bytes": t.nbytes(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "path": path,
            "reader": plugin.name(),
            "tensors": tensors,
            "total_bytes": plan.total_bytes(),
            "attrs": plan.attrs(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if plan.tensors.is_empty() {
        println!("{} (read by {})", path.display(), plugin.name());
        for (k, v) in plan.attrs() {
            println!("  {k}: {v}");
        }
    } else {
        println!("{} (read by {})", path.display(), plugin.name());
        let width = plan
            .tensors
            .iter()
            .map(|t| t.name().len())
            .max()
            .unwrap_or(4);
        for t in plan.tensors.iter() {
            println!(
                "  {:<width$}  {:<8} {:<20} {}",
                t.name(),
                t.dtype.name(),
                t.shape_string(),
                t.nbytes().map(human).unwrap_or_else(|| "overflow".into())
            );
        }
        let mut by_dtype = std::collections::BTreeMap::new();
        for t in plan.tensors.iter() {
            *by_dtype.entry(t.dtype.name()).or_insert(0u64) += t.nbytes().unwrap_or(0);
        }
        let params: u64 = plan.tensors.iter().map(|t| t.numel().unwrap_or(0)).sum();
        println!(
            "{} tensors, {} parameters, {} ({})",
            plan.tensors.len(),
            params,
            human(plan.total_bytes()),
            by_dtype
                .iter()
                .map(|(d, b)| format!("{d}: {}", human(*b)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
