//! bridgeflow plugin `tokenize`: turns text columns (`list<utf8>` per document, as the `jsonl`
//! reader makes them) into token ids with a Hugging Face `tokenizer.json`, exactly as
//! Megatron-LM's `preprocess_data.py` does with `--tokenizer-type HuggingFaceTokenizer`: each
//! sentence encoded with special tokens, empty results dropped, EOD (the tokenizer's eos)
//! appended to the last sentence of a non-empty document when `append_eod` is set. Never touches
//! the network: the tokenizer is a local file.

pub mod fastbpe;
pub mod stage;

bridgeflow_sdk::export_plugins! {
    "tokenize" {
        version: env!("CARGO_PKG_VERSION"),
        description: "HF tokenizer over text columns; EOD as Megatron's preprocess_data.py",
        transform: Transform(stage::Tokenize),
    }
}
