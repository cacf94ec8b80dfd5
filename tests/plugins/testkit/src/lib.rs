//! Stages for the runtime's own tests: `testkit` reader (generates tensors), transform (fails
//! or panics after N tensors) and writer (slow sink that counts what it gets).

use bridgeflow_sdk::{
    schemars, serde, Buffer, DType, Emitter, Item, PluginError, Result, Sink, Source, StreamPlan,
    Tensor, TensorInfo, Transform,
};

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct GenConfig {
    pub count: usize,
    /// f32 elements per tensor.
    pub elements: usize,
}

pub struct Gen {
    cfg: GenConfig,
}

impl Gen {
    fn info(&self, i: usize) -> TensorInfo {
        TensorInfo::new(format!("t.{i:05}"), DType::F32, &[self.cfg.elements as u64])
    }
}

impl Source for Gen {
    type Config = GenConfig;
    const DESCRIPTION: &'static str = "Generates `count` f32 tensors of `elements` values";
    fn new(cfg: GenConfig) -> Result<Self> {
        Ok(Gen { cfg })
    }
    fn plan(&mut self) -> Result<StreamPlan> {
        Ok(StreamPlan::new(
            (0..self.cfg.count).map(|i| self.info(i)).collect(),
        ))
    }
    fn run(&mut self, out: &mut Emitter) -> Result<()> {
        for i in 0..self.cfg.count {
            let bytes: Vec<u8> = (0..self.cfg.elements)
                .flat_map(|k| ((i * 1000 + k) as f32 * 0.5).to_le_bytes())
                .collect();
            out.tensor(Tensor::new(self.info(i), Buffer::from_vec(bytes))?)?;
        }
        Ok(())
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct FailConfig {
    /// Forward this many tensors, then fail.
    pub after: usize,
    /// Panic instead of returning an error.
    #[serde(default)]
    pub panic: bool,
    /// Sleep this long per tensor first (a run slow enough to be interrupted).
    #[serde(default)]
    pub delay_ms: u64,
}

pub struct Fail {
    cfg: FailConfig,
    seen: usize,
}

impl Transform for Fail {
    type Config = FailConfig;
    const DESCRIPTION: &'static str = "Forwards `after` tensors, then fails (or panics)";
    fn new(cfg: FailConfig) -> Result<Self> {
        Ok(Fail { cfg, seen: 0 })
    }
    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        Ok(inputs[0].clone())
    }
    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        std::thread::sleep(std::time::Duration::from_millis(self.cfg.delay_ms));
        if self.seen == self.cfg.after {
            if self.cfg.panic {
                panic!("testkit panics on tensor '{}'", t.name());
            }
            return Err(PluginError::format(format!(
                "testkit fails on tensor '{}' as configured",
                t.name()
            )));
        }
        self.seen += 1;
        out.tensor(t)
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct SlowConfig {
    /// Sleep this long per tensor.
    pub delay_ms: u64,
}

pub struct Slow {
    cfg: SlowConfig,
    received: usize,
    bytes: u64,
}

impl Sink for Slow {
    type Config = SlowConfig;
    const DESCRIPTION: &'static str = "Consumes tensors slowly and counts them";
    fn new(cfg: SlowConfig) -> Result<Self> {
        Ok(Slow {
            cfg,
            received: 0,
            bytes: 0,
        })
    }
    fn open(&mut self, _inputs: &[StreamPlan]) -> Result<()> {
        Ok(())
    }
    fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(self.cfg.delay_ms));
        self.bytes += item.data_bytes();
        self.received += 1;
        Ok(())
    }
    fn commit(&mut self) -> Result<String> {
        Ok(format!(
            "received {} tensors, {} bytes",
            self.received, self.bytes
        ))
    }
}

/// Record-batch stages, to test that Arrow data crosses plugins and the runtime.
pub mod records {
    use super::*;
    use bridgeflow_sdk::arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use bridgeflow_sdk::PortType;
    use std::sync::Arc;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
    pub struct RowsConfig {
        pub batches: usize,
        pub rows: usize,
    }

    pub struct Rows {
        cfg: RowsConfig,
    }

    impl Source for Rows {
        type Config = RowsConfig;
        const DESCRIPTION: &'static str = "Generates record batches (id: int64, text: utf8)";
        const OUTPUT: PortType = PortType::Records;
        fn new(cfg: RowsConfig) -> Result<Self> {
            Ok(Rows { cfg })
        }
        fn plan(&mut self) -> Result<StreamPlan> {
            Ok(StreamPlan::default())
        }
        fn run(&mut self, out: &mut Emitter) -> Result<()> {
            for b in 0..self.cfg.batches {
                let ids: Vec<i64> = (0..self.cfg.rows)
                    .map(|r| (b * self.cfg.rows + r) as i64)
                    .collect();
                let text: Vec<String> = ids.iter().map(|i| format!("doc {i}")).collect();
                let batch = RecordBatch::try_from_iter(vec![
                    ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
                    ("text", Arc::new(StringArray::from(text)) as ArrayRef),
                ])
                .map_err(|e| PluginError::internal(e.to_string()))?;
                out.records(&batch)?;
            }
            Ok(())
        }
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
    pub struct CountConfig {}

    pub struct Count {
        rows: usize,
        id_sum: i64,
    }

    impl Sink for Count {
        type Config = CountConfig;
        const DESCRIPTION: &'static str = "Counts rows and sums the id column";
        const INPUTS: &'static [PortType] = &[PortType::Records];
        fn new(_: CountConfig) -> Result<Self> {
            Ok(Count { rows: 0, id_sum: 0 })
        }
        fn open(&mut self, _inputs: &[StreamPlan]) -> Result<()> {
            Ok(())
        }
        fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
            let batch = item.into_records()?;
            let ids = batch
                .column_by_name("id")
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| PluginError::shape("no int64 column 'id'"))?;
            self.id_sum += ids.values().iter().sum::<i64>();
            self.rows += batch.num_rows();
            Ok(())
        }
        fn commit(&mut self) -> Result<String> {
            Ok(format!("rows={} id_sum={}", self.rows, self.id_sum))
        }
    }
}

/// A stateful stage with two output ports, and a writer serving a command-line scheme of its
/// own: what a trainer and an exporter need from the runtime, without touching it.
pub mod stateful {
    use super::*;
    use bridgeflow_sdk::arrow_array::{ArrayRef, Int64Array, RecordBatch};
    use bridgeflow_sdk::{Endpoint, Port, PortType};
    use std::io::Write;
    use std::sync::Arc;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
    pub struct KeepConfig {}

    /// Keeps every tensor until its inputs end (as a trainer keeps weights), then emits them on
    /// `weights` and one row per tensor on `metrics`. `DECLARED`: whether it says so in its
    /// descriptor (the undeclared one shows what the declaration prevents).
    pub struct KeepAs<const DECLARED: bool> {
        kept: Vec<Tensor>,
        plan: StreamPlan,
    }

    pub type Keep = KeepAs<true>;
    pub type KeepUndeclared = KeepAs<false>;

    impl<const DECLARED: bool> Transform for KeepAs<DECLARED> {
        type Config = KeepConfig;
        const DESCRIPTION: &'static str =
            "Holds every tensor it receives, then emits them (weights) and per-tensor rows (metrics)";
        const OUTPUTS: &'static [Port] = &[Port::tensors("weights"), Port::records("metrics")];
        const RETAINS_INPUTS: bool = DECLARED;
        fn new(_: KeepConfig) -> Result<Self> {
            Ok(KeepAs {
                kept: Vec::new(),
                plan: StreamPlan::default(),
            })
        }
        fn plan_outputs(&mut self, inputs: &[StreamPlan]) -> Result<Vec<StreamPlan>> {
            self.plan = inputs[0].clone();
            Ok(vec![inputs[0].clone(), StreamPlan::default()])
        }
        fn process(&mut self, _port: usize, item: Item, _out: &mut Emitter) -> Result<()> {
            self.kept.push(item.into_tensor()?);
            Ok(())
        }
        fn finish(&mut self, out: &mut Emitter) -> Result<()> {
            let steps: Vec<i64> = (0..self.kept.len() as i64).collect();
            let bytes: Vec<i64> = self.kept.iter().map(|t| t.data.len() as i64).collect();
            for t in self.kept.drain(..) {
                out.tensor_to(0, t)?;
            }
            let batch = RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(steps)) as ArrayRef),
                ("bytes", Arc::new(Int64Array::from(bytes)) as ArrayRef),
            ])
            .map_err(|e| PluginError::internal(e.to_string()))?;
            out.records_to(1, &batch)
        }
        fn summary(&mut self) -> String {
            format!("kept {} tensors", self.plan.tensors.len())
        }
        fn metrics(&mut self) -> bridgeflow_sdk::serde_json::Value {
            bridgeflow_sdk::serde_json::json!({
                "kept_tensors": self.plan.tensors.len(),
                "kept_bytes": self.plan.total_bytes(),
            })
        }
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
    pub struct FakeConfig {
        pub path: std::path::PathBuf,
        #[serde(default)]
        pub overwrite: bool,
    }

    /// Writes one line per whole tensor (`name dtype shape bytes`, the bytes received for it,
    /// pieces summed) to `path`: the `fake:` endpoint.
    pub struct FakeWriter {
        cfg: FakeConfig,
        tensors: Vec<TensorInfo>,
        received: std::collections::HashMap<String, u64>,
    }

    impl Sink for FakeWriter {
        type Config = FakeConfig;
        const DESCRIPTION: &'static str = "Lists the tensors it receives in a text file";
        const INPUTS: &'static [PortType] = &[PortType::Tensors];
        const ENDPOINTS: &'static [Endpoint] = &[Endpoint {
            options: &["overwrite"],
            ..Endpoint::new("fake", "hf", "a text file listing HF tensors (tests only)")
        }];
        fn new(cfg: FakeConfig) -> Result<Self> {
            Ok(FakeWriter {
                cfg,
                tensors: Vec::new(),
                received: Default::default(),
            })
        }
        fn open(&mut self, inputs: &[StreamPlan]) -> Result<()> {
            self.tensors = inputs[0].whole_tensors();
            if self.cfg.path.exists() && !self.cfg.overwrite {
                return Err(PluginError::config(format!(
                    "{} exists (overwrite = true replaces it)",
                    self.cfg.path.display()
                )));
            }
            Ok(())
        }
        fn consume(&mut self, _port: usize, item: Item) -> Result<()> {
            let t = item.into_tensor()?;
            *self
                .received
                .entry(t.info.base_name().to_string())
                .or_default() += t.data.len() as u64;
            Ok(())
        }
        fn commit(&mut self) -> Result<String> {
            let mut lines: Vec<String> = self
                .tensors
                .iter()
                .map(|t| {
                    let got = self.received.get(t.name()).copied().unwrap_or(0);
                    format!("{} {} {} {got}", t.name(), t.dtype.name(), t.shape_string())
                })
                .collect();
            lines.sort();
            let io = |e| PluginError::io(&self.cfg.path, "write", e);
            let tmp = self.cfg.path.with_extension("partial");
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            for l in &lines {
                writeln!(f, "{l}").map_err(io)?;
            }
            drop(f);
            bridgeflow_sdk::fsutil::enter_commit_point(&self.cfg.path)?;
            std::fs::rename(&tmp, &self.cfg.path).map_err(io)?;
            Ok(format!("listed {} tensors", lines.len()))
        }
        fn metrics(&mut self) -> bridgeflow_sdk::serde_json::Value {
            bridgeflow_sdk::serde_json::json!({ "tensors": self.tensors.len() })
        }
    }
}

bridgeflow_sdk::export_plugins! {
    "testkit" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Test-only stages for bridgeflow's own tests",
        reader: Source(Gen),
        transform: Transform(Fail),
        writer: Sink(Slow),
    }
    "testkit-state" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Test-only stateful stage with two output ports, and the fake: endpoint",
        trainer: Transform(stateful::Keep),
        transform: Transform(stateful::KeepUndeclared),
        writer: Sink(stateful::FakeWriter),
    }
    "testkit-records" {
        version: env!("CARGO_PKG_VERSION"),
        description: "Test-only record-batch stages",
        reader: Source(records::Rows),
        writer: Sink(records::Count),
    }
}
