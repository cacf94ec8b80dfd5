//! bridgeflow plugin `jsonl`: reads JSON Lines files (plain, `.gz`, `.zst`; a file, a folder or
//! a glob of many) and emits record batches with one `list<utf8>` column per selected key.
//!
//! It reads exactly the documents Megatron-LM's `preprocess_data.py` reads: lines split as
//! Python's universal newlines split them (`\n`, `\r\n` and a lone `\r`), JSON as Python's
//! `json.loads` accepts it (`NaN`/`Infinity`, duplicate keys with the last one winning), a string
//! value as a one-element list. Where Megatron hangs on a bad line, this reader fails at once
//! with file, line and reason, or skips and counts the line with `skip_bad_lines`.

pub mod lines;
pub mod pyjson;
pub mod reader;

bridgeflow_sdk::export_plugins! {
    "jsonl" {
        version: env!("CARGO_PKG_VERSION"),
        description: "JSON Lines reader (plain/.gz/.zst, globs) with Megatron's semantics, as Arrow batches",
        reader: Source(reader::JsonlReader),
    }
}
