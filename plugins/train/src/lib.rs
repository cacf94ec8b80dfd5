//! # bridgeflow-plugin-train
//!
//! The `trainer` stage: Megatron-Core's training loop on candle (CPU; CUDA behind the `cuda`
//! feature), over Megatron-layout weights. Pieces, in the order a step uses them:
//! [`data`] (samples from records) → [`model`] (the differentiable decoder; [`moe`] its routed
//! experts) → [`trainer`] (micro-batches, loss averaging, clipping) → [`optim`] (AdamW) at the
//! [`schedule`]'s rate;
//! [`assemble`] and [`params`] hold the weights; [`stage`] wires them to the pipeline.
//! [`lora`] (LoRA/DoRA adapters) and [`distill`] (a frozen teacher's KD loss) change what is
//! trained and on what; [`peft`] exports adapters for Hugging Face PEFT.

pub mod assemble;
pub mod bridge_state;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distill;
pub mod init;
pub mod kernels;
pub mod lora;
pub mod merge;
pub mod model;
pub mod moe;
pub mod optim;
pub mod params;
pub mod peft;
pub mod scaler;
pub mod schedule;
pub mod stage;
pub mod tensorboard;
pub mod trainer;
pub mod vexp;

bridgeflow_sdk::export_plugins! {
    "trainer" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Training as megatron-core's loop does it (Llama family, dense or MoE; fp32, bf16, fp16), on candle",
        trainer: Transform(stage::TrainStage),
    }
    "peft-export" {
        version: env!("CARGO_PKG_VERSION"),
        description: "LoRA adapters (Megatron-Bridge names) as a Hugging Face PEFT adapter",
        transform: Transform(peft::PeftExport),
    }
    "lora-merge" {
        version: env!("CARGO_PKG_VERSION"),
        description: "LoRA/DoRA adapters merged into their base weights (PEFT's merge_and_unload)",
        transform: Transform(merge::LoraMerge),
    }
    "init" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Weights for pretraining from scratch, initialized as megatron-core does (normal, scaled normal for output projections)",
        reader: Source(init::InitReader),
    }
}
