//! Validation and building: a parsed pipeline file becomes a checked graph of stage objects.
//!
//! Everything is checked before anything runs, and every problem is reported with its file,
//! stage and line: unknown plugins or kinds, unknown or missing inputs, cycles, mismatched port
//! types, and bad configs (each plugin parses its own config when the stage is created).

use crate::error::{LocatedError, ValidationErrors};
use crate::host::PluginHost;
use crate::pipeline::{PipelineSpec, StageSpec};
use bridgeflow_sdk::{ErrorKind, StageBox, StageDescriptor, StageKind};
use std::collections::{BTreeMap, VecDeque};

/// A validated stage, ready to run.
pub struct Node {
    pub name: String,
    pub plugin: String,
    pub kind: StageKind,
    pub descriptor: StageDescriptor,
    /// Upstream node index per input port.
    pub inputs: Vec<usize>,
    /// (downstream node, its port) for every consumer of this node's output.
    pub consumers: Vec<(usize, usize)>,
    pub stage: StageBox,
    pub line: Option<usize>,
}

impl Node {
    pub fn is_source(&self) -> bool {
        self.descriptor.inputs.is_empty()
    }
}

/// A validated pipeline; nodes are in topological order.
pub struct Graph {
    pub spec: PipelineSpec,
    pub nodes: Vec<Node>,
}

pub fn build(spec: PipelineSpec, host: &PluginHost) -> Result<Graph, ValidationErrors> {
    let mut errors = Vec::new();
    let err = |s: &StageSpec, message: String| LocatedError {
        file: spec.file.clone(),
        line: s.line,
        stage: Some(s.name.clone()),
        message,
    };

    let index: BTreeMap<&str, usize> = spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();

    // Per stage: resolve kind, plugin and descriptor.
    let mut resolved: Vec<Option<(StageKind, StageDescriptor)>> = Vec::new();
    for s in &spec.stages {
        let Some(kind) = StageKind::parse(&s.kind) else {
            let kinds: Vec<&str> = StageKind::ALL.iter().map(|k| k.name()).collect();
            errors.push(err(
                s,
                format!(
                    "unknown kind '{}' (expected one of: {})",
                    s.kind,
                    kinds.join(", ")
                ),
            ));
            resolved.push(None);
            continue;
        };
        let Some(plugin) = host.plugin(&s.plugin) else {
            let mut names: Vec<&str> = host.plugins.iter().map(|p| p.name()).collect();
            names.sort();
            let mut msg = format!(
                "unknown plugin '{}' (available: {})",
                s.plugin,
                if names.is_empty() {
                    "none found".to_string()
                } else {
                    names.join(", ")
                }
            );
            if !host.refused.is_empty() {
                msg.push_str(&format!("; refused libraries: {}", host.refused_summary()));
            }
            if host.plugins.is_empty() {
                let dirs: Vec<String> = host
                    .search_path
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                msg.push_str(&format!(
                    "; searched: {} (build plugins with `cargo build --workspace`, or set BRIDGEFLOW_PLUGIN_PATH)",
                    dirs.join(", ")
                ));
            }
            errors.push(err(s, msg));
            resolved.push(None);
            continue;
        };
        match plugin.stage(kind) {
            Some(d) => resolved.push(Some((kind, d.clone()))),
            None => {
                let kinds: Vec<&str> = plugin.kinds().iter().map(|k| k.name()).collect();
                errors.push(err(
                    s,
                    format!(
                        "plugin '{}' has no {} stage (it provides: {})",
                        s.plugin,
                        kind,
                        kinds.join(", ")
                    ),
                ));
                resolved.push(None);
            }
        }
    }

    // Inputs: known names and the right count.
    let mut inputs: Vec<Vec<usize>> = vec![Vec::new(); spec.stages.len()];
    for (i, s) in spec.stages.iter().enumerate() {
        for name in &s.inputs {
            match index.get(name.as_str()) {
                Some(&j) => inputs[i].push(j),
                None => errors.push(err(
                    s,
                    format!(
                        "unknown input '{name}' (stages: {})",
                        index.keys().copied().collect::<Vec<_>>().join(", ")
                    ),
                )),
            }
        }
        if let Some((_, d)) = &resolved[i] {
            let want = d.inputs.len();
            if s.inputs.len() != want {
                let msg = if s.inputs.len() < want {
                    format!(
                        "missing input: {} {} takes {want} input{} ({}), {} given",
                        s.plugin,
                        s.kind,
                        if want == 1 { "" } else { "s" },
                        d.inputs
                            .iter()
                            .map(|p| p.name())
                            .collect::<Vec<_>>()
                            .join(", "),
                        s.inputs.len()
                    )
                } else {
                    format!(
                        "too many inputs: {} {} takes {want}, {} given",
                        s.plugin,
                        s.kind,
                        s.inputs.len()
                    )
                };
                errors.push(err(s, msg));
            }
        }
    }

    // Cycles (Kahn's algorithm); stages left over are on or behind a cycle.
    let n = spec.stages.len();
    let mut indegree: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let mut consumers: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
    for (i, ins) in inputs.iter().enumerate() {
        for (port, &j) in ins.iter().enumerate() {
            consumers[j].push((i, port));
        }
    }
    let mut queue: VecDeque<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = queue.pop_front() {
        order.push(i);
        for &(c, _) in &consumers[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                queue.push_back(c);
            }
        }
    }
    if order.len() < n {
        let cyclic: Vec<&str> = (0..n)
            .filter(|i| !order.contains(i))
            .map(|i| spec.stages[i].name.as_str())
            .collect();
        let first = &spec.stages[(0..n).find(|i| !order.contains(i)).unwrap()];
        errors.push(err(
            first,
            format!("cycle among stages: {}", cyclic.join(" -> ")),
        ));
    }

    // Port types along every edge.
    for (i, s) in spec.stages.iter().enumerate() {
        let Some((_, d)) = &resolved[i] else { continue };
        for (port, &j) in inputs[i].iter().enumerate() {
            let Some((_, up)) = &resolved[j] else {
                continue;
            };
            let Some(&want) = d.inputs.get(port) else {
                continue;
            };
            match up.outputs.first() {
                None => errors.push(err(
                    s,
                    format!(
                        "input '{}' is a {} {} and has no output",
                        spec.stages[j].name, spec.stages[j].plugin, spec.stages[j].kind
                    ),
                )),
                Some(&got) if got != want => errors.push(err(
                    s,
                    format!(
                        "port type mismatch: input {port} expects {want}, but '{}' outputs {got}",
                        spec.stages[j].name
                    ),
                )),
                _ => {}
            }
        }
    }

    // Configs: each plugin parses its own.
    let mut stages: Vec<Option<StageBox>> = Vec::new();
    for (i, s) in spec.stages.iter().enumerate() {
        let Some((kind, _)) = &resolved[i] else {
            stages.push(None);
            continue;
        };
        let plugin = host.plugin(&s.plugin).expect("resolved above");
        let json = match serde_json::to_string(&s.config) {
            Ok(j) => j,
            Err(e) => {
                errors.push(err(s, format!("config cannot be converted: {e}")));
                stages.push(None);
                continue;
            }
        };
        match host.create(plugin, *kind, &json) {
            Ok(stage) => stages.push(Some(stage)),
            Err(e) => {
                let what = if e.kind == ErrorKind::Config {
                    "bad config"
                } else {
                    "cannot create stage"
                };
                errors.push(err(s, format!("{what}: {}", e.message)));
                stages.push(None);
            }
        }
    }

    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }

    // Renumber into topological order.
    let pos: Vec<usize> = {
        let mut p = vec![0; n];
        for (k, &i) in order.iter().enumerate() {
            p[i] = k;
        }
        p
    };
    let mut slots: Vec<Option<StageBox>> = stages;
    let nodes = order
        .iter()
        .map(|&i| {
            let s = &spec.stages[i];
            let (kind, descriptor) = resolved[i].clone().expect("validated");
            Node {
                name: s.name.clone(),
                plugin: s.plugin.clone(),
                kind,
                descriptor,
                inputs: inputs[i].iter().map(|&j| pos[j]).collect(),
                consumers: consumers[i].iter().map(|&(c, p)| (pos[c], p)).collect(),
                stage: slots[i].take().expect("validated"),
                line: s.line,
            }
        })
        .collect();
    Ok(Graph { spec, nodes })
}
