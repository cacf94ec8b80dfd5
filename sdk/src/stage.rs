//! Stages: what flows between them, the traits a plugin author implements, and the
//! ABI-stable object the host drives.

use crate::declare::{Endpoint, Port, Translation};
use crate::{PluginError, RecordBatchFfi, Result, Tensor, TensorInfo};
use abi_stable::{
    sabi_trait,
    std_types::{RBox, RResult, RString, RVec},
    StableAbi,
};
use arrow_array::RecordBatch;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a stage is for. Roles follow from ports: a stage with no inputs is a source, one with
/// no outputs is a sink.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageKind {
    Reader,
    Writer,
    Mapper,
    Sharder,
    Transform,
    Trainer,
    Exporter,
}

impl StageKind {
    pub const ALL: [StageKind; 7] = [
        StageKind::Reader,
        StageKind::Writer,
        StageKind::Mapper,
        StageKind::Sharder,
        StageKind::Transform,
        StageKind::Trainer,
        StageKind::Exporter,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            StageKind::Reader => "reader",
            StageKind::Writer => "writer",
            StageKind::Mapper => "mapper",
            StageKind::Sharder => "sharder",
            StageKind::Transform => "transform",
            StageKind::Trainer => "trainer",
            StageKind::Exporter => "exporter",
        }
    }
    pub fn parse(s: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of data on a port.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortType {
    /// A stream of [`Tensor`]s announced by a [`StreamPlan`].
    Tensors,
    /// A stream of Arrow record batches.
    Records,
}

impl PortType {
    pub const fn name(self) -> &'static str {
        match self {
            PortType::Tensors => "tensors",
            PortType::Records => "records",
        }
    }
}

impl std::fmt::Display for PortType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a stream will carry, announced before any data flows: every tensor's name, dtype and
/// shape (so writers can lay out files and headers up front and write each tensor at its final
/// offset, in any order), and free-form attributes as a JSON object (e.g. `source_dir`, the
/// directory holding `config.json` and tokenizer files).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct StreamPlan {
    pub tensors: RVec<TensorInfo>,
    pub attrs: RString,
}

impl StreamPlan {
    /// The whole tensors the plan stands for, in order: a piece (`name#id` with a shard
    /// descriptor) counts as its tensor (base name, global shape), once.
    pub fn whole_tensors(&self) -> Vec<TensorInfo> {
        let mut seen = std::collections::HashSet::new();
        self.tensors
            .iter()
            .filter(|t| seen.insert(t.base_name().to_string()))
            .map(|t| match t.shard() {
                Some(s) => TensorInfo::new(t.base_name(), t.dtype, &s.global_shape),
                None => t.clone(),
            })
            .collect()
    }

    pub fn new(tensors: Vec<TensorInfo>) -> Self {
        StreamPlan {
            tensors: tensors.into(),
            attrs: RString::new(),
        }
    }

    /// Attributes as a JSON object (empty if unset or unparsable).
    pub fn attrs(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(self.attrs.as_str()).unwrap_or_default()
    }

    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attrs().get(key)?.as_str().map(str::to_owned)
    }

    pub fn set_attr(&mut self, key: &str, value: serde_json::Value) {
        let mut map = self.attrs();
        map.insert(key.to_owned(), value);
        self.attrs = RString::from(serde_json::Value::Object(map).to_string());
    }

    /// Total bytes of all tensors (saturating; plans come from untrusted headers).
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.nbytes().unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add)
    }
}

/// One unit of data on a port.
#[repr(u8)]
#[derive(StableAbi, Debug)]
pub enum Item {
    Tensor(Tensor),
    Records(RecordBatchFfi),
}

impl Item {
    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Item::Tensor(t) => Ok(t),
            Item::Records(_) => Err(PluginError::internal(
                "expected a tensor, got a record batch",
            )),
        }
    }
    pub fn into_records(self) -> Result<RecordBatch> {
        match self {
            Item::Records(r) => r.into_batch(),
            Item::Tensor(t) => Err(PluginError::internal(format!(
                "expected a record batch, got tensor '{}'",
                t.name()
            ))),
        }
    }
    /// Bytes of data the item holds.
    pub fn data_bytes(&self) -> u64 {
        match self {
            Item::Tensor(t) => t.data.len() as u64,
            Item::Records(r) => r.memory_bytes(),
        }
    }
}

/// Where a stage sends its output. The host behind it applies backpressure (the call blocks
/// while the memory budget or the channels are full) and returns a `Cancelled` error once the
/// run is being torn down; a stage should then return that error promptly.
#[repr(C)]
#[derive(StableAbi)]
pub struct Emitter {
    ctx: *mut c_void,
    emit_fn:
        unsafe extern "C" fn(ctx: *mut c_void, port: u32, item: Item) -> RResult<(), PluginError>,
    cancelled_fn: unsafe extern "C" fn(ctx: *mut c_void) -> bool,
}

/// The host's side of an emitter: (output port, item).
type EmitClosure<'a> = &'a mut dyn FnMut(usize, Item) -> Result<()>;

unsafe extern "C" fn closure_emit(
    ctx: *mut c_void,
    port: u32,
    item: Item,
) -> RResult<(), PluginError> {
    let f = &mut *(ctx as *mut EmitClosure<'_>);
    match catch_unwind(AssertUnwindSafe(|| f(port as usize, item))) {
        Ok(r) => r.into(),
        Err(_) => RResult::RErr(PluginError::internal("panic in the host's emit callback")),
    }
}
unsafe extern "C" fn never_cancelled(_: *mut c_void) -> bool {
    false
}

impl Emitter {
    /// Runs `body` with an emitter that hands every item to `f`, whatever its output port (for
    /// single-output stages; [`Emitter::scoped_ports`] passes the port too). This is how hosts
    /// (and tests) drive a stage; the emitter cannot outlive the closure.
    pub fn scoped<R>(
        f: &mut dyn FnMut(Item) -> Result<()>,
        cancelled: Option<&(dyn Fn() -> bool + Sync)>,
        body: impl FnOnce(&mut Emitter) -> R,
    ) -> R {
        let mut any_port = |_: usize, item: Item| f(item);
        Emitter::scoped_ports(&mut any_port, cancelled, body)
    }

    /// [`Emitter::scoped`] with the output port each item was emitted on.
    pub fn scoped_ports<R>(
        f: &mut dyn FnMut(usize, Item) -> Result<()>,
        cancelled: Option<&(dyn Fn() -> bool + Sync)>,
        body: impl FnOnce(&mut Emitter) -> R,
    ) -> R {
        let mut f: EmitClosure<'_> = f;
        match cancelled {
            None => {
                let mut em = Emitter {
                    ctx: &mut f as *mut EmitClosure<'_> as *mut c_void,
                    emit_fn: closure_emit,
                    cancelled_fn: never_cancelled,
                };
                body(&mut em)
            }
            Some(c) => {
                struct Both<'a, 'b> {
                    f: EmitClosure<'a>,
                    c: &'b (dyn Fn() -> bool + Sync),
                }
                unsafe extern "C" fn both_emit(
                    ctx: *mut c_void,
                    port: u32,
                    item: Item,
                ) -> RResult<(), PluginError> {
                    let b = &mut *(ctx as *mut Both<'_, '_>);
                    closure_emit(&mut b.f as *mut EmitClosure<'_> as *mut c_void, port, item)
                }
                unsafe extern "C" fn both_cancelled(ctx: *mut c_void) -> bool {
                    let b = &*(ctx as *const Both<'_, '_>);
                    (b.c)()
                }
                let mut both = Both { f, c };
                let mut em = Emitter {
                    ctx: &mut both as *mut Both<'_, '_> as *mut c_void,
                    emit_fn: both_emit,
                    cancelled_fn: both_cancelled,
                };
                body(&mut em)
            }
        }
    }

    /// Sends `item` on the first (or only) output port.
    pub fn emit(&mut self, item: Item) -> Result<()> {
        self.emit_to(0, item)
    }
    /// Sends `item` on output port `port` (the index in the stage's declared `OUTPUTS`).
    pub fn emit_to(&mut self, port: usize, item: Item) -> Result<()> {
        let port = u32::try_from(port)
            .map_err(|_| PluginError::internal(format!("output port {port} out of range")))?;
        unsafe { (self.emit_fn)(self.ctx, port, item) }.into_result()
    }
    pub fn tensor(&mut self, t: Tensor) -> Result<()> {
        self.emit(Item::Tensor(t))
    }
    pub fn records(&mut self, batch: &RecordBatch) -> Result<()> {
        self.emit(Item::Records(RecordBatchFfi::from_batch(batch)?))
    }
    pub fn tensor_to(&mut self, port: usize, t: Tensor) -> Result<()> {
        self.emit_to(port, Item::Tensor(t))
    }
    pub fn records_to(&mut self, port: usize, batch: &RecordBatch) -> Result<()> {
        self.emit_to(port, Item::Records(RecordBatchFfi::from_batch(batch)?))
    }
    /// True once the run is being cancelled; long loops should check it.
    pub fn is_cancelled(&self) -> bool {
        unsafe { (self.cancelled_fn)(self.ctx) }
    }
}

/// Text and numbers a stage reports when it finishes: `summary` for people, `metrics` (any
/// JSON value; null for none) for the run report and programs reading it.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct Finished {
    pub summary: RString,
    /// JSON text; empty for none.
    pub metrics: RString,
}

impl Finished {
    fn new(summary: String, metrics: serde_json::Value) -> Finished {
        Finished {
            summary: summary.into(),
            metrics: if metrics.is_null() {
                RString::new()
            } else {
                metrics.to_string().into()
            },
        }
    }
}

fn one_plan_only(what: &str) -> PluginError {
    PluginError::internal(format!(
        "{what}: a stage with one output implements plan(), one with several plan_outputs()"
    ))
}

/// A stage with no inputs (readers).
pub trait Source: Send + Sized + 'static {
    type Config: serde::de::DeserializeOwned + schemars::JsonSchema;
    const DESCRIPTION: &'static str;
    /// The type of the only output port (named [`crate::declare::DEFAULT_PORT`]).
    const OUTPUT: PortType = PortType::Tensors;
    /// Several named output ports instead (then implement [`Source::plan_outputs`] and emit
    /// with [`Emitter::emit_to`]).
    const OUTPUTS: &'static [Port] = &[];
    /// The command-line schemes this reader serves (`bridgeflow convert --from hf:DIR`).
    const ENDPOINTS: &'static [Endpoint] = &[];
    /// Builds the stage from its config. Must not do I/O: `validate` calls it.
    fn new(config: Self::Config) -> Result<Self>;
    /// Opens the input and announces what will flow.
    fn plan(&mut self) -> Result<StreamPlan> {
        Err(one_plan_only("plan"))
    }
    /// One plan per output port, in declared order.
    fn plan_outputs(&mut self) -> Result<Vec<StreamPlan>> {
        Ok(vec![self.plan()?])
    }
    /// Emits everything announced.
    fn run(&mut self, out: &mut Emitter) -> Result<()>;
    /// A one-line summary once `run` has returned (what was read, what was skipped).
    fn summary(&mut self) -> String {
        String::new()
    }
    /// Numbers for the run report once `run` has returned (null: none).
    fn metrics(&mut self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// How sure this reader is that it can read `path` (0 = no); used by `bridgeflow inspect`.
    fn probe(_path: &std::path::Path) -> u32 {
        0
    }
    /// The quantization method of the input at `path`, if it is quantized (HF's
    /// `quantization_config.quant_method`): `convert` inserts the stage that declares it.
    fn quant_method(_path: &std::path::Path) -> Result<Option<String>> {
        Ok(None)
    }
}

/// A stage with inputs and outputs (mappers, sharders, transforms, trainers).
pub trait Transform: Send + Sized + 'static {
    type Config: serde::de::DeserializeOwned + schemars::JsonSchema;
    const DESCRIPTION: &'static str;
    const INPUTS: &'static [PortType] = &[PortType::Tensors];
    /// How many of the last `INPUTS` a pipeline may leave unwired (a trainer's held-out
    /// samples): `plan` then gets only the wired inputs' plans, and ports count those.
    const OPTIONAL_INPUTS: usize = 0;
    /// The type of the only output port (named [`crate::declare::DEFAULT_PORT`]).
    const OUTPUT: PortType = PortType::Tensors;
    /// Several named output ports instead (then implement [`Transform::plan_outputs`] and emit
    /// with [`Emitter::emit_to`]).
    const OUTPUTS: &'static [Port] = &[];
    /// The stage keeps (some of) its inputs alive past `process` (a trainer holding weights):
    /// the runtime counts those bytes as retained, not in flight, so they neither block
    /// sources nor count as an overdraft.
    const RETAINS_INPUTS: bool = false;
    /// The name worlds it translates between (the model mapper: hf to megatron and back).
    const TRANSLATES: &'static [Translation] = &[];
    /// The `quant_method`s it dequantizes (see [`Source::quant_method`]).
    const QUANT_METHODS: &'static [&'static str] = &[];
    /// An exporter's command-line schemes (`bridgeflow convert --to trtllm:DIR`): each names,
    /// in [`Endpoint::through`], the writer that stores what the stage emits.
    const ENDPOINTS: &'static [Endpoint] = &[];
    fn new(config: Self::Config) -> Result<Self>;
    /// Receives the plans of the inputs, returns the plan of the output.
    fn plan(&mut self, _inputs: &[StreamPlan]) -> Result<StreamPlan> {
        Err(one_plan_only("plan"))
    }
    /// One plan per output port, in declared order.
    fn plan_outputs(&mut self, inputs: &[StreamPlan]) -> Result<Vec<StreamPlan>> {
        Ok(vec![self.plan(inputs)?])
    }
    fn process(&mut self, port: usize, item: Item, out: &mut Emitter) -> Result<()>;
    /// Called once every input has ended.
    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        Ok(())
    }
    /// A one-line summary after `finish` (what was checked, what was dropped).
    fn summary(&mut self) -> String {
        String::new()
    }
    /// Numbers for the run report after `finish` (a loss curve, counts; null: none).
    fn metrics(&mut self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A stage with inputs and no output (writers, exporters).
pub trait Sink: Send + Sized + 'static {
    type Config: serde::de::DeserializeOwned + schemars::JsonSchema;
    const DESCRIPTION: &'static str;
    const INPUTS: &'static [PortType] = &[PortType::Tensors];
    /// As [`Transform::RETAINS_INPUTS`].
    const RETAINS_INPUTS: bool = false;
    /// The command-line schemes this writer serves (`bridgeflow convert --to megatron:DIR`).
    const ENDPOINTS: &'static [Endpoint] = &[];
    fn new(config: Self::Config) -> Result<Self>;
    fn open(&mut self, inputs: &[StreamPlan]) -> Result<()>;
    fn consume(&mut self, port: usize, item: Item) -> Result<()>;
    /// Makes the output visible (atomically); returns a one-line summary. Right before the
    /// output becomes visible, the writer passes the run's commit point
    /// ([`crate::fsutil::commit`] and [`crate::fsutil::OutputClaim::commit`] do it): a run
    /// cancelled before then gets `Cancelled` and must not commit; once past it, an interrupt no
    /// longer fails the run.
    fn commit(&mut self) -> Result<String>;
    /// Numbers for the run report after `commit` (files, bytes; null: none).
    fn metrics(&mut self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Removes partial output. Also called when the run fails elsewhere.
    fn abort(&mut self) {}
}

/// The object the host drives, across the ABI. Plugin authors never implement it directly.
#[sabi_trait]
pub trait StageFfi: Send {
    /// One plan per output port (sinks: none).
    fn plan(&mut self, inputs: RVec<StreamPlan>) -> RResult<RVec<StreamPlan>, PluginError>;
    fn run(&mut self, out: &mut Emitter) -> RResult<(), PluginError>;
    fn process(&mut self, port: u32, item: Item, out: &mut Emitter) -> RResult<(), PluginError>;
    fn finish(&mut self, out: &mut Emitter) -> RResult<Finished, PluginError>;
    #[sabi(last_prefix_field)]
    fn abort(&mut self);
}

/// A boxed stage as the host holds it.
pub type StageBox = StageFfi_TO<'static, RBox<()>>;

/// Runs plugin code, turning a panic into an error instead of unwinding across the ABI.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.into(),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            RResult::RErr(PluginError::internal(format!("plugin panicked: {msg}")))
        }
    }
}

pub(crate) struct SourceAdapter<S>(pub S);
pub(crate) struct TransformAdapter<T>(pub T);
pub(crate) struct SinkAdapter<K>(pub K);

fn not_for(role: &str, what: &str) -> RResult<(), PluginError> {
    RResult::RErr(PluginError::internal(format!("{what} called on a {role}")))
}

impl<S: Source> StageFfi for SourceAdapter<S> {
    fn plan(&mut self, _inputs: RVec<StreamPlan>) -> RResult<RVec<StreamPlan>, PluginError> {
        guard(|| self.0.plan_outputs().map(RVec::from))
    }
    fn run(&mut self, out: &mut Emitter) -> RResult<(), PluginError> {
        guard(|| self.0.run(out))
    }
    fn process(&mut self, _: u32, _: Item, _: &mut Emitter) -> RResult<(), PluginError> {
        not_for("source", "process")
    }
    fn finish(&mut self, _out: &mut Emitter) -> RResult<Finished, PluginError> {
        guard(|| Ok(Finished::new(self.0.summary(), self.0.metrics())))
    }
    fn abort(&mut self) {}
}

impl<T: Transform> StageFfi for TransformAdapter<T> {
    fn plan(&mut self, inputs: RVec<StreamPlan>) -> RResult<RVec<StreamPlan>, PluginError> {
        guard(|| self.0.plan_outputs(&inputs).map(RVec::from))
    }
    fn run(&mut self, _out: &mut Emitter) -> RResult<(), PluginError> {
        not_for("transform", "run")
    }
    fn process(&mut self, port: u32, item: Item, out: &mut Emitter) -> RResult<(), PluginError> {
        guard(|| self.0.process(port as usize, item, out))
    }
    fn finish(&mut self, out: &mut Emitter) -> RResult<Finished, PluginError> {
        guard(|| {
            self.0.finish(out)?;
            Ok(Finished::new(self.0.summary(), self.0.metrics()))
        })
    }
    fn abort(&mut self) {}
}

impl<K: Sink> StageFfi for SinkAdapter<K> {
    fn plan(&mut self, inputs: RVec<StreamPlan>) -> RResult<RVec<StreamPlan>, PluginError> {
        guard(|| self.0.open(&inputs).map(|()| RVec::new()))
    }
    fn run(&mut self, _out: &mut Emitter) -> RResult<(), PluginError> {
        not_for("sink", "run")
    }
    fn process(&mut self, port: u32, item: Item, _out: &mut Emitter) -> RResult<(), PluginError> {
        guard(|| self.0.consume(port as usize, item))
    }
    fn finish(&mut self, out: &mut Emitter) -> RResult<Finished, PluginError> {
        // The host answers the commit point through this emitter (fsutil::enter_commit_point).
        let _hook = crate::fsutil::CommitHook::install(out);
        guard(|| {
            let summary = self.0.commit()?;
            Ok(Finished::new(summary, self.0.metrics()))
        })
    }
    fn abort(&mut self) {
        let _ = catch_unwind(AssertUnwindSafe(|| self.0.abort()));
    }
}
