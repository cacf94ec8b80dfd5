//! bridgeflow plugin `sft`: supervised fine-tuning data as Megatron-Bridge prepares it.
//!
//! - transform: chat conversations (`messages` with roles) rendered with the tokenizer's Jinja
//!   `chat_template`, tokenized, and loss-masked so that only assistant tokens count; or
//!   prompt/completion pairs.
//! - writer: offline packing (`first_fit_decreasing` or `first_fit_shuffle`, seeded exactly as
//!   Bridge seeds numpy's legacy generator) into Bridge's packed Parquet
//!   (`input_ids`, `loss_mask`, `seq_start_id`; row groups of 500) and its metadata list.

pub mod chat;
pub mod mt19937;
pub mod pack;
pub mod packing;

bridgeflow_sdk::export_plugins! {
    "sft" {
        version: env!("CARGO_PKG_VERSION"),
        description: "SFT: chat-template tokenization with assistant loss masks; offline packing to Bridge's packed Parquet",
        transform: Transform(chat::SftTokenize),
        writer: Sink(pack::PackWriter),
    }
}
