//! Execution: one blocking task per stage on tokio, bounded channels between them, fan-out to
//! every consumer, a global memory budget, and cancellation on the first error.
//!
//! Plugin calls are synchronous FFI doing I/O and CPU work, so each stage runs in
//! `spawn_blocking` (CPU-heavy plugins add rayon inside); the async executor only supervises.

use crate::budget::{Budget, Hold};
use crate::error::RunError;
use crate::graph::{Graph, Node};
use crate::progress::Progress;
use bridgeflow_sdk::{Emitter, Item, PluginError, RecordBatchFfi, StreamPlan};
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
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub stages: Vec<StageReport>,
    pub budget: u64,
    /// Highest bytes of tensor data in flight, by the runtime's own count.
    pub peak_in_flight: u64,
    /// Times a source was let over the budget because the pipeline could not progress otherwise.
    pub overdrafts: usize,
    pub seconds: f64,
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
}

impl Shared {
    /// Keeps the first error of the run (later ones are usually its echoes) and cancels the rest.
    fn record(&self, error: RunError) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(error);
        }
        drop(first);
        self.budget.cancel();
    }

    fn fail(&self, node: &Node, error: PluginError) {
        if error.is_cancelled() {
            self.budget.cancel();
        } else {
            self.record(run_error(node, error));
        }
    }
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

    // 1. Plans, in topological order: each stage learns what its inputs will carry.
    let (nodes_back, plans) = tokio::task::spawn_blocking(move || {
        let mut plans: Vec<StreamPlan> = Vec::with_capacity(nodes.len());
        for i in 0..nodes.len() {
            let inputs: Vec<StreamPlan> =
                nodes[i].inputs.iter().map(|&j| plans[j].clone()).collect();
            let span = info_span!("plan", stage = %nodes[i].name);
            let _e = span.enter();
            match nodes[i].stage.plan(inputs.into()).into_result() {
                Ok(p) => plans.push(p),
                Err(e) => {
                    let err = run_error(&nodes[i], e);
                    for n in nodes.iter_mut() {
                        n.stage.abort();
                    }
                    return (nodes, Err(err));
                }
            }
        }
        (nodes, Ok(plans))
    })
    .await
    .expect("planning task panicked");
    let plans = plans?;
    nodes = nodes_back;

    // 2. Channels: one inbound channel per stage with inputs, shared by its input ports.
    let mut senders: Vec<Option<Sender<Envelope>>> = Vec::new();
    let mut receivers: Vec<Option<Receiver<Envelope>>> = Vec::new();
    for n in &nodes {
        if n.is_source() {
            senders.push(None);
            receivers.push(None);
        } else {
            let (tx, rx) = channel(opts.channel_capacity.max(1));
            senders.push(Some(tx));
            receivers.push(Some(rx));
        }
    }

    let budget = Budget::new(opts.memory_budget);
    let shared = Arc::new(Shared {
        budget: budget.clone(),
        first_error: Mutex::new(None),
    });
    let progress = Progress::new(opts.progress);

    // Ctrl-C cancels like an error: writers abort and remove their partial output.
    let interrupt = {
        let shared = shared.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shared.record(RunError::runtime(PluginError::new(
                    bridgeflow_sdk::ErrorKind::Cancelled,
                    "interrupted (Ctrl-C)",
                )));
            }
        })
    };

    // 3. One blocking task per stage.
    let mut handles = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let outs: Vec<(Sender<Envelope>, usize)> = node
            .consumers
            .iter()
            .map(|&(c, port)| (senders[c].clone().expect("consumer has a channel"), port))
            .collect();
        let rx = receivers[i].take();
        let expected = if node.is_source() {
            plans[i].total_bytes()
        } else {
            node.inputs.iter().map(|&j| plans[j].total_bytes()).sum()
        };
        let expected_items = if node.is_source() {
            plans[i].tensors.len()
        } else {
            node.inputs.iter().map(|&j| plans[j].tensors.len()).sum()
        };
        // Record streams are counted in rows (documents); their totals are not known up front.
        let rows = if node.is_source() {
            node.descriptor.outputs.first() == Some(&bridgeflow_sdk::PortType::Records)
        } else {
            node.descriptor.inputs.first() == Some(&bridgeflow_sdk::PortType::Records)
        };
        let bar = if rows {
            progress.rows_bar(&node.name)
        } else {
            progress.bar(&node.name, expected)
        };
        let shared = shared.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            drive(node, rx, outs, shared, bar, expected_items)
        }));
    }
    drop(senders);

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
    interrupt.abort();
    progress.clear();

    if let Some(e) = shared.first_error.lock().unwrap().take() {
        return Err(e);
    }
    if budget.is_cancelled() {
        return Err(RunError::runtime(PluginError::cancelled()));
    }
    Ok(RunReport {
        pipeline,
        stages: reports,
        budget: budget.limit(),
        peak_in_flight: budget.peak(),
        overdrafts: budget.overdrafts(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs one stage to completion. Returns its report, or None after recording an error.
fn drive(
    mut node: Node,
    rx: Option<Receiver<Envelope>>,
    outs: Vec<(Sender<Envelope>, usize)>,
    shared: Arc<Shared>,
    bar: indicatif::ProgressBar,
    expected_items: usize,
) -> Option<StageReport> {
    let span = info_span!("stage", name = %node.name, plugin = %node.plugin, kind = %node.kind);
    let _entered = span.enter();
    let started = Instant::now();
    let budget = shared.budget.clone();
    let is_source = node.is_source();
    let mut report = StageReport {
        name: node.name.clone(),
        plugin: node.plugin.clone(),
        kind: node.kind.to_string(),
        ..Default::default()
    };
    info!("started");

    let (mut items_out, mut bytes_out) = (0u64, 0u64);
    // Bytes this stage made that are still alive downstream (see Budget::account_downstream).
    let own_output = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut emit = |item: Item| -> Result<(), PluginError> {
        if budget.is_cancelled() {
            return Err(PluginError::cancelled());
        }
        let bytes = item.data_bytes();
        // Sources wait for room in the budget; downstream stages while their own output is alive.
        let (item, hold) = match item {
            Item::Tensor(mut t) => {
                t.data = if is_source {
                    budget.account(t.data, true)
                } else {
                    budget.account_downstream(t.data, &own_output)
                }
                .ok_or_else(PluginError::cancelled)?;
                (Item::Tensor(t), None)
            }
            Item::Records(r) => {
                let hold = budget
                    .hold(r.memory_bytes(), is_source)
                    .ok_or_else(PluginError::cancelled)?;
                (Item::Records(r), Some(Arc::new(hold)))
            }
        };
        items_out += 1;
        bytes_out += bytes;
        if is_source {
            match &item {
                Item::Records(r) => bar.inc(r.num_rows()),
                Item::Tensor(_) => {
                    bar.inc(bytes);
                    bar.set_message(format!("{items_out}/{expected_items} tensors"));
                }
            }
        }
        send_all(&budget, &outs, item, hold)
    };
    let is_cancelled = || shared.budget.is_cancelled();

    let mut rx = rx;
    let (mut items_in, mut bytes_in) = (0u64, 0u64);
    let result: Result<String, PluginError> =
        Emitter::scoped(&mut emit, Some(&is_cancelled), |em| {
            if is_source {
                node.stage.run(em).into_result()?;
            } else {
                let rx = rx.as_mut().expect("non-source has a channel");
                let mut open = node.inputs.len();
                while open > 0 {
                    if shared.budget.is_cancelled() {
                        return Err(PluginError::cancelled());
                    }
                    match rx.blocking_recv() {
                        Some(Envelope::Data { port, item, _hold }) => {
                            let b = item.data_bytes();
                            let rows = match &item {
                                Item::Records(r) => Some(r.num_rows()),
                                Item::Tensor(_) => None,
                            };
                            items_in += 1;
                            bytes_in += b;
                            shared.budget.set_busy(true);
                            shared.budget.item_received();
                            let r = node.stage.process(port as u32, item, em).into_result();
                            shared.budget.set_busy(false);
                            r?;
                            match rows {
                                Some(n) => bar.inc(n),
                                None => {
                                    bar.inc(b);
                                    bar.set_message(format!("{items_in}/{expected_items} tensors"));
                                }
                            }
                        }
                        Some(Envelope::End { port }) => {
                            shared.budget.set_busy(true);
                            shared.budget.item_received();
                            shared.budget.set_busy(false);
                            debug!(port, "input ended");
                            open -= 1;
                        }
                        // An upstream stage stopped without finishing: it failed or was
                        // cancelled, and reported that itself.
                        None => return Err(PluginError::cancelled()),
                    }
                }
            }
            if !is_source {
                shared.budget.set_busy(true);
            }
            let r = node.stage.finish(em).into_result().map(|s| s.to_string());
            if !is_source {
                shared.budget.set_busy(false);
            }
            r
        });
    drop(rx);

    report.items_in = items_in;
    report.bytes_in = bytes_in;
    report.items_out = items_out;
    report.bytes_out = bytes_out;
    report.seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(summary) => {
            for (tx, port) in &outs {
                // A consumer that already stopped has reported why.
                shared.budget.item_queued();
                if tx.blocking_send(Envelope::End { port: *port }).is_err() {
                    shared.budget.item_received();
                }
            }
            bar.finish();
            info!(
                items_in,
                items_out,
                bytes_out,
                seconds = report.seconds,
                "finished {summary}"
            );
            report.summary = summary;
            Some(report)
        }
        Err(e) => {
            node.stage.abort();
            bar.abandon();
            if e.is_cancelled() {
                debug!("cancelled");
            } else {
                tracing::error!("failed: {e}");
            }
            shared.fail(&node, e);
            None
        }
    }
}

fn send_all(
    budget: &Budget,
    outs: &[(Sender<Envelope>, usize)],
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
