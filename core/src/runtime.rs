//! Execution: one blocking task per stage on tokio, bounded channels between them, fan-out to
//! every consumer, a global memory budget, and cancellation on the first error.
//!
//! Plugin calls are synchronous FFI doing I/O and CPU work, so each stage runs in
//! `spawn_blocking` (CPU-heavy plugins add rayon inside); the async executor only supervises.
//!
//! # Interrupts and the commit point
//!
//! SIGINT (Ctrl-C), SIGTERM (`timeout`, Slurm, Kubernetes) and SIGHUP are handled alike, while
//! a run is active, against the run's [`CommitGate`]. Each writer (every stage without outputs)
//! passes a commit point right before it makes its output visible (`fsutil::commit`, asked
//! through the emitter of the sink's `finish`); the gate decides, once and atomically, between
//! an interrupt and each writer:
//!
//! - an interrupt that comes while some writer has not yet passed its commit point cancels the
//!   run like an error: writers that have not passed it do not commit and remove their staging,
//!   and the run fails ("interrupted (SIGTERM)", exit status 1). A writer already past its
//!   commit point (another writer of the same run) finishes its commit;
//! - an interrupt that comes once every writer has passed its commit point no longer fails the
//!   run: the commits complete, the run succeeds (exit status 0), and a note on stderr says the
//!   signal came after the commit point. Later runs in the same process then refuse to start.
//!
//! An error anywhere closes the gate too: a run that fails commits nothing that had not
//! already passed its commit point. A second signal during a run exits at once with status
//! 128 + the signal number (staging left behind is removed by the next run writing the same
//! output, or by `bridgeflow clean`). With no run active, a signal has its default effect.

use crate::budget::{Budget, Hold};
use crate::error::RunError;
use crate::graph::{Graph, Node, Upstream};
use crate::progress::Progress;
use bridgeflow_sdk::fsutil::{CommitGate, Interrupt};
use bridgeflow_sdk::{Emitter, Finished, Item, PluginError, PortType, RecordBatchFfi, StreamPlan};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::{channel, Receiver, Sender};
use tracing::{debug, info, info_span};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Bytes of tensor data allowed in flight.
    pub memory_budget: u64,
    /// Items buffered per channel (the budget is the real bound; this caps item counts).
    pub channel_capacity: usize,
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            memory_budget: 2 << 30,
            channel_capacity: 64,
            progress: false,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageReport {
    pub name: String,
    pub plugin: String,
    pub kind: String,
    pub items_in: u64,
    pub bytes_in: u64,
    pub items_out: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    /// What the stage said when it finished (writers: what they committed).
    pub summary: String,
    /// The numbers the stage reported when it finished (null: none).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub metrics: serde_json::Value,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub stages: Vec<StageReport>,
    pub budget: u64,
    /// Highest bytes of tensor data in flight, by the runtime's own count.
    pub peak_in_flight: u64,
    /// Most bytes stateful stages retained at once (not part of the in-flight count).
    pub peak_retained: u64,
    /// Times a source was let over the budget because the pipeline could not progress otherwise.
    pub overdrafts: usize,
    pub seconds: f64,
    /// The signal that arrived after every writer's commit point (the run still succeeded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted_after_commit: Option<String>,
}

enum Envelope {
    Data {
        port: usize,
        item: Item,
        _hold: Option<Arc<Hold>>,
    },
    End {
        port: usize,
    },
}

struct Shared {
    budget: Arc<Budget>,
    first_error: Mutex<Option<RunError>>,
    /// Where interrupts and writers' commits meet (see the module docs).
    gate: CommitGate,
    /// The first signal this run received.
    interrupted: Mutex<Option<&'static str>>,
    /// Set when that signal came after every writer's commit point.
    late_interrupt: Mutex<Option<&'static str>>,
}

/// What a signal did to a run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Signalled {
    Cancelled,
    AfterCommitPoint,
    /// The run had received a signal before: the process exits now.
    Again,
}

impl Shared {
    /// Keeps the first error of the run (later ones are usually its echoes) and cancels the rest.
    fn record(&self, error: RunError) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(error);
        }
        drop(first);
        self.cancel();
    }

    /// Stops sources and waiting stages, and closes the commit gate.
    fn cancel(&self) {
        self.gate.cancel();
        self.budget.cancel();
    }

    fn fail(&self, node: &Node, error: PluginError) {
        if error.is_cancelled() {
            self.cancel();
        } else {
            self.record(run_error(node, error));
        }
    }

    /// SIGINT, SIGTERM or SIGHUP arrived: decided against the commit gate.
    fn on_signal(&self, name: &'static str) -> Signalled {
        {
            let mut first = self.interrupted.lock().unwrap();
            if first.is_some() {
                return Signalled::Again;
            }
            *first = Some(name);
        }
        match self.gate.interrupt() {
            Interrupt::Cancelled => {
                self.record(RunError::runtime(PluginError::new(
                    bridgeflow_sdk::ErrorKind::Cancelled,
                    format!("interrupted ({name})"),
                )));
                Signalled::Cancelled
            }
            Interrupt::AfterCommitPoint => {
                *self.late_interrupt.lock().unwrap() = Some(name);
                eprintln!(
                    "note: {name} arrived after the commit point: the output is being committed \
                     in full and the run will succeed"
                );
                Signalled::AfterCommitPoint
            }
        }
    }
}

/// Signals that stop a run, listened for on a thread of their own from the first run on.
mod signals {
    use super::{Shared, Signalled};
    use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
    use std::time::Duration;

    #[derive(Default)]
    struct HubState {
        runs: Vec<Weak<Shared>>,
        /// A signal that came after a run's commit point: later runs refuse to start.
        pending: Option<&'static str>,
        delivered: u64,
    }

    #[derive(Default)]
    pub(super) struct Hub {
        state: Mutex<HubState>,
        changed: Condvar,
    }

    pub(super) fn hub() -> &'static Hub {
        static HUB: OnceLock<Hub> = OnceLock::new();
        HUB.get_or_init(Hub::default)
    }

    /// Starts the listener once; true once SIGINT, SIGTERM and SIGHUP are caught.
    fn listening() -> bool {
        static STARTED: OnceLock<bool> = OnceLock::new();
        *STARTED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("bridgeflow-signals".into())
                .spawn(move || listen(tx));
            spawned.is_ok() && rx.recv().unwrap_or(false)
        })
    }

    fn listen(ready: std::sync::mpsc::Sender<bool>) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            let _ = ready.send(false);
            return;
        };
        rt.block_on(async move {
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                let _ = ready.send(false);
                return;
            };
            let _ = ready.send(true);
            loop {
                let (signo, name) = tokio::select! {
                    _ = int.recv() => (libc::SIGINT, "SIGINT"),
                    _ = term.recv() => (libc::SIGTERM, "SIGTERM"),
                    _ = hup.recv() => (libc::SIGHUP, "SIGHUP"),
                };
                hub().deliver(signo, name);
            }
        });
    }

    impl Hub {
        /// Registers a run; Err(signal) if an earlier signal means no run should start.
        pub(super) fn register(&self, run: &Arc<Shared>) -> Result<(), &'static str> {
            if !listening() {
                tracing::warn!("cannot listen for SIGINT/SIGTERM/SIGHUP");
            }
            let mut s = self.state.lock().unwrap();
            if let Some(name) = s.pending {
                return Err(name);
            }
            s.runs.retain(|w| w.strong_count() > 0);
            s.runs.push(Arc::downgrade(run));
            Ok(())
        }

        pub(super) fn unregister(&self, run: &Arc<Shared>) {
            let mut s = self.state.lock().unwrap();
            s.runs
                .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(run)));
        }

        fn deliver(&self, signo: i32, name: &'static str) {
            let mut s = self.state.lock().unwrap();
            let runs: Vec<Arc<Shared>> = s.runs.iter().filter_map(Weak::upgrade).collect();
            if runs.is_empty() {
                // No run to stop: the signal's default effect, as if it were not caught.
                drop(s);
                // SAFETY: restoring the default disposition and re-raising are plain syscalls.
                unsafe {
                    libc::signal(signo, libc::SIG_DFL);
                    libc::raise(signo);
                }
                return;
            }
            for run in runs {
                match run.on_signal(name) {
                    Signalled::Again => {
                        eprintln!(
                            "bridgeflow: {name} again: exiting now (staging left behind is \
                             removed by the next run writing that output, or by `bridgeflow clean`)"
                        );
                        std::process::exit(128 + signo);
                    }
                    Signalled::AfterCommitPoint => s.pending = Some(name),
                    Signalled::Cancelled => {}
                }
            }
            s.delivered += 1;
            self.changed.notify_all();
        }

        /// Sends `signo` to this process and waits until the listener has handled it (for the
        /// `BRIDGEFLOW_TEST_SIGNAL_AT_COMMIT` hook).
        pub(super) fn raise_and_wait(&self, signo: i32) {
            let s = self.state.lock().unwrap();
            let before = s.delivered;
            // SAFETY: a plain syscall.
            unsafe { libc::kill(libc::getpid(), signo) };
            let _ = self
                .changed
                .wait_timeout_while(s, Duration::from_secs(10), |s| s.delivered == before);
        }
    }
}

/// Writer `w` reached its commit point: true if it may commit. With
/// `BRIDGEFLOW_TEST_SIGNAL_AT_COMMIT=before` (or `after`) the process first sends itself SIGTERM
/// right before (after) the gate decides, and waits until it was handled: the tests' way to
/// place an interrupt exactly at the commit point.
fn commit_point(shared: &Shared, w: usize) -> bool {
    let hook = std::env::var("BRIDGEFLOW_TEST_SIGNAL_AT_COMMIT").ok();
    let fresh = shared.interrupted.lock().unwrap().is_none();
    if fresh && hook.as_deref() == Some("before") {
        signals::hub().raise_and_wait(libc::SIGTERM);
    }
    let go = shared.gate.enter(w);
    if go && fresh && hook.as_deref() == Some("after") {
        signals::hub().raise_and_wait(libc::SIGTERM);
    }
    go
}

fn run_error(node: &Node, error: PluginError) -> RunError {
    RunError {
        stage: node.name.clone(),
        plugin: node.plugin.clone(),
        kind: node.kind.to_string(),
        error,
    }
}

/// Runs a validated graph on a fresh multi-threaded tokio runtime.
pub fn run_blocking(graph: Graph, opts: RunOptions) -> Result<RunReport, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError {
            stage: String::new(),
            plugin: String::new(),
            kind: String::new(),
            error: PluginError::internal(format!("cannot start tokio: {e}")),
        })?;
    rt.block_on(run(graph, opts))
}

pub async fn run(graph: Graph, opts: RunOptions) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let pipeline = graph.spec.name.clone();
    let mut nodes = graph.nodes;

    let budget = Budget::new(opts.memory_budget);
    let shared = Arc::new(Shared {
        budget: budget.clone(),
        first_error: Mutex::new(None),
        gate: CommitGate::new(),
        interrupted: Mutex::new(None),
        late_interrupt: Mutex::new(None),
    });
    // Writers: the stages without outputs, numbered for the commit gate.
    let mut sinks: Vec<Option<usize>> = Vec::with_capacity(nodes.len());
    let mut writers = 0;
    for n in &nodes {
        if n.descriptor.outputs.is_empty() {
            sinks.push(Some(writers));
            writers += 1;
        } else {
            sinks.push(None);
        }
    }
    shared.gate.set_writers(writers);
    // Signals count from here: writers claim their outputs while planning.
    if let Err(name) = signals::hub().register(&shared) {
        for n in nodes.iter_mut() {
            n.stage.abort();
        }
        return Err(RunError::runtime(PluginError::new(
            bridgeflow_sdk::ErrorKind::Cancelled,
            format!("interrupted ({name}) before this run started"),
        )));
    }
    let result = run_registered(nodes, sinks, &shared, opts, started, pipeline).await;
    signals::hub().unregister(&shared);
    result
}

async fn run_registered(
    nodes: Vec<Node>,
    sinks: Vec<Option<usize>>,
    shared: &Arc<Shared>,
    opts: RunOptions,
    started: Instant,
    pipeline: String,
) -> Result<RunReport, RunError> {
    let budget = shared.budget.clone();
    let (mut nodes, plans) = tokio::task::spawn_blocking(move || plan_all(nodes))
        .await
        .expect("planning task panicked");
    let plans = plans?;
    // Interrupted while planning.
    if budget.is_cancelled() {
        abort_all(&mut nodes);
        let e = shared.first_error.lock().unwrap().take();
        return Err(e.unwrap_or_else(|| RunError::runtime(PluginError::cancelled())));
    }

    let mut wiring = Wiring::new(&nodes, opts.channel_capacity);
    let progress = Progress::new(opts.progress);
    // One blocking task per stage.
    let mut handles = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let outs = wiring.outputs_of(&node);
        let rx = wiring.receivers[i].take();
        let (expected, expected_items) = expected_input(&node, i, &plans);
        let bar = if carries_rows(&node) {
            progress.rows_bar(&node.name)
        } else {
            progress.bar(&node.name, expected)
        };
        let ctx = StageCtx {
            shared: shared.clone(),
            sink: sinks[i],
            bar,
            expected_items,
        };
        handles.push(tokio::task::spawn_blocking(move || {
            drive(node, rx, outs, ctx)
        }));
    }
    drop(wiring);

    let mut reports = Vec::new();
    for h in handles {
        match h.await {
            Ok(Some(r)) => reports.push(r),
            Ok(None) => {}
            Err(e) => {
                shared.record(RunError::runtime(PluginError::internal(format!(
                    "stage task panicked: {e}"
                ))));
            }
        }
    }
    progress.clear();

    if let Some(e) = shared.first_error.lock().unwrap().take() {
        return Err(e);
    }
    if budget.is_cancelled() {
        return Err(RunError::runtime(PluginError::cancelled()));
    }
    // A run that read an input truncated or changed while it was read did not succeed.
    bridgeflow_sdk::inputs_intact().map_err(RunError::runtime)?;
    Ok(RunReport {
        pipeline,
        stages: reports,
        budget: budget.limit(),
        peak_in_flight: budget.peak(),
        peak_retained: budget.peak_retained(),
        overdrafts: budget.overdrafts(),
        seconds: started.elapsed().as_secs_f64(),
        interrupted_after_commit: shared.late_interrupt.lock().unwrap().map(str::to_string),
    })
}

fn abort_all(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.stage.abort();
    }
}

/// The plan of every output port, in topological order: each stage learns what its inputs
/// will carry. A stage must return one plan per declared output port.
fn plan_all(mut nodes: Vec<Node>) -> (Vec<Node>, Result<Vec<Vec<StreamPlan>>, RunError>) {
    let mut plans: Vec<Vec<StreamPlan>> = Vec::with_capacity(nodes.len());
    for i in 0..nodes.len() {
        let inputs: Vec<StreamPlan> = nodes[i]
            .inputs
            .iter()
            .map(|u| plans[u.node][u.port].clone())
            .collect();
        let span = info_span!("plan", stage = %nodes[i].name);
        let _e = span.enter();
        let planned = nodes[i]
            .stage
            .plan(inputs.into())
            .into_result()
            .and_then(|p| check_plan_count(&nodes[i], p.into_vec()));
        match planned {
            Ok(p) => plans.push(p),
            Err(e) => {
                let err = run_error(&nodes[i], e);
                abort_all(&mut nodes);
                return (nodes, Err(err));
            }
        }
    }
    (nodes, Ok(plans))
}

fn check_plan_count(node: &Node, plans: Vec<StreamPlan>) -> Result<Vec<StreamPlan>, PluginError> {
    let ports = node.descriptor.outputs.len();
    if plans.len() != ports {
        return Err(PluginError::internal(format!(
            "planned {} output stream(s) but declares {ports} output port(s)",
            plans.len()
        )));
    }
    Ok(plans)
}

/// Bytes and items a stage's progress bar counts: what a source announces on all its ports,
/// what a downstream stage's inputs announce.
fn expected_input(node: &Node, i: usize, plans: &[Vec<StreamPlan>]) -> (u64, usize) {
    let streams: Vec<&StreamPlan> = if node.is_source() {
        plans[i].iter().collect()
    } else {
        node.inputs
            .iter()
            .map(|u: &Upstream| &plans[u.node][u.port])
            .collect()
    };
    let bytes = streams
        .iter()
        .map(|p| p.total_bytes())
        .fold(0, u64::saturating_add);
    (bytes, streams.iter().map(|p| p.tensors.len()).sum())
}

/// Record streams are counted in rows (documents); their totals are not known up front.
fn carries_rows(node: &Node) -> bool {
    let first = if node.is_source() {
        node.descriptor.outputs.first().map(|o| o.ty)
    } else {
        node.descriptor.inputs.first().copied()
    };
    first == Some(PortType::Records)
}

/// Where items go: (channel, the consumer's input port).
type Outlet = (Sender<Envelope>, usize);

/// One inbound channel per stage with inputs, shared by its input ports.
struct Wiring {
    senders: Vec<Option<Sender<Envelope>>>,
    receivers: Vec<Option<Receiver<Envelope>>>,
}

impl Wiring {
    fn new(nodes: &[Node], capacity: usize) -> Wiring {
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for n in nodes {
            if n.is_source() {
                senders.push(None);
                receivers.push(None);
            } else {
                let (tx, rx) = channel(capacity.max(1));
                senders.push(Some(tx));
                receivers.push(Some(rx));
            }
        }
        Wiring { senders, receivers }
    }

    /// Per output port of `node`, the outlets of its consumers.
    fn outputs_of(&self, node: &Node) -> Vec<Vec<Outlet>> {
        node.consumers
            .iter()
            .map(|port| {
                port.iter()
                    .map(|&(c, p)| (self.senders[c].clone().expect("consumer has a channel"), p))
                    .collect()
            })
            .collect()
    }
}

/// What a stage's task needs besides its node and channels.
struct StageCtx {
    shared: Arc<Shared>,
    /// The writer number for the commit gate (sinks only).
    sink: Option<usize>,
    bar: indicatif::ProgressBar,
    expected_items: usize,
}

/// Counts for the stage's report.
#[derive(Default)]
struct Counts {
    items_in: u64,
    bytes_in: u64,
    items_out: u64,
    bytes_out: u64,
}

/// Runs one stage to completion. Returns its report, or None after recording an error.
fn drive(
    mut node: Node,
    rx: Option<Receiver<Envelope>>,
    outs: Vec<Vec<Outlet>>,
    ctx: StageCtx,
) -> Option<StageReport> {
    let span = info_span!("stage", name = %node.name, plugin = %node.plugin, kind = %node.kind);
    let _entered = span.enter();
    let started = Instant::now();
    info!("started");
    let mut counts = Counts::default();
    let result = run_stage(&mut node, rx, &outs, &ctx, &mut counts);
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(finished) => {
            end_outputs(&ctx.shared.budget, &outs);
            ctx.bar.finish();
            Some(report(&node, counts, seconds, finished))
        }
        Err(e) => {
            node.stage.abort();
            ctx.bar.abandon();
            if e.is_cancelled() {
                debug!("cancelled");
            } else {
                tracing::error!("failed: {e}");
            }
            ctx.shared.fail(&node, e);
            None
        }
    }
}

fn report(node: &Node, c: Counts, seconds: f64, finished: Finished) -> StageReport {
    let summary = finished.summary.to_string();
    info!(
        items_in = c.items_in,
        items_out = c.items_out,
        bytes_out = c.bytes_out,
        seconds,
        "finished {summary}"
    );
    // A plugin's metrics that are not JSON are kept as text rather than lost.
    let metrics = match finished.metrics.as_str() {
        "" => serde_json::Value::Null,
        m => serde_json::from_str(m).unwrap_or_else(|_| serde_json::Value::String(m.into())),
    };
    StageReport {
        name: node.name.clone(),
        plugin: node.plugin.clone(),
        kind: node.kind.to_string(),
        items_in: c.items_in,
        bytes_in: c.bytes_in,
        items_out: c.items_out,
        bytes_out: c.bytes_out,
        seconds,
        summary,
        metrics,
    }
}

/// Tells every consumer this stage's outputs have ended.
fn end_outputs(budget: &Budget, outs: &[Vec<Outlet>]) {
    for (tx, port) in outs.iter().flatten() {
        // A consumer that already stopped has reported why.
        budget.item_queued();
        if tx.blocking_send(Envelope::End { port: *port }).is_err() {
            budget.item_received();
        }
    }
}

/// The stage's run (sources) or input loop (others), then its finish or commit.
fn run_stage(
    node: &mut Node,
    rx: Option<Receiver<Envelope>>,
    outs: &[Vec<Outlet>],
    ctx: &StageCtx,
    counts: &mut Counts,
) -> Result<Finished, PluginError> {
    let budget = ctx.shared.budget.clone();
    let is_source = node.is_source();
    let ports: Vec<PortType> = node.descriptor.outputs.iter().map(|o| o.ty).collect();
    // Bytes this stage made that are still alive downstream (see Budget::account_downstream).
    let own_output = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (mut items_out, mut bytes_out) = (0u64, 0u64);
    let mut emit = |port: usize, item: Item| -> Result<(), PluginError> {
        if budget.is_cancelled() {
            return Err(PluginError::cancelled());
        }
        check_port(&ports, port, &item)?;
        let bytes = item.data_bytes();
        let (item, hold) = admit(&budget, item, is_source, &own_output)?;
        items_out += 1;
        bytes_out += bytes;
        if is_source {
            match &item {
                Item::Records(r) => ctx.bar.inc(r.num_rows()),
                Item::Tensor(_) => {
                    ctx.bar.inc(bytes);
                    ctx.bar
                        .set_message(format!("{items_out}/{} tensors", ctx.expected_items));
                }
            }
        }
        send_all(&budget, &outs[port], item, hold)
    };
    let is_cancelled = || budget.is_cancelled();
    let mut rx = rx;
    let result = Emitter::scoped_ports(&mut emit, Some(&is_cancelled), |em| {
        match rx.as_mut() {
            None => node.stage.run(em).into_result()?,
            Some(rx) => receive_all(node, rx, em, ctx, counts)?,
        }
        finish(node, em, ctx)
    });
    drop(rx);
    counts.items_out = items_out;
    counts.bytes_out = bytes_out;
    result
}

/// An item emitted on `port` must exist and carry that port's type.
fn check_port(ports: &[PortType], port: usize, item: &Item) -> Result<(), PluginError> {
    let Some(&want) = ports.get(port) else {
        return Err(PluginError::internal(format!(
            "emitted on output port {port}, but the stage declares {} output port(s)",
            ports.len()
        )));
    };
    let got = match item {
        Item::Tensor(_) => PortType::Tensors,
        Item::Records(_) => PortType::Records,
    };
    if got != want {
        return Err(PluginError::internal(format!(
            "emitted {got} on output port {port}, which carries {want}"
        )));
    }
    Ok(())
}

/// Counts an emitted item against the budget: sources wait for room, downstream stages while
/// their own output is alive.
fn admit(
    budget: &Arc<Budget>,
    item: Item,
    is_source: bool,
    own_output: &Arc<std::sync::atomic::AtomicU64>,
) -> Result<(Item, Option<Arc<Hold>>), PluginError> {
    match item {
        Item::Tensor(mut t) => {
            t.data = if is_source {
                budget.account(t.data, true)
            } else {
                budget.account_downstream(t.data, own_output)
            }
            .ok_or_else(PluginError::cancelled)?;
            Ok((Item::Tensor(t), None))
        }
        Item::Records(r) => {
            let hold = budget
                .hold(r.memory_bytes(), is_source)
                .ok_or_else(PluginError::cancelled)?;
            Ok((Item::Records(r), Some(Arc::new(hold))))
        }
    }
}

/// Feeds every input item to the stage until each input port has ended.
fn receive_all(
    node: &mut Node,
    rx: &mut Receiver<Envelope>,
    em: &mut Emitter,
    ctx: &StageCtx,
    counts: &mut Counts,
) -> Result<(), PluginError> {
    let budget = &ctx.shared.budget;
    let retains = node.descriptor.retains_inputs;
    let mut open = node.inputs.len();
    while open > 0 {
        if budget.is_cancelled() {
            return Err(PluginError::cancelled());
        }
        match rx.blocking_recv() {
            Some(Envelope::Data { port, item, _hold }) => {
                let b = item.data_bytes();
                let rows = match &item {
                    Item::Records(r) => Some(r.num_rows()),
                    Item::Tensor(t) => {
                        if retains {
                            budget.retain(&t.data);
                        }
                        None
                    }
                };
                counts.items_in += 1;
                counts.bytes_in += b;
                budget.set_busy(true);
                budget.item_received();
                let r = node.stage.process(port as u32, item, em).into_result();
                budget.set_busy(false);
                r?;
                match rows {
                    Some(n) => ctx.bar.inc(n),
                    None => {
                        ctx.bar.inc(b);
                        ctx.bar.set_message(format!(
                            "{}/{} tensors",
                            counts.items_in, ctx.expected_items
                        ));
                    }
                }
            }
            Some(Envelope::End { port }) => {
                budget.set_busy(true);
                budget.item_received();
                budget.set_busy(false);
                debug!(port, "input ended");
                open -= 1;
            }
            // An upstream stage stopped without finishing: it failed or was cancelled, and
            // reported that itself.
            None => return Err(PluginError::cancelled()),
        }
    }
    Ok(())
}

/// The stage's finish: a writer's commit passes its commit point, answered through an emitter
/// of its own (see the module docs).
fn finish(node: &mut Node, em: &mut Emitter, ctx: &StageCtx) -> Result<Finished, PluginError> {
    if node.is_source() {
        return node.stage.finish(em).into_result();
    }
    // Nothing read from an input truncated or changed meanwhile is passed on or committed
    // (bridgeflow_sdk::inputs; writers check again right before commit).
    bridgeflow_sdk::inputs_intact()?;
    let shared = &ctx.shared;
    shared.budget.set_busy(true);
    let r = match ctx.sink {
        Some(w) => {
            let at_commit = || !commit_point(shared, w);
            let mut no_emit = |_: Item| -> Result<(), PluginError> {
                Err(PluginError::internal("a sink emitted an item"))
            };
            let r = Emitter::scoped(&mut no_emit, Some(&at_commit), |fin| {
                node.stage.finish(fin).into_result()
            });
            if r.is_ok() {
                shared.gate.passed(w);
            }
            r
        }
        None => node.stage.finish(em).into_result(),
    };
    shared.budget.set_busy(false);
    r
}

fn send_all(
    budget: &Budget,
    outs: &[Outlet],
    item: Item,
    hold: Option<Arc<Hold>>,
) -> Result<(), PluginError> {
    let send = |tx: &Sender<Envelope>, port: usize, item: Item| {
        budget.item_queued();
        tx.blocking_send(Envelope::Data {
            port,
            item,
            _hold: hold.clone(),
        })
        .map_err(|_| {
            budget.item_received();
            PluginError::cancelled()
        })
    };
    match outs {
        [] => Ok(()),
        [(tx, port)] => send(tx, *port, item),
        many => match item {
            Item::Tensor(t) => {
                for (tx, port) in many {
                    send(tx, *port, Item::Tensor(t.clone()))?;
                }
                Ok(())
            }
            Item::Records(r) => {
                // Arrow buffers are shared: each consumer gets its own export of one batch.
                let batch = r.into_batch()?;
                for (tx, port) in many {
                    send(
                        tx,
                        *port,
                        Item::Records(RecordBatchFfi::from_batch(&batch)?),
                    )?;
                }
                Ok(())
            }
        },
    }
}
