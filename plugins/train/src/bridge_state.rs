//! What Megatron-Bridge keeps beside the tensors of a training checkpoint, as it saves it with
//! megatron-core's distributed optimizer in the `fully_reshardable` form (Bridge 0.6.2,
//! megatron-core 0.19.2, no Transformer Engine or Apex, so torch's AdamW):
//!
//! - the common state: `checkpoint_version`, `iteration`, the optimizer's `param_groups` (every
//!   hyper-parameter torch's AdamW keeps, megatron-core's group keys, Adam's step), the
//!   sharding type, `opt_param_scheduler`'s state and the `content_metadata` the loader reads
//!   the sharding type from;
//! - `train_state.pt`: `TrainState`'s 0-d tensors (step, samples consumed and skipped, …).
//!
//! The optimizer's tensors themselves are `optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`,
//! each with its model key's shape and chunks (see [`crate::checkpoint`]).

use crate::config::TrainConfig;
use crate::schedule::Schedule;
use bridgeflow_megatron::checkpoint::TorchSave;
use bridgeflow_megatron::emit::PyValue;
use bridgeflow_megatron::pickle::Value;
use bridgeflow_sdk::{DType, PluginError, Result};

/// The per-state tensors the distributed optimizer keeps for each parameter, in its order.
pub const OPTIMIZER_STATES: [&str; 3] = ["param", "exp_avg", "exp_avg_sq"];

/// The key of a parameter's optimizer state `state` for the model key `key`.
pub fn optimizer_key(state: &str, key: &str) -> String {
    format!("optimizer.state.{state}.{key}")
}

/// Where training stands: what a checkpoint saves (in Bridge's terms) and a resume restores.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub iteration: u64,
    pub consumed_train_samples: u64,
    /// Samples the schedule counted (those of iterations that updated the weights).
    pub scheduled_samples: u64,
    pub consumed_valid_samples: u64,
    /// fp16's scaler: (scale, growth tracker, hysteresis tracker).
    pub loss_scale: Option<(f64, u64, u64)>,
}

/// The run's settings the saved state repeats (Bridge checks the scheduler's against its own
/// config on resume, and finds each parameter group by its identifying values).
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub schedule: Schedule,
    pub lr_decay_style: String,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub global_batch_size: u64,
    pub train_iters: u64,
    pub validates: bool,
}

impl RunSettings {
    pub fn of(cfg: &TrainConfig, schedule: &Schedule) -> RunSettings {
        RunSettings {
            schedule: schedule.clone(),
            lr_decay_style: cfg.lr_decay_style.clone(),
            weight_decay: cfg.weight_decay,
            betas: (cfg.adam_beta1, cfg.adam_beta2),
            eps: cfg.adam_eps,
            global_batch_size: cfg.global_batch_size as u64,
            train_iters: cfg.train_iters,
            validates: cfg.eval_interval > 0,
        }
    }
}

/// A parameter group as megatron-core forms them: parameters that decay or not, expert
/// (expert-parallel) parameters or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    /// megatron-core sorts the groups without overrides (those that decay) first.
    pub no_decay: bool,
    pub expert: bool,
}

impl Group {
    /// The group of a trainable parameter; routed experts' weights are expert-parallel.
    pub fn of(name: &str, decays: bool) -> Group {
        Group {
            no_decay: !decays,
            expert: bridgeflow_megatron::names::has_stacked_experts(name),
        }
    }
}

/// One saved parameter group, keys in torch's and megatron-core's order, after `adam_step`
/// updates. Its lr and weight decay are those the scheduler set after the last step (the next
/// iteration's).
fn param_group(g: Group, run: &RunSettings, p: &Progress, adam_step: u64) -> PyValue {
    let wd_mult = if g.no_decay { 0.0 } else { 1.0 };
    let s = &run.schedule;
    PyValue::dict([
        ("is_expert_parallel", PyValue::Bool(g.expert)),
        ("default_config", PyValue::Bool(true)),
        ("wd_mult", PyValue::Float(wd_mult)),
        ("lr_mult", PyValue::Float(1.0)),
        ("is_decoupled_lr", PyValue::Bool(false)),
        ("max_lr", PyValue::Float(s.max_lr)),
        ("min_lr", PyValue::Float(s.min_lr)),
        ("lr", PyValue::Float(s.lr(p.scheduled_samples))),
        (
            "betas",
            PyValue::Tuple(vec![
                PyValue::Float(run.betas.0),
                PyValue::Float(run.betas.1),
            ]),
        ),
        ("eps", PyValue::Float(run.eps)),
        ("weight_decay", PyValue::Float(run.weight_decay * wd_mult)),
        ("amsgrad", PyValue::Bool(false)),
        ("maximize", PyValue::Bool(false)),
        ("foreach", PyValue::None),
        ("capturable", PyValue::Bool(false)),
        ("differentiable", PyValue::Bool(false)),
        ("fused", PyValue::None),
        ("decoupled_weight_decay", PyValue::Bool(true)),
        // torch's AdamW keeps its step as a float tensor; megatron-core saves `.item()`.
        ("step", PyValue::Float(adam_step as f64)),
    ])
}

/// `OptimizerParamScheduler.state_dict()`: counted in samples; weight decay constant.
fn scheduler_state(run: &RunSettings, p: &Progress) -> PyValue {
    let s = &run.schedule;
    let wd_incr_steps = run.train_iters * run.global_batch_size;
    PyValue::dict([
        ("max_lr", PyValue::Float(s.max_lr)),
        ("lr_warmup_steps", PyValue::Int(s.warmup_steps as i64)),
        ("num_steps", PyValue::Int(p.scheduled_samples as i64)),
        ("lr_decay_style", PyValue::str(run.lr_decay_style.as_str())),
        ("lr_decay_steps", PyValue::Int(s.decay_steps as i64)),
        ("min_lr", PyValue::Float(s.min_lr)),
        ("start_wd", PyValue::Float(run.weight_decay)),
        ("end_wd", PyValue::Float(run.weight_decay)),
        ("wd_incr_style", PyValue::str("constant")),
        ("wd_incr_steps", PyValue::Int(wd_incr_steps as i64)),
    ])
}

fn scalar_f32(v: f64) -> PyValue {
    PyValue::Tensor(DType::F32, vec![], (v as f32).to_le_bytes().to_vec())
}

/// The checkpoint's common state, for the parameter groups `groups` (those with parameters),
/// after `adam_step` updates.
pub fn common_state(groups: &[Group], run: &RunSettings, p: &Progress, adam_step: u64) -> PyValue {
    let mut sorted = groups.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut optimizer = vec![
        (
            "optimizer".to_string(),
            PyValue::dict([(
                "param_groups",
                PyValue::List(
                    sorted
                        .iter()
                        .map(|&g| param_group(g, run, p, adam_step))
                        .collect(),
                ),
            )]),
        ),
        (
            "param_state_sharding_type".to_string(),
            PyValue::str("fully_reshardable"),
        ),
    ];
    if let Some((scale, growth, hysteresis)) = p.loss_scale {
        optimizer.push((
            "grad_scaler".to_string(),
            PyValue::dict([
                ("scale", scalar_f32(scale)),
                ("growth_tracker", PyValue::Int(growth as i64)),
                ("hysteresis_tracker", PyValue::Int(hysteresis as i64)),
            ]),
        ));
    }
    PyValue::dict([
        ("checkpoint_version", PyValue::Float(3.0)),
        ("iteration", PyValue::Int(p.iteration as i64)),
        ("optimizer", PyValue::Dict(optimizer)),
        ("opt_param_scheduler", scheduler_state(run, p)),
        (
            "content_metadata",
            PyValue::dict([
                (
                    "distrib_optim_sharding_type",
                    PyValue::str("fully_reshardable"),
                ),
                (
                    "distrib_optim_fully_reshardable_mem_efficient",
                    PyValue::Bool(false),
                ),
                ("singleton_local_shards", PyValue::Bool(false)),
                ("chained_optim_avoid_prefix", PyValue::Bool(true)),
            ]),
        ),
    ])
}

/// `train_state.pt`: `TrainState.state_dict()` as Bridge saves it (the flop count as float32,
/// which Bridge's save writes; bridgeflow does not count flops, so 0).
pub fn train_state(run: &RunSettings, p: &Progress) -> PyValue {
    let i64s = |v: u64| PyValue::Tensor(DType::I64, vec![], (v as i64).to_le_bytes().to_vec());
    let flag = |b: bool| PyValue::Tensor(DType::BOOL, vec![], vec![b as u8]);
    PyValue::dict([
        ("step", i64s(p.iteration)),
        ("consumed_train_samples", i64s(p.consumed_train_samples)),
        (
            "skipped_train_samples",
            i64s(p.consumed_train_samples - p.scheduled_samples),
        ),
        ("consumed_valid_samples", i64s(p.consumed_valid_samples)),
        ("floating_point_operations_so_far", scalar_f32(0.0)),
        ("do_train", flag(true)),
        ("do_valid", flag(run.validates)),
        ("do_test", flag(false)),
    ])
}

/// Where a saved checkpoint says training stands, read back from its common state (`common`,
/// in the archive `common_file`) and its `train_state.pt`, whoever wrote them (Bridge or
/// bridgeflow), with Adam's step. The scheduler's settings must be this run's: a resume across
/// a changed learning-rate schedule is refused, as megatron-core's scheduler refuses it.
pub fn restore(
    common: &Value,
    common_file: &TorchSave,
    train_state: &TorchSave,
    run: &RunSettings,
) -> Result<(Progress, u64)> {
    let bad = |file: &TorchSave, m: String| PluginError::format(format!("{}: {m}", file.what()));
    let counter = |k: &str| -> Result<u64> {
        let v = train_state
            .root
            .get(k)
            .ok_or_else(|| bad(train_state, format!("no '{k}'")))?;
        let x = train_state.scalar(&v)?;
        match x >= 0.0 && x.fract() == 0.0 {
            true => Ok(x as u64),
            false => Err(bad(train_state, format!("'{k}' is {x}, not a count"))),
        }
    };
    let scheduler = common
        .get("opt_param_scheduler")
        .ok_or_else(|| bad(common_file, "no opt_param_scheduler".into()))?;
    check_schedule(&scheduler, run)
        .map_err(|m| PluginError::mismatch(format!("{}: {m}", common_file.what())))?;
    let scheduled = scheduler
        .get("num_steps")
        .and_then(|v| v.as_int())
        .filter(|&n| n >= 0)
        .ok_or_else(|| bad(common_file, "opt_param_scheduler has no num_steps".into()))?;
    let optimizer = common
        .get("optimizer")
        .ok_or_else(|| bad(common_file, "no optimizer state (saved without it?)".into()))?;
    let adam_step = adam_step(&optimizer).map_err(|m| bad(common_file, m))?;
    let loss_scale = match optimizer.get("grad_scaler") {
        None | Some(Value::None) => None,
        Some(g) => {
            let int = |k: &str| g.get(k).and_then(|v| v.as_int()).filter(|&n| n >= 0);
            let scale = match g.get("scale") {
                Some(v @ Value::Object(_)) => common_file.scalar(&v)?,
                Some(v) => v.as_f64().unwrap_or(f64::NAN),
                None => f64::NAN,
            };
            match (
                scale.is_finite() && scale > 0.0,
                int("growth_tracker"),
                int("hysteresis_tracker"),
            ) {
                (true, Some(growth), Some(hysteresis)) => {
                    Some((scale, growth as u64, hysteresis as u64))
                }
                _ => {
                    return Err(bad(
                        common_file,
                        "a grad_scaler without a positive scale and its trackers".into(),
                    ))
                }
            }
        }
    };
    let progress = Progress {
        iteration: counter("step")?,
        consumed_train_samples: counter("consumed_train_samples")?,
        scheduled_samples: scheduled as u64,
        consumed_valid_samples: counter("consumed_valid_samples")?,
        loss_scale,
    };
    Ok((progress, adam_step))
}

/// Adam's step, which every saved parameter group carries (megatron-core saves torch's
/// per-parameter step once per group); the groups must agree.
fn adam_step(optimizer: &Value) -> std::result::Result<u64, String> {
    let bad = |m: &str| m.to_string();
    let groups = optimizer
        .get("optimizer")
        .and_then(|o| o.get("param_groups"))
        .and_then(|g| g.items())
        .ok_or_else(|| bad("no optimizer.optimizer.param_groups"))?;
    let steps: Vec<f64> = groups
        .iter()
        .map(|g| g.get("step").and_then(|s| s.as_f64()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a parameter group without Adam's step"))?;
    match steps.split_first() {
        Some((&first, rest))
            if first >= 0.0 && first.fract() == 0.0 && rest.iter().all(|&s| s == first) =>
        {
            Ok(first as u64)
        }
        Some(_) => Err(bad(&format!(
            "the parameter groups' Adam steps {steps:?} are not one count"
        ))),
        None => Err(bad("no parameter groups")),
    }
}

/// The saved scheduler's settings against this run's: each must be equal.
fn check_schedule(saved: &Value, run: &RunSettings) -> std::result::Result<(), String> {
    let s = &run.schedule;
    // Not `wd_incr_steps` (train_iters × batch): weight decay is constant here, and a longer
    // run from a checkpoint must not be refused for it.
    let ours: [(&str, Value); 7] = [
        ("max_lr", Value::Float(s.max_lr)),
        ("min_lr", Value::Float(s.min_lr)),
        ("lr_warmup_steps", Value::Int(s.warmup_steps as i64)),
        ("lr_decay_steps", Value::Int(s.decay_steps as i64)),
        ("lr_decay_style", Value::Str(run.lr_decay_style.clone())),
        ("start_wd", Value::Float(run.weight_decay)),
        ("end_wd", Value::Float(run.weight_decay)),
    ];
    for (name, want) in ours {
        let got = saved.get(name);
        let same = match (&got, &want) {
            (Some(Value::Str(a)), Value::Str(b)) => a == b,
            (Some(g), w) => g.as_f64().is_some() && g.as_f64() == w.as_f64(),
            (None, _) => false,
        };
        if !same {
            let shown = |v: &Option<Value>| match v {
                Some(Value::Str(s)) => s.clone(),
                Some(v) => v.as_f64().map_or("?".into(), |x| x.to_string()),
                None => "nothing".into(),
            };
            return Err(format!(
                "the checkpoint's scheduler has {name} {}, this run's is {} (steps in samples): a resume must keep the schedule",
                shown(&got),
                shown(&Some(want))
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Decay;

    fn run() -> RunSettings {
        RunSettings {
            schedule: Schedule {
                max_lr: 3e-4,
                min_lr: 3e-5,
                init_lr: 0.0,
                warmup_steps: 4,
                decay_steps: 20,
                decay: Decay::Cosine,
            },
            lr_decay_style: "cosine".into(),
            weight_decay: 0.033,
            betas: (0.9, 0.95),
            eps: 1e-8,
            global_batch_size: 2,
            train_iters: 10,
            validates: false,
        }
    }

    fn progress() -> Progress {
        Progress {
            iteration: 2,
            consumed_train_samples: 4,
            scheduled_samples: 4,
            consumed_valid_samples: 0,
            loss_scale: None,
        }
    }

    fn get<'a>(v: &'a PyValue, key: &str) -> &'a PyValue {
        match v {
            PyValue::Dict(items) => &items.iter().find(|(k, _)| k == key).expect(key).1,
            _ => panic!("not a dict"),
        }
    }

    /// The values Bridge 0.6.2 saved after 2 iterations of the same run
    /// (scripts/bridge_optim_spike.py on the tiny Llama).
    #[test]
    fn common_state_holds_what_bridge_saves() {
        let c = common_state(
            &[
                Group::of("output_layer.weight", true),
                Group::of("decoder.final_layernorm.weight", false),
                Group::of("embedding.word_embeddings.weight", true),
            ],
            &run(),
            &progress(),
            2,
        );
        let opt = get(&c, "optimizer");
        assert_eq!(
            get(opt, "param_state_sharding_type"),
            &PyValue::str("fully_reshardable")
        );
        let PyValue::List(groups) = get(get(opt, "optimizer"), "param_groups") else {
            panic!()
        };
        assert_eq!(groups.len(), 2);
        let keys: Vec<&str> = match &groups[0] {
            PyValue::Dict(items) => items.iter().map(|(k, _)| k.as_str()).collect(),
            _ => panic!(),
        };
        assert_eq!(keys.join(","), "is_expert_parallel,default_config,wd_mult,lr_mult,is_decoupled_lr,max_lr,min_lr,lr,betas,eps,weight_decay,amsgrad,maximize,foreach,capturable,differentiable,fused,decoupled_weight_decay,step");
        assert_eq!(get(&groups[0], "wd_mult"), &PyValue::Float(1.0));
        assert_eq!(get(&groups[0], "weight_decay"), &PyValue::Float(0.033));
        assert_eq!(get(&groups[1], "weight_decay"), &PyValue::Float(0.0));
        // After 4 samples of a 4-sample warmup: the peak.
        assert_eq!(get(&groups[0], "lr"), &PyValue::Float(3e-4));
        assert_eq!(get(&groups[1], "step"), &PyValue::Float(2.0));
        let s = get(&c, "opt_param_scheduler");
        assert_eq!(get(s, "num_steps"), &PyValue::Int(4));
        assert_eq!(get(s, "lr_warmup_steps"), &PyValue::Int(4));
        assert_eq!(get(s, "lr_decay_steps"), &PyValue::Int(20));
        assert_eq!(get(s, "wd_incr_steps"), &PyValue::Int(20));
        assert_eq!(
            get(get(&c, "content_metadata"), "distrib_optim_sharding_type"),
            &PyValue::str("fully_reshardable")
        );
    }

    #[test]
    fn experts_get_their_own_groups_and_fp16_its_scaler() {
        let mut p = progress();
        p.loss_scale = Some((65536.0, 3, 2));
        let c = common_state(
            &[
                Group::of(
                    "decoder.layers.0.mlp.experts.experts.linear_fc1.weight",
                    true,
                ),
                Group::of("decoder.layers.0.mlp.router.weight", true),
            ],
            &run(),
            &p,
            2,
        );
        let opt = get(&c, "optimizer");
        let PyValue::List(groups) = get(get(opt, "optimizer"), "param_groups") else {
            panic!()
        };
        assert_eq!(get(&groups[0], "is_expert_parallel"), &PyValue::Bool(false));
        assert_eq!(get(&groups[1], "is_expert_parallel"), &PyValue::Bool(true));
        assert_eq!(
            get(get(opt, "grad_scaler"), "growth_tracker"),
            &PyValue::Int(3)
        );
    }

    #[test]
    fn train_state_counts_skipped_samples() {
        let mut p = progress();
        p.consumed_train_samples = 6;
        let t = train_state(&run(), &p);
        let bytes = |k: &str| match get(&t, k) {
            PyValue::Tensor(DType::I64, s, b) if s.is_empty() => {
                i64::from_le_bytes(b[..].try_into().unwrap())
            }
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(bytes("step"), 2);
        assert_eq!(bytes("skipped_train_samples"), 2);
    }

    fn saved(v: &PyValue, name: &str) -> TorchSave {
        TorchSave::parse(bridgeflow_megatron::emit::torch_save(name, v, name), name).unwrap()
    }

    /// What is saved reads back as it was: the position, Adam's step, fp16's scaler.
    #[test]
    fn saved_state_restores_where_training_stood() {
        let mut p = progress();
        p.consumed_train_samples = 6;
        p.consumed_valid_samples = 8;
        p.loss_scale = Some((32768.0, 5, 1));
        let groups = [
            Group::of("output_layer.weight", true),
            Group::of("x.bias", false),
        ];
        let common = saved(&common_state(&groups, &run(), &p, 7), "common");
        let train = saved(&train_state(&run(), &p), "train_state");
        let (got, step) = restore(&common.root, &common, &train, &run()).unwrap();
        assert_eq!((got, step), (p, 7));
    }

    /// Bridge's own checkpoint of the run `run()` describes (its common state is the byte
    /// object megatron-core 0.19 writes, `[state]`), after 2 iterations of 2 samples.
    #[test]
    fn bridges_saved_state_restores() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/train/bridge_checkpoint");
        let common = TorchSave::read(&dir.join("common_state.pt")).unwrap();
        let state = common.root.items().unwrap()[0].clone();
        let train = TorchSave::read(&dir.join("train_state.pt")).unwrap();
        let (got, step) = restore(&state, &common, &train, &run()).unwrap();
        assert_eq!((got, step), (progress(), 2));
    }

    /// A resume whose learning-rate schedule differs from the saved one is refused by name.
    #[test]
    fn a_changed_schedule_is_refused() {
        let p = progress();
        let common = saved(
            &common_state(&[Group::of("w", true)], &run(), &p, 2),
            "common",
        );
        let train = saved(&train_state(&run(), &p), "train_state");
        let mut other = run();
        other.schedule.decay_steps = 40;
        let e = restore(&common.root, &common, &train, &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lr_decay_steps 20") && e.contains("40"), "{e}");
        other = run();
        other.lr_decay_style = "linear".into();
        let e = restore(&common.root, &common, &train, &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lr_decay_style cosine"), "{e}");
    }
}
