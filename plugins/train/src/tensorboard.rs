//! TensorBoard event files (`events.out.tfevents.<time>.<host>.bridgeflow`): one scalar per
//! metric per iteration, as `torch.utils.tensorboard.SummaryWriter.add_scalar` writes them, so
//! `tensorboard --logdir DIR` plots the run beside Megatron's own.
//!
//! Written by hand: the format is TFRecord framing (length, masked CRC-32C of it, the record,
//! masked CRC-32C of it) around three protobuf messages with four fields used; the crates that
//! write it pull in a protobuf code generator and a tokio stack for this.

use bridgeflow_sdk::{PluginError, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct EventWriter {
    path: PathBuf,
    file: File,
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), <what> }`.
fn event(step: i64, what: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend(wall_time().to_le_bytes());
    e.push(0x10);
    varint(&mut e, step as u64);
    what(&mut e);
    e
}

/// `Summary { value = 1: Value { tag = 1, simple_value = 2 (float) } }`, one per scalar.
fn summary(scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut s = Vec::new();
    for (tag, v) in scalars {
        let mut value = Vec::new();
        bytes_field(&mut value, 1, tag.as_bytes());
        value.push(0x15);
        value.extend((*v as f32).to_le_bytes());
        bytes_field(&mut s, 1, &value);
    }
    s
}

fn masked_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(b);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend(len);
    r.extend(masked_crc(&len).to_le_bytes());
    r.extend(data);
    r.extend(masked_crc(data).to_le_bytes());
    r
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(|e| PluginError::io(dir, "cannot create", e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{}.{host}.bridgeflow",
            wall_time() as u64
        );
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| PluginError::io(&path, "cannot create", e))?;
        let mut w = EventWriter { path, file };
        let first = event(0, |e| bytes_field(e, 3, b"brain.Event:2"));
        w.write(&record(&first))?;
        Ok(w)
    }

    /// The scalars of one iteration, flushed (a crash keeps every iteration written so far).
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let e = event(step as i64, |e| bytes_field(e, 5, &summary(scalars)));
        self.write(&record(&e))
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.file
            .write_all(b)
            .and_then(|()| self.file.flush())
            .map_err(|e| PluginError::io(&self.path, "cannot write", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_frame_and_checksum_as_tensorflow() {
        // TensorFlow's masked CRC-32C of the empty string and the known CRC-32C check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let r = record(b"");
        assert_eq!(&r[..8], &[0; 8]);
        assert_eq!(
            u32::from_le_bytes(r[12..16].try_into().unwrap()),
            masked_crc(b"")
        );
        // A scalar event: tag and float where protobuf puts them.
        let s = summary(&[("loss", 2.5)]);
        assert_eq!(
            s,
            [0x0a, 0x0b, 0x0a, 0x04, b'l', b'o', b's', b's', 0x15, 0, 0, 0x20, 0x40]
        );
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
    }
}
