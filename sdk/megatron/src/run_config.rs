//! Megatron-Bridge's `run_config.yaml` as it travels with the weights: the import's (the
//! models mapper's), else the input checkpoint's own, with the fields a new layout or a
//! training run changes set in its text (everything else kept as it was).

use bridgeflow_sdk::{attrs, PluginError, Result, StreamPlan};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The largest `run_config.yaml` carried over (Megatron-Bridge's are tens of KiB).
const MAX_RUN_CONFIG_BYTES: u64 = 16 << 20;

/// The plan's run config: the mapper's (`run_config_yaml`), else the `run_config.yaml` beside
/// the checkpoint the torch_dist reader read (`checkpoint_dir`), else none.
pub fn of_plan(plan: &StreamPlan) -> Result<Option<String>> {
    match plan.get(attrs::RUN_CONFIG_YAML) {
        Some(rc) => Ok(Some(rc)),
        None => carried(plan),
    }
}

/// The input checkpoint's `run_config.yaml`, so that a re-sharded checkpoint still exports to
/// HF and loads in Megatron-Bridge without being told its config.
fn carried(plan: &StreamPlan) -> Result<Option<String>> {
    let Some(dir) = plan.get(attrs::CHECKPOINT_DIR) else {
        return Ok(None);
    };
    let p = Path::new(&dir).join("run_config.yaml");
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PluginError::io(&p, "cannot read", e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_RUN_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| PluginError::io(&p, "cannot read", e))?;
    if bytes.len() as u64 > MAX_RUN_CONFIG_BYTES {
        return Err(PluginError::format(format!(
            "{}: larger than {} MiB, more than any run config",
            p.display(),
            MAX_RUN_CONFIG_BYTES >> 20
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| PluginError::format(format!("{}: not UTF-8: {e}", p.display())))
}

/// `yaml` with every `key: V` line of `values` (any indentation, V a plain integer or
/// boolean) saying the new value; everything else as it was.
pub fn with_values(yaml: &str, values: &[(&str, &str)]) -> String {
    let scalar = |v: &str| v.parse::<i64>().is_ok() || v == "true" || v == "false";
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let indent = body.len() - body.trim_start().len();
        let set = values.iter().find_map(|(k, v)| {
            let old = body[indent..].strip_prefix(k)?.strip_prefix(':')?.trim();
            scalar(old).then(|| format!("{}{k}: {v}", &body[..indent]))
        });
        match set {
            Some(l) => {
                out.push_str(&l);
                out.push_str(&line[body.len()..]);
            }
            None => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_values;

    #[test]
    fn only_the_named_scalar_fields_change() {
        let rc = "model:\n  _target_: x.GPTModelProvider\n  tensor_model_parallel_size: 1\n  \
                  pipeline_model_parallel_size: 1\r\n  virtual_pipeline_model_parallel_size: null\n  \
                  hidden_size: 64\nnote: tensor_model_parallel_size: 1\ncheckpoint:\n  save_optim: false\n";
        let got = with_values(
            rc,
            &[
                ("tensor_model_parallel_size", "2"),
                ("pipeline_model_parallel_size", "4"),
                ("save_optim", "true"),
            ],
        );
        assert_eq!(
            got,
            "model:\n  _target_: x.GPTModelProvider\n  tensor_model_parallel_size: 2\n  \
             pipeline_model_parallel_size: 4\r\n  virtual_pipeline_model_parallel_size: null\n  \
             hidden_size: 64\nnote: tensor_model_parallel_size: 1\ncheckpoint:\n  save_optim: true\n"
        );
        assert_eq!(with_values(rc, &[]), rc);
    }
}
