//! The `trainer` stage: initial weights on input 0 (Megatron names, from the models mapper or a
//! torch_dist reader), samples on input 1 (records), held-out samples on input 2 and a
//! distillation teacher's weights on input 3 (both optional); trained weights out on `weights`
//! (same names, shapes and dtypes, the input plan's attributes passed on so the writers and the
//! mapper see the same model), one row per iteration on `metrics`, LoRA adapters on `adapters`.
//!
//! Training starts as soon as every weight (the teacher's too) has arrived; samples that come
//! earlier wait. Each
//! full global batch is one iteration, until `train_iters`.

use crate::assemble::Assembler;
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::{samples, Packing, Sample};
use crate::model::GptConfig;
use crate::params::Params;
use crate::trainer::{Step, Trainer};
use bridgeflow_sdk::arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use bridgeflow_sdk::{
    attrs, Emitter, Item, PluginError, Port, PortType, Result, StreamPlan, TensorInfo, Transform,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

pub struct TrainStage {
    cfg: TrainConfig,
    model: Option<GptConfig>,
    weights: Option<Assembler>,
    trainer: Option<Trainer>,
    queue: VecDeque<Sample>,
    rows_seen: u64,
    history: Vec<Step>,
    started: Option<Instant>,
    out_plan: StreamPlan,
    /// Samples still to drop after a resume (those the checkpoint consumed).
    skip: u64,
    saved_at: u64,
    tensorboard: Option<crate::tensorboard::EventWriter>,
    /// Held-out samples not yet evaluated on, and rows of them seen.
    valid_queue: VecDeque<Sample>,
    valid_rows: u64,
    /// An evaluation is due before the next iteration.
    eval_due: bool,
    /// (iteration, validation loss) of each evaluation.
    validation: Vec<(u64, f64)>,
    /// Held-out samples evaluated on, before a resume too (Bridge's `consumed_valid_samples`).
    valid_consumed: u64,
    /// What a checkpoint repeats of the run (set when training starts, with `save`).
    run_info: Option<checkpoint::RunInfo>,
    /// The checkpoint being written in the background (`async_save`).
    saving: Option<std::thread::JoinHandle<Result<std::path::PathBuf>>>,
    /// Distillation: the teacher's config and its weights as they arrive (input 3).
    teacher_model: Option<GptConfig>,
    teacher_weights: Option<Assembler>,
}

impl Transform for TrainStage {
    type Config = TrainConfig;
    const DESCRIPTION: &'static str =
        "Trains a Llama-family model on Megatron-layout weights as megatron-core's loop does (AdamW, warmup + cosine in samples, global-norm clip, micro-batches)";
    /// Weights, training samples, and (optional) held-out samples for `eval_interval` and the
    /// teacher's weights for `distill` (Megatron names, like the student's).
    const INPUTS: &'static [PortType] = &[
        PortType::Tensors,
        PortType::Records,
        PortType::Records,
        PortType::Tensors,
    ];
    const OPTIONAL_INPUTS: usize = 2;
    /// The trained weights (merged under LoRA), one row per iteration, and the LoRA adapters
    /// (Megatron-Bridge's names; none without LoRA).
    const OUTPUTS: &'static [Port] = &[
        Port::tensors("weights"),
        Port::records("metrics"),
        Port::tensors("adapters"),
    ];
    const RETAINS_INPUTS: bool = true;

    fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        Ok(TrainStage {
            cfg,
            model: None,
            weights: None,
            trainer: None,
            queue: VecDeque::new(),
            rows_seen: 0,
            history: Vec::new(),
            started: None,
            out_plan: StreamPlan::default(),
            skip: 0,
            saved_at: 0,
            tensorboard: None,
            valid_queue: VecDeque::new(),
            valid_rows: 0,
            eval_due: false,
            validation: Vec::new(),
            valid_consumed: 0,
            run_info: None,
            saving: None,
            teacher_model: None,
            teacher_weights: None,
        })
    }

    fn plan_outputs(&mut self, inputs: &[StreamPlan]) -> Result<Vec<StreamPlan>> {
        if self.cfg.eval_interval > 0 && inputs.len() < 3 {
            return Err(PluginError::config(
                "eval_interval needs held-out samples: wire a third input (inputs = [weights, train data, valid data])",
            ));
        }
        let plan = &inputs[0];
        let megatron = plan.try_get(attrs::MEGATRON_MODEL)?.ok_or_else(|| {
            PluginError::config(
                "the weights carry no model config (megatron_model): feed the trainer from the models mapper or a torch_dist reader",
            )
        })?;
        let mut model = GptConfig::from_megatron(&megatron)?;
        crate::moe::override_aux_loss_coeff(&mut model, self.cfg.moe_aux_loss_coeff)?;
        if let Some(l) = &self.cfg.lora {
            crate::lora::check_moe_targets(l, &model)?;
        }
        check_position_limit(self.cfg.seq_length, &megatron, "the model")?;
        let expected = model.parameters();
        check_names(&plan.whole_tensors(), &expected)?;
        self.plan_teacher(inputs.get(3), &model)?;
        let whole = plan.whole_tensors();
        let mut out = StreamPlan::new(
            expected
                .iter()
                .map(|(n, _)| {
                    whole
                        .iter()
                        .find(|t| t.name() == n)
                        .cloned()
                        .expect("checked")
                })
                .collect(),
        );
        out.attrs = plan.attrs.clone();
        self.weights = Some(Assembler::new(&expected));
        self.model = Some(model);
        self.out_plan = out.clone();
        let mut adapters = StreamPlan::new(
            self.cfg
                .lora
                .as_ref()
                .map(|l| crate::lora::planned(l, self.model.as_ref().expect("set above")))
                .unwrap_or_default()
                .into_iter()
                .map(|(n, shape)| TensorInfo::new(n, bridgeflow_sdk::DType::F32, &shape))
                .collect(),
        );
        adapters.attrs = out.attrs.clone();
        if let Some(l) = &self.cfg.lora {
            adapters.set(crate::lora::LORA, crate::lora::describe(l));
        }
        Ok(vec![out, StreamPlan::default(), adapters])
    }

    fn process(&mut self, port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        match port {
            0 => self.weight(item)?,
            3 => self.teacher_weight(item)?,
            1 => {
                let rows = self.samples_of(item, self.rows_seen)?;
                self.rows_seen += rows.len() as u64;
                self.queue.extend(rows);
            }
            _ => {
                let rows = self.samples_of(item, self.valid_rows)?;
                self.valid_rows += rows.len() as u64;
                self.valid_queue.extend(rows);
            }
        }
        self.train_ready(out)
    }

    fn finish(&mut self, out: &mut Emitter) -> Result<()> {
        let trained = self.finish_training(out);
        // Whatever happened, the checkpoint in flight lands (or its error is the run's).
        self.saved()?;
        trained
    }

    fn summary(&mut self) -> String {
        let (Some(first), Some(last)) = (self.history.first(), self.history.last()) else {
            return String::new();
        };
        let tokens = self.tokens_trained();
        format!(
            "trained {} iterations ({} tokens, {:.0} tokens/s): loss {:.4} -> {:.4}",
            last.iteration,
            tokens,
            self.tokens_per_second(),
            first.loss,
            last.loss
        )
    }

    fn metrics(&mut self) -> bridgeflow_sdk::serde_json::Value {
        let col = |f: fn(&Step) -> f64| self.history.iter().map(f).collect::<Vec<f64>>();
        bridgeflow_sdk::serde_json::json!({
            "iterations": self.history.len(),
            "consumed_samples": self.trainer.as_ref().map_or(0, |t| t.consumed_samples),
            "tokens": self.tokens_trained(),
            "tokens_per_s": self.tokens_per_second(),
            "loss": col(|s| s.loss),
            "lr": col(|s| s.lr),
            "grad_norm": col(|s| s.grad_norm),
            "num_tokens": col(|s| s.num_tokens),
            "validation_loss": self.validation,
            "kd_loss": kd_col(&self.history, |k| k.kd_loss),
            "logits_loss": kd_col(&self.history, |k| k.logits_loss),
            "intermediate_loss": kd_col(&self.history, |k| k.intermediate_loss),
            "load_balancing_loss": self
                .history
                .iter()
                .filter_map(|s| s.load_balancing_loss)
                .collect::<Vec<f64>>(),
        })
    }
}

/// A distillation column of the history (empty without a teacher).
fn kd_col(history: &[Step], f: fn(&crate::trainer::KdValues) -> f64) -> Vec<f64> {
    history
        .iter()
        .filter_map(|s| s.kd.as_ref().map(f))
        .collect()
}

/// Samples no longer than the model's positions (`seq_length` in Megatron's config: the HF
/// `max_position_embeddings` Megatron-Bridge maps to it).
fn check_position_limit(
    seq_length: usize,
    megatron: &bridgeflow_sdk::serde_json::Map<String, bridgeflow_sdk::serde_json::Value>,
    who: &str,
) -> Result<()> {
    match megatron.get("seq_length").and_then(|v| v.as_u64()) {
        Some(limit) if seq_length as u64 > limit => Err(PluginError::config(format!(
            "seq_length {seq_length} is longer than {who}'s position limit {limit} (max_position_embeddings)"
        ))),
        _ => Ok(()),
    }
}

/// Exactly the model's parameters: none missing, none extra.
fn check_names(got: &[TensorInfo], expected: &[(String, Vec<usize>)]) -> Result<()> {
    let missing: Vec<&str> = expected
        .iter()
        .filter(|(n, _)| !got.iter().any(|t| t.name() == n))
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(PluginError::shape(format!(
            "the weights lack {} the model config needs: {}",
            missing.len(),
            missing.join(", ")
        )));
    }
    let extra: Vec<&str> = got
        .iter()
        .filter(|t| !expected.iter().any(|(n, _)| n == t.name()))
        .map(|t| t.name())
        .collect();
    if !extra.is_empty() {
        return Err(PluginError::shape(format!(
            "the weights hold tensors this trainer's model does not use: {}",
            extra.join(", ")
        )));
    }
    Ok(())
}

impl TrainStage {
    fn weight(&mut self, item: Item) -> Result<()> {
        let t = item.into_tensor()?;
        let w = self
            .weights
            .as_mut()
            .ok_or_else(|| PluginError::internal("weights before the plan"))?;
        w.add(&t)?;
        self.start_when_ready()
    }

    /// Distillation's teacher: from input 3's plan, which `distill` needs and nothing else
    /// takes.
    fn plan_teacher(&mut self, plan: Option<&StreamPlan>, student: &GptConfig) -> Result<()> {
        let Some(plan) = plan else {
            return match self.cfg.distill {
                Some(_) => Err(PluginError::config(
                    "distill needs the teacher's weights: wire a fourth input (inputs = [weights, train data, valid data, teacher])",
                )),
                None => Ok(()),
            };
        };
        let Some(distill) = &self.cfg.distill else {
            return Err(PluginError::config(
                "a teacher is wired (input 4) but the trainer has no distill settings",
            ));
        };
        let megatron = plan.try_get(attrs::MEGATRON_MODEL)?.ok_or_else(|| {
            PluginError::config(
                "the teacher's weights carry no model config (megatron_model): feed them from the models mapper or a torch_dist reader",
            )
        })?;
        let teacher = GptConfig::from_megatron(&megatron)?;
        check_position_limit(self.cfg.seq_length, &megatron, "the teacher")?;
        let expected = teacher.parameters();
        check_names(&plan.whole_tensors(), &expected)
            .map_err(|e| PluginError::shape(format!("teacher: {e}")))?;
        distill.check_models(student, &teacher)?;
        self.teacher_weights = Some(Assembler::new(&expected));
        self.teacher_model = Some(teacher);
        Ok(())
    }

    fn teacher_weight(&mut self, item: Item) -> Result<()> {
        let t = item.into_tensor()?;
        self.teacher_weights
            .as_mut()
            .ok_or_else(|| PluginError::internal("teacher weights before the plan"))?
            .add(&t)?;
        self.start_when_ready()
    }

    /// Training starts once the student's weights (and the teacher's) are all in.
    fn start_when_ready(&mut self) -> Result<()> {
        let complete = |w: &Option<Assembler>| w.as_ref().is_none_or(Assembler::is_complete);
        if self.trainer.is_none()
            && self.weights.is_some()
            && complete(&self.weights)
            && complete(&self.teacher_weights)
        {
            self.start()?;
        }
        Ok(())
    }

    /// The teacher's parameters, frozen (no gradient, no optimizer state), in the student's
    /// compute dtype.
    fn build_teacher(
        &mut self,
        dev: &candle_core::Device,
        compute: Option<candle_core::DType>,
    ) -> Result<Option<crate::distill::Teacher>> {
        let (Some(w), Some(cfg)) = (self.teacher_weights.take(), self.teacher_model.clone()) else {
            return Ok(None);
        };
        let mut params = Params {
            compute,
            ..Params::default()
        };
        for (name, p) in w.pending {
            params.insert(&name, p.shape, p.dtype, p.values, dev)?;
            params.by_name.get_mut(&name).expect("inserted").trainable = false;
        }
        let positions = crate::model::Positions::new(&cfg, self.cfg.seq_length, dev)?;
        tracing::info!(
            layers = cfg.num_layers,
            hidden = cfg.hidden_size,
            "distillation: the teacher is loaded, frozen"
        );
        Ok(Some(crate::distill::Teacher {
            cfg,
            params,
            positions,
        }))
    }

    fn start(&mut self) -> Result<()> {
        let dev = self.cfg.device()?;
        let w = self.weights.take().expect("complete");
        let mut params = Params {
            compute: match (self.cfg.bf16, self.cfg.fp16) {
                (true, _) => Some(candle_core::DType::BF16),
                (_, true) => Some(candle_core::DType::F16),
                _ => None,
            },
            ..Params::default()
        };
        for (name, p) in w.pending {
            params.insert(&name, p.shape, p.dtype, p.values, &dev)?;
        }
        let model = self.model.clone().expect("planned");
        if let Some(lora) = &self.cfg.lora {
            let n = crate::lora::attach(lora, &model, &mut params, &dev)?;
            tracing::info!(
                adapters = n,
                dim = lora.dim,
                alpha = lora.alpha,
                "LoRA: the model frozen"
            );
        }
        let teacher = self.build_teacher(&dev, params.compute)?;
        if let (Some(d), Some(t)) = (&self.cfg.distill, &teacher) {
            if d.projects(&model, &t.cfg) {
                d.attach_projection(&model, &t.cfg, &mut params, &dev)?;
                tracing::info!(
                    from = model.hidden_size,
                    to = t.cfg.hidden_size,
                    "distillation: hidden states projected to the teacher's size (trained)"
                );
            }
        }
        let num_layers = model.num_layers as u64;
        let mut trainer = Trainer::new(self.cfg.clone(), model, params, dev)?;
        let settings = crate::bridge_state::RunSettings::of(&self.cfg, &trainer.schedule);
        // What the checkpoints repeat of the run, when there are to be any.
        if self.cfg.save.is_some() {
            self.run_info = Some(checkpoint::RunInfo {
                settings: settings.clone(),
                num_layers,
                run_config: bridgeflow_megatron::run_config::of_plan(&self.out_plan)?,
            });
        }
        trainer.teacher = teacher;
        if let Some(root) = &self.cfg.load {
            if let Some(iteration) = checkpoint::latest(root)? {
                let pos = checkpoint::load(
                    root,
                    iteration,
                    &mut trainer.params,
                    &mut trainer.adam,
                    (&settings, num_layers),
                )?;
                trainer.iteration = pos.iteration;
                trainer.consumed_samples = pos.consumed_train_samples;
                trainer.scheduled_samples = pos.scheduled_samples;
                if let (Some(s), Some((scale, growth, hysteresis))) =
                    (trainer.scaler.as_mut(), pos.loss_scale)
                {
                    (s.scale, s.growth_tracker, s.hysteresis_tracker) = (scale, growth, hysteresis);
                }
                self.skip = pos.consumed_train_samples;
                self.valid_consumed = pos.consumed_valid_samples;
                self.saved_at = pos.iteration;
                eprintln!(
                    "resuming from {} at iteration {} ({} samples consumed)",
                    root.display(),
                    pos.iteration,
                    pos.consumed_train_samples
                );
            }
        }
        self.trainer = Some(trainer);
        self.weights = Some(Assembler::default());
        self.started = Some(Instant::now());
        if let Some(path) = &self.cfg.metrics_file {
            std::fs::File::create(path).map_err(|e| PluginError::io(path, "cannot create", e))?;
        }
        if let Some(dir) = &self.cfg.tensorboard_dir {
            self.tensorboard = Some(crate::tensorboard::EventWriter::create(dir)?);
        }
        Ok(())
    }

    /// The end of the input: the weights complete, the last iterations and the due
    /// evaluation run, the trained weights out.
    fn finish_training(&mut self, out: &mut Emitter) -> Result<()> {
        if let Some(w) = &self.weights {
            if !w.is_complete() {
                return Err(PluginError::shape(format!(
                    "the weights stream ended without {}",
                    w.missing().join(", ")
                )));
            }
        }
        if let Some(w) = &self.teacher_weights {
            if !w.is_complete() {
                return Err(PluginError::shape(format!(
                    "the teacher's weights stream ended without {}",
                    w.missing().join(", ")
                )));
            }
        }
        self.train_ready(out)?;
        if self.eval_due {
            return Err(PluginError::shape(format!(
                "the held-out data ran out: evaluation {} needs {} samples, {} were left",
                self.validation.len() + 1,
                self.eval_samples(),
                self.valid_queue.len()
            )));
        }
        let done = self.trainer.as_ref().map_or(0, |t| t.iteration);
        if done < self.cfg.train_iters {
            return Err(PluginError::shape(format!(
                "the data ran out after {done} of {} iterations ({} samples for {} per iteration)",
                self.cfg.train_iters, self.rows_seen, self.cfg.global_batch_size
            )));
        }
        let trainer = self.trainer.as_ref().expect("trained");
        for t in self.out_plan.tensors.iter() {
            out.tensor_to(0, trainer.params.export(t.name())?)?;
        }
        if let Some(l) = &self.cfg.lora {
            let model = self.model.as_ref().expect("planned");
            for (name, _) in crate::lora::planned(l, model) {
                let p = &trainer.params.by_name[&name];
                let bytes: Vec<u8> = p.master.iter().flat_map(|x| x.to_le_bytes()).collect();
                let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
                let info = TensorInfo::new(name, bridgeflow_sdk::DType::F32, &shape);
                out.tensor_to(
                    2,
                    bridgeflow_sdk::Tensor::new(info, bridgeflow_sdk::Buffer::from_vec(bytes))?,
                )?;
            }
        }
        Ok(())
    }

    /// Records as samples (`first`: the number of rows of that stream seen before).
    fn samples_of(&self, item: Item, first: u64) -> Result<Vec<Sample>> {
        let batch = item.into_records()?;
        let vocab = self.model.as_ref().map_or(0, |m| m.vocab_size);
        let packing = Packing {
            eos: self.cfg.eos_id,
            answer_only_loss: self.cfg.answer_only_loss,
        };
        samples(&batch, self.cfg.seq_length, vocab, first, packing)
    }

    fn eval_samples(&self) -> usize {
        self.cfg.eval_iters as usize * self.cfg.global_batch_size
    }

    /// The due evaluation, once its held-out samples are in (false: still waiting).
    fn evaluate_if_ready(&mut self) -> Result<bool> {
        let need = self.eval_samples();
        if self.valid_queue.len() < need {
            return Ok(false);
        }
        let trainer = self.trainer.as_ref().expect("training");
        let batch: Vec<Sample> = self.valid_queue.drain(..need).collect();
        self.valid_consumed += need as u64;
        let (loss, _) = trainer.evaluate(&batch)?;
        let iteration = trainer.iteration;
        self.eval_due = false;
        self.validation.push((iteration, loss));
        eprintln!(
            "validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {:.6E}",
            loss.exp()
        );
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(
                iteration,
                &[
                    ("lm loss validation", loss),
                    ("lm loss validation ppl", loss.exp()),
                ],
            )?;
        }
        if let Some(path) = &self.cfg.metrics_file {
            let line = bridgeflow_sdk::serde_json::json!({
                "step": iteration, "validation_loss": loss, "validation_ppl": loss.exp(),
            });
            let io = |e| PluginError::io(path, "cannot write metrics to", e);
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(io)?;
            use std::io::Write;
            writeln!(f, "{line}").map_err(io)?;
        }
        Ok(true)
    }

    /// Runs every iteration the queued samples allow.
    fn train_ready(&mut self, out: &mut Emitter) -> Result<()> {
        let gbs = self.cfg.global_batch_size;
        while self.trainer.is_some() {
            if self.eval_due && !self.evaluate_if_ready()? {
                return Ok(());
            }
            let dropped = (self.skip as usize).min(self.queue.len());
            self.queue.drain(..dropped);
            self.skip -= dropped as u64;
            let trainer = self.trainer.as_mut().expect("checked");
            if trainer.iteration >= self.cfg.train_iters || self.queue.len() < gbs {
                return Ok(());
            }
            if out.is_cancelled() {
                // Preemption: keep what was trained before stopping, on disk before exiting.
                self.save()?;
                self.saved()?;
                return Err(PluginError::cancelled());
            }
            let batch: Vec<Sample> = self.queue.drain(..gbs).collect();
            let step = trainer.step(&batch)?;
            self.history.push(step.clone());
            self.log(&step)?;
            out.records_to(1, &metrics_row(&step)?)?;
            let interval = self.cfg.save_interval;
            if (interval > 0 && step.iteration % interval == 0)
                || step.iteration == self.cfg.train_iters
            {
                self.save()?;
            }
            let every = self.cfg.eval_interval;
            self.eval_due = every > 0 && step.iteration.is_multiple_of(every);
        }
        Ok(())
    }

    /// A resume checkpoint of the current state, when `save` is set and it is new.
    fn save(&mut self) -> Result<()> {
        let (Some(root), Some(t)) = (&self.cfg.save, &self.trainer) else {
            return Ok(());
        };
        if t.iteration == self.saved_at {
            return Ok(());
        }
        let pos = crate::bridge_state::Progress {
            iteration: t.iteration,
            consumed_train_samples: t.consumed_samples,
            scheduled_samples: t.scheduled_samples,
            consumed_valid_samples: self.valid_consumed,
            loss_scale: t
                .scaler
                .as_ref()
                .map(|s| (s.scale, s.growth_tracker, s.hysteresis_tracker)),
        };
        let info = self.run_info.as_ref().expect("set when training started");
        let snapshot = checkpoint::Snapshot::take(&t.params, &t.adam, &pos, info)?;
        let (root, iteration) = (root.clone(), t.iteration);
        self.saved_at = iteration;
        // One checkpoint in flight at a time: the previous one is on disk before this starts.
        self.saved()?;
        if self.cfg.async_save {
            self.saving = Some(std::thread::spawn(move || snapshot.write(&root)));
            return Ok(());
        }
        let dir = snapshot.write(&root)?;
        tracing::info!(iteration, path = %dir.display(), "checkpoint saved");
        Ok(())
    }

    /// Waits for the checkpoint written in the background, if any.
    fn saved(&mut self) -> Result<()> {
        let Some(h) = self.saving.take() else {
            return Ok(());
        };
        let dir = h
            .join()
            .map_err(|_| PluginError::internal("the checkpoint writer panicked"))??;
        tracing::info!(path = %dir.display(), "checkpoint saved");
        Ok(())
    }

    /// One line per `log_interval` iterations on stderr (iteration, loss, lr, grad norm,
    /// tokens/s, ETA) and in the tracing log, and one JSON line per iteration in
    /// `metrics_file` when set.
    fn log(&mut self, step: &Step) -> Result<()> {
        let tps = self.tokens_per_second();
        let left = self.cfg.train_iters.saturating_sub(step.iteration);
        let per_iter = (self.cfg.global_batch_size * self.cfg.seq_length) as f64;
        let eta = if tps > 0.0 {
            left as f64 * per_iter / tps
        } else {
            0.0
        };
        if step.iteration.is_multiple_of(self.cfg.log_interval.max(1)) || left == 0 {
            tracing::info!(
                iteration = step.iteration,
                loss = step.loss,
                lr = step.lr,
                grad_norm = step.grad_norm,
                tokens_per_s = tps,
                "step"
            );
            // Distillation's and MoE's losses, when the run has them.
            let mut extra = step.kd.map_or(String::new(), |k| {
                format!(" | kd loss {:.6} (logits {:.6})", k.kd_loss, k.logits_loss)
            });
            if let Some(b) = step.load_balancing_loss {
                extra += &format!(" | load balancing loss {b:.6}");
            }
            let norm = match (step.skipped, step.loss_scale) {
                (true, Some(s)) => format!("skipped: gradients overflowed at loss scale {s}"),
                _ => format!("grad norm {:.4}", step.grad_norm),
            };
            eprintln!(
                "iteration {:>6}/{} | loss {:.6}{extra} | lr {:.3e} | {norm} | {:.0} tokens/s | ETA {}",
                step.iteration,
                self.cfg.train_iters,
                step.loss,
                step.lr,
                tps,
                eta_text(eta)
            );
        }
        if let (Some(tb), Some(k)) = (self.tensorboard.as_mut(), step.kd) {
            tb.scalars(
                step.iteration,
                &[
                    ("total loss", k.kd_loss),
                    ("logits distillation loss", k.logits_loss),
                    ("intermediate distillation loss", k.intermediate_loss),
                ],
            )?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(
                step.iteration,
                &[
                    ("lm loss", step.loss),
                    ("learning-rate", step.lr),
                    ("grad-norm", step.grad_norm),
                    ("batch-size", self.cfg.global_batch_size as f64),
                    ("tokens-per-second", tps),
                ],
            )?;
            if let Some(b) = step.load_balancing_loss {
                tb.scalars(step.iteration, &[("load_balancing_loss", b)])?;
            }
        }
        if let Some(path) = &self.cfg.metrics_file {
            let line = bridgeflow_sdk::serde_json::json!({
                "step": step.iteration,
                "loss": step.loss,
                "lr": step.lr,
                "grad_norm": step.grad_norm,
                "num_tokens": step.num_tokens,
                "tokens": self.tokens_trained(),
                "tokens_per_s": tps,
                "elapsed_s": self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
                "skipped": step.skipped,
                "loss_scale": step.loss_scale,
                "kd_loss": step.kd.map(|k| k.kd_loss),
                "logits_loss": step.kd.map(|k| k.logits_loss),
                "intermediate_loss": step.kd.map(|k| k.intermediate_loss),
                "load_balancing_loss": step.load_balancing_loss,
            });
            let io = |e| PluginError::io(path, "cannot write metrics to", e);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            use std::io::Write;
            writeln!(f, "{line}").map_err(io)?;
        }
        Ok(())
    }

    fn tokens_trained(&self) -> u64 {
        self.history.len() as u64 * (self.cfg.global_batch_size * self.cfg.seq_length) as u64
    }

    fn tokens_per_second(&self) -> f64 {
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if secs > 0.0 {
            self.tokens_trained() as f64 / secs
        } else {
            0.0
        }
    }
}

fn eta_text(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn metrics_row(s: &Step) -> Result<RecordBatch> {
    let f64s = |v: f64| Arc::new(Float64Array::from(vec![v])) as ArrayRef;
    let kd = s.kd.map_or(vec![], |k| {
        vec![
            ("kd_loss", f64s(k.kd_loss)),
            ("logits_loss", f64s(k.logits_loss)),
            ("intermediate_loss", f64s(k.intermediate_loss)),
        ]
    });
    let balance = s
        .load_balancing_loss
        .map(|b| ("load_balancing_loss", f64s(b)));
    RecordBatch::try_from_iter(
        vec![
            (
                "iteration",
                Arc::new(Int64Array::from(vec![s.iteration as i64])) as ArrayRef,
            ),
            (
                "loss",
                Arc::new(Float64Array::from(vec![s.loss])) as ArrayRef,
            ),
            ("lr", Arc::new(Float64Array::from(vec![s.lr])) as ArrayRef),
            (
                "grad_norm",
                Arc::new(Float64Array::from(vec![s.grad_norm])) as ArrayRef,
            ),
            (
                "num_tokens",
                Arc::new(Float64Array::from(vec![s.num_tokens])) as ArrayRef,
            ),
        ]
        .into_iter()
        .chain(kd)
        .chain(balance),
    )
    .map_err(|e| PluginError::internal(e.to_string()))
}
