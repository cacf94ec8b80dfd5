//! Validation and building: a parsed pipeline file becomes a checked graph of stage objects.
//!
//! Everything is checked before anything runs, and every problem is reported with its file,
//! stage and line: unknown plugins or kinds, unknown inputs or output ports, input counts,
//! cycles, mismatched port types, and bad configs (each plugin parses its own config when the
//! stage is created).
//!
//! An input names a stage (`map`: its first output port) or one of its ports (`train.metrics`).

use crate::error::{LocatedError, ValidationErrors};
use crate::host::PluginHost;
use crate::pipeline::{PipelineSpec, StageSpec};
use bridgeflow_sdk::{ErrorKind, PortType, StageBox, StageDescriptor, StageKind};
use std::collections::{BTreeMap, VecDeque};

/// An edge's upstream end: a node and one of its output ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    pub node: usize,
    pub port: usize,
}

/// A validated stage, ready to run.
pub struct Node {
    pub name: String,
    pub plugin: String,
    pub kind: StageKind,
    pub descriptor: StageDescriptor,
    /// The upstream end of each input port.
    pub inputs: Vec<Upstream>,
    /// Per output port: (downstream node, its input port) for every consumer.
    pub consumers: Vec<Vec<(usize, usize)>>,
    pub stage: StageBox,
    pub line: Option<usize>,
}

impl Node {
    pub fn is_source(&self) -> bool {
        self.descriptor.inputs.is_empty()
    }
    pub fn is_sink(&self) -> bool {
        self.descriptor.outputs.is_empty()
    }
}

/// A validated pipeline; nodes are in topological order.
pub struct Graph {
    pub spec: PipelineSpec,
    pub nodes: Vec<Node>,
}

/// Collects located problems while the checks run.
struct Problems<'a> {
    spec: &'a PipelineSpec,
    errors: Vec<LocatedError>,
}

impl Problems<'_> {
    fn at(&mut self, s: &StageSpec, message: String) {
        self.errors.push(LocatedError {
            file: self.spec.file.clone(),
            line: s.line,
            stage: Some(s.name.clone()),
            message,
        });
    }
}

type Resolved = Option<(StageKind, StageDescriptor)>;

pub fn build(spec: PipelineSpec, host: &PluginHost) -> Result<Graph, ValidationErrors> {
    let mut p = Problems {
        spec: &spec,
        errors: Vec::new(),
    };
    let resolved: Vec<Resolved> = spec
        .stages
        .iter()
        .map(|s| resolve(s, host, &mut p))
        .collect();
    let inputs = resolve_inputs(&spec, &resolved, &mut p);
    for (i, s) in spec.stages.iter().enumerate() {
        if let Some((_, d)) = &resolved[i] {
            check_input_count(s, d, &mut p);
            check_port_types(&spec, i, d, &inputs[i], &resolved, &mut p);
        }
    }
    let order = topological_order(&spec, &inputs, &mut p);
    let stages: Vec<Option<StageBox>> = spec
        .stages
        .iter()
        .zip(&resolved)
        .map(|(s, r)| r.as_ref().and_then(|(k, _)| create(s, *k, host, &mut p)))
        .collect();
    if !p.errors.is_empty() {
        return Err(ValidationErrors(p.errors));
    }
    let nodes = assemble(&spec, resolved, inputs, stages, &order);
    Ok(Graph { spec, nodes })
}

/// The stage's kind, plugin and descriptor.
fn resolve(s: &StageSpec, host: &PluginHost, p: &mut Problems<'_>) -> Resolved {
    let Some(kind) = StageKind::parse(&s.kind) else {
        let kinds: Vec<&str> = StageKind::ALL.iter().map(|k| k.name()).collect();
        p.at(
            s,
            format!(
                "unknown kind '{}' (expected one of: {})",
                s.kind,
                kinds.join(", ")
            ),
        );
        return None;
    };
    let Some(plugin) = host.plugin(&s.plugin) else {
        p.at(s, unknown_plugin(&s.plugin, host));
        return None;
    };
    match plugin.stage(kind) {
        Some(d) => Some((kind, d.clone())),
        None => {
            let kinds: Vec<&str> = plugin.kinds().iter().map(|k| k.name()).collect();
            p.at(
                s,
                format!(
                    "plugin '{}' has no {} stage (it provides: {})",
                    s.plugin,
                    kind,
                    kinds.join(", ")
                ),
            );
            None
        }
    }
}

fn unknown_plugin(name: &str, host: &PluginHost) -> String {
    let mut names: Vec<&str> = host.plugins.iter().map(|p| p.name()).collect();
    names.sort();
    let mut msg = format!(
        "unknown plugin '{name}' (available: {})",
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
    msg
}

/// Each stage's inputs as (stage index, output port); unknown stages and ports are reported.
fn resolve_inputs(
    spec: &PipelineSpec,
    resolved: &[Resolved],
    p: &mut Problems<'_>,
) -> Vec<Vec<Upstream>> {
    let index: BTreeMap<&str, usize> = spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let known = || index.keys().copied().collect::<Vec<_>>().join(", ");
    let mut all = Vec::with_capacity(spec.stages.len());
    for s in &spec.stages {
        let mut ins = Vec::new();
        for name in &s.inputs {
            match parse_input(name, &index) {
                Some((node, None)) => ins.push(Upstream { node, port: 0 }),
                Some((node, Some(port))) => match resolved[node].as_ref() {
                    Some((_, d)) => match d.output_index(port) {
                        Some(i) => ins.push(Upstream { node, port: i }),
                        None => p.at(s, unknown_port(name, port, d)),
                    },
                    // The upstream stage's own problem is reported; keep the edge for cycles.
                    None => ins.push(Upstream { node, port: 0 }),
                },
                None => p.at(s, format!("unknown input '{name}' (stages: {})", known())),
            }
        }
        all.push(ins);
    }
    all
}

/// `stage` or `stage.port` against the stage names (a stage whose name has a dot wins).
fn parse_input<'a>(
    name: &'a str,
    index: &BTreeMap<&str, usize>,
) -> Option<(usize, Option<&'a str>)> {
    if let Some(&i) = index.get(name) {
        return Some((i, None));
    }
    let (stage, port) = name.rsplit_once('.')?;
    index.get(stage).map(|&i| (i, Some(port)))
}

fn unknown_port(input: &str, port: &str, d: &StageDescriptor) -> String {
    let ports: Vec<&str> = d.outputs.iter().map(|o| o.name.as_str()).collect();
    if ports.is_empty() {
        return format!("input '{input}': that stage has no outputs");
    }
    format!(
        "input '{input}': no output port '{port}' (it has: {})",
        ports.join(", ")
    )
}

fn check_input_count(s: &StageSpec, d: &StageDescriptor, p: &mut Problems<'_>) {
    let want = d.inputs.len();
    let given = s.inputs.len();
    let least = want.saturating_sub(d.optional_inputs as usize);
    if (least..=want).contains(&given) {
        return;
    }
    let msg = if given < least {
        let types: Vec<&str> = d.inputs.iter().map(|t| t.name()).collect();
        format!(
            "missing input: {} {} takes {want} input{} ({}), {given} given",
            s.plugin,
            s.kind,
            if want == 1 { "" } else { "s" },
            types.join(", "),
        )
    } else {
        format!(
            "too many inputs: {} {} takes {want}, {given} given",
            s.plugin, s.kind
        )
    };
    p.at(s, msg);
}

/// Every edge into stage `i` joins ports of the same type.
fn check_port_types(
    spec: &PipelineSpec,
    i: usize,
    d: &StageDescriptor,
    inputs: &[Upstream],
    resolved: &[Resolved],
    p: &mut Problems<'_>,
) {
    let s = &spec.stages[i];
    for (port, up) in inputs.iter().enumerate() {
        let (Some((_, upd)), Some(&want)) = (&resolved[up.node], d.inputs.get(port)) else {
            continue;
        };
        let from = &spec.stages[up.node];
        match upd.outputs.get(up.port) {
            None => p.at(
                s,
                format!(
                    "input '{}' is a {} {} and has no output",
                    from.name, from.plugin, from.kind
                ),
            ),
            Some(out) if out.ty != want => p.at(s, type_mismatch(port, want, &from.name, upd, up)),
            _ => {}
        }
    }
}

fn type_mismatch(
    port: usize,
    want: PortType,
    from: &str,
    upd: &StageDescriptor,
    up: &Upstream,
) -> String {
    let out = &upd.outputs[up.port];
    let what = if upd.outputs.len() > 1 {
        format!("'{from}.{}'", out.name)
    } else {
        format!("'{from}'")
    };
    format!(
        "port type mismatch: input {port} expects {want}, but {what} outputs {}",
        out.ty
    )
}

/// Kahn's algorithm; stages left over are on or behind a cycle (reported).
fn topological_order(
    spec: &PipelineSpec,
    inputs: &[Vec<Upstream>],
    p: &mut Problems<'_>,
) -> Vec<usize> {
    let n = spec.stages.len();
    let mut indegree: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ins) in inputs.iter().enumerate() {
        for up in ins {
            downstream[up.node].push(i);
        }
    }
    let mut queue: VecDeque<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = queue.pop_front() {
        order.push(i);
        for &c in &downstream[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                queue.push_back(c);
            }
        }
    }
    if order.len() < n {
        let left: Vec<usize> = (0..n).filter(|i| !order.contains(i)).collect();
        let names: Vec<&str> = left.iter().map(|&i| spec.stages[i].name.as_str()).collect();
        p.at(
            &spec.stages[left[0]],
            format!("cycle among stages: {}", names.join(" -> ")),
        );
    }
    order
}

/// The stage object; each plugin parses its own config.
fn create(
    s: &StageSpec,
    kind: StageKind,
    host: &PluginHost,
    p: &mut Problems<'_>,
) -> Option<StageBox> {
    let plugin = host.plugin(&s.plugin)?;
    let json = match serde_json::to_string(&s.config) {
        Ok(j) => j,
        Err(e) => {
            p.at(s, format!("config cannot be converted: {e}"));
            return None;
        }
    };
    match host.create(plugin, kind, &json) {
        Ok(stage) => Some(stage),
        Err(e) => {
            let what = if e.kind == ErrorKind::Config {
                "bad config"
            } else {
                "cannot create stage"
            };
            p.at(s, format!("{what}: {}", e.message));
            None
        }
    }
}

/// The nodes in topological order, edges renumbered to match.
fn assemble(
    spec: &PipelineSpec,
    resolved: Vec<Resolved>,
    inputs: Vec<Vec<Upstream>>,
    stages: Vec<Option<StageBox>>,
    order: &[usize],
) -> Vec<Node> {
    let mut pos = vec![0; order.len()];
    for (k, &i) in order.iter().enumerate() {
        pos[i] = k;
    }
    let mut consumers: Vec<Vec<Vec<(usize, usize)>>> = resolved
        .iter()
        .map(|r| vec![Vec::new(); r.as_ref().map_or(0, |(_, d)| d.outputs.len())])
        .collect();
    for (i, ins) in inputs.iter().enumerate() {
        for (port, up) in ins.iter().enumerate() {
            consumers[up.node][up.port].push((pos[i], port));
        }
    }
    let mut resolved = resolved;
    let mut stages = stages;
    order
        .iter()
        .map(|&i| {
            let s = &spec.stages[i];
            let (kind, descriptor) = resolved[i].take().expect("validated");
            Node {
                name: s.name.clone(),
                plugin: s.plugin.clone(),
                kind,
                descriptor,
                inputs: inputs[i]
                    .iter()
                    .map(|u| Upstream {
                        node: pos[u.node],
                        port: u.port,
                    })
                    .collect(),
                consumers: std::mem::take(&mut consumers[i]),
                stage: stages[i].take().expect("validated"),
                line: s.line,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_name_a_stage_or_one_of_its_ports() {
        let index: BTreeMap<&str, usize> = [("read", 0), ("train", 1), ("a.b", 2)].into();
        assert_eq!(parse_input("read", &index), Some((0, None)));
        assert_eq!(
            parse_input("train.metrics", &index),
            Some((1, Some("metrics")))
        );
        assert_eq!(parse_input("a.b", &index), Some((2, None)));
        assert_eq!(parse_input("a.b.out", &index), Some((2, Some("out"))));
        assert_eq!(parse_input("nope.x", &index), None);
    }
}
