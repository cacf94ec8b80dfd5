//! `verify` (two streams) and `verify-manifest` (a stream against a manifest). Both forward
//! their first input unchanged, so they can sit before a writer or end a pipeline, and both fail
//! the run with every mismatch named when the streams end.

use bridgeflow_sdk::manifest::Manifest;
use bridgeflow_sdk::numeric::max_abs_diff;
use bridgeflow_sdk::{
    schemars, serde, Emitter, Item, PluginError, PortType, Result, StreamPlan, Tensor, Transform,
};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct VerifyConfig {
    /// Largest accepted |a - b| per element; 0 (default) demands identical dtype, shape and
    /// bytes.
    #[serde(default)]
    pub tolerance: f64,
    /// Write a per-tensor JSON report here.
    #[serde(default)]
    pub report: Option<PathBuf>,
    /// Accept tensors present in only one stream (default false).
    #[serde(default)]
    pub allow_missing: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(crate = "bridgeflow_sdk::serde")]
struct Outcome {
    name: String,
    status: &'static str,
    max_abs_diff: f64,
    detail: String,
}

#[derive(Default)]
struct Tally {
    outcomes: Vec<Outcome>,
}

impl Tally {
    fn summary(&self) -> String {
        let count = |st: &str| self.outcomes.iter().filter(|o| o.status == st).count();
        let worst = self
            .outcomes
            .iter()
            .filter(|o| o.status == "close")
            .map(|o| o.max_abs_diff)
            .fold(0f64, f64::max);
        let mut s = format!("{} tensors: {} exact", self.outcomes.len(), count("exact"));
        if count("close") > 0 {
            s.push_str(&format!(
                ", {} within tolerance (max abs diff {worst:e})",
                count("close")
            ));
        }
        if count("unpaired") > 0 {
            s.push_str(&format!(", {} unpaired", count("unpaired")));
        }
        s
    }

    fn push(&mut self, name: &str, status: &'static str, diff: f64, detail: String) {
        self.outcomes.push(Outcome {
            name: name.to_string(),
            status,
            max_abs_diff: diff,
            detail,
        });
    }

    fn finish(&self, report: &Option<PathBuf>, what: &str) -> Result<()> {
        if let Some(p) = report {
            let text = serde_json::to_string_pretty(&self.outcomes).expect("json");
            std::fs::write(p, text).map_err(|e| PluginError::io(p, "cannot write", e))?;
        }
        let failed: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.status == "mismatch" || o.status == "missing")
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "{} of {} tensors failed {what}:",
            failed.len(),
            self.outcomes.len()
        );
        for o in failed.iter().take(10) {
            msg.push_str(&format!("\n    {}: {}", o.name, o.detail));
        }
        if failed.len() > 10 {
            msg.push_str(&format!("\n    ... and {} more", failed.len() - 10));
        }
        Err(PluginError::mismatch(msg))
    }
}

pub struct Verify {
    tolerance: f64,
    report: Option<PathBuf>,
    allow_missing: bool,
    pending: [HashMap<String, Tensor>; 2],
    tally: Tally,
}

/// Runs `f` over matching windows of two tensors' elements, telling each buffer's owner after
/// each window that it is done with those bytes: a tensor larger than memory (a memory-mapped
/// one) is then never resident whole. Reading again after a discard is allowed (the pages come
/// back from the file).
fn in_windows(a: &Tensor, b: &Tensor, mut f: impl FnMut(&[u8], &[u8])) {
    const WINDOW: usize = 4 << 20; // elements
    let (sa, sb) = (a.info.dtype.size(), b.info.dtype.size());
    let n = a.bytes().len() / sa;
    let mut i = 0;
    while i < n {
        let j = (i + WINDOW).min(n);
        f(&a.bytes()[i * sa..j * sa], &b.bytes()[i * sb..j * sb]);
        a.data.discard(i * sa..j * sa);
        b.data.discard(i * sb..j * sb);
        i = j;
    }
}

/// The largest |a - b| over two tensors of one shape, window by window.
fn windowed_max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let mut m = 0.0f64;
    in_windows(a, b, |x, y| {
        m = m.max(max_abs_diff(a.info.dtype, x, b.info.dtype, y));
    });
    m
}

impl Verify {
    fn compare(&mut self, a: &Tensor, b: &Tensor) {
        let name = a.name();
        if a.info.shape != b.info.shape {
            self.tally.push(
                name,
                "mismatch",
                f64::INFINITY,
                format!(
                    "shape {} vs {}",
                    a.info.shape_string(),
                    b.info.shape_string()
                ),
            );
            return;
        }
        if a.info.dtype == b.info.dtype && a.bytes().len() == b.bytes().len() {
            let mut same = true;
            in_windows(a, b, |x, y| same &= x == y);
            if same {
                self.tally.push(name, "exact", 0.0, String::new());
                return;
            }
        }
        if self.tolerance == 0.0 {
            let diff = if a.info.dtype.is_float() && b.info.dtype.is_float() {
                windowed_max_abs_diff(a, b)
            } else {
                f64::NAN
            };
            self.tally.push(
                name,
                "mismatch",
                diff,
                format!(
                    "not identical ({} vs {}, max abs diff {diff:e})",
                    a.info.dtype, b.info.dtype
                ),
            );
            return;
        }
        let diff = windowed_max_abs_diff(a, b);
        if diff <= self.tolerance {
            self.tally
                .push(name, "close", diff, format!("max abs diff {diff:e}"));
        } else {
            self.tally.push(
                name,
                "mismatch",
                diff,
                format!("max abs diff {diff:e} > tolerance {:e}", self.tolerance),
            );
        }
    }
}

impl Transform for Verify {
    type Config = VerifyConfig;
    const DESCRIPTION: &'static str =
        "Compares two tensor streams by name (exact or within a tolerance); forwards the first";
    const INPUTS: &'static [PortType] = &[PortType::Tensors, PortType::Tensors];

    fn new(c: VerifyConfig) -> Result<Self> {
        if c.tolerance.is_nan() || c.tolerance < 0.0 {
            return Err(PluginError::config("tolerance must be >= 0"));
        }
        Ok(Verify {
            tolerance: c.tolerance,
            report: c.report,
            allow_missing: c.allow_missing,
            pending: [HashMap::new(), HashMap::new()],
            tally: Tally::default(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        Ok(inputs[0].clone())
    }

    fn process(&mut self, port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        let other = 1 - port.min(1);
        match self.pending[other].remove(t.name()) {
            Some(o) => {
                let (a, b) = if port == 0 { (&t, &o) } else { (&o, &t) };
                self.compare(a, b);
            }
            None => {
                // Held until its counterpart arrives (counted by the host's memory budget).
                self.pending[port.min(1)].insert(t.name().to_string(), t.clone());
            }
        }
        if port == 0 {
            out.tensor(t)?;
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        for (side, label) in [(0usize, "first"), (1, "second")] {
            let mut names: Vec<String> = self.pending[side].keys().cloned().collect();
            names.sort();
            for n in names {
                let status = if self.allow_missing {
                    "unpaired"
                } else {
                    "missing"
                };
                self.tally
                    .push(&n, status, f64::NAN, format!("only in the {label} stream"));
            }
            self.pending[side].clear();
        }
        self.tally.finish(&self.report, "verification")
    }

    fn summary(&mut self) -> String {
        self.tally.summary()
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct VerifyManifestConfig {
    /// The manifest to check against (as written by `checksum` or a writer).
    pub manifest: PathBuf,
    /// Write a per-tensor JSON report here.
    #[serde(default)]
    pub report: Option<PathBuf>,
}

pub struct VerifyManifest {
    path: PathBuf,
    manifest: Option<Manifest>,
    seen: std::collections::BTreeSet<String>,
    report: Option<PathBuf>,
    tally: Tally,
}

impl Transform for VerifyManifest {
    type Config = VerifyManifestConfig;
    const DESCRIPTION: &'static str =
        "Checks every tensor against a blake3 manifest; forwards the stream";

    fn new(c: VerifyManifestConfig) -> Result<Self> {
        Ok(VerifyManifest {
            path: c.manifest,
            manifest: None,
            seen: Default::default(),
            report: c.report,
            tally: Tally::default(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        self.manifest = Some(Manifest::load(&self.path)?);
        Ok(inputs[0].clone())
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        let m = self.manifest.as_ref().expect("planned");
        match m.check(&t.info, t.bytes()) {
            Ok(()) => self.tally.push(t.name(), "exact", 0.0, String::new()),
            Err(msg) => self.tally.push(t.name(), "mismatch", f64::NAN, msg),
        }
        self.seen.insert(t.name().to_string());
        out.tensor(t)
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        let m = self.manifest.as_ref().expect("planned");
        for name in m.tensors.keys() {
            if !self.seen.contains(name) {
                self.tally.push(
                    name,
                    "missing",
                    f64::NAN,
                    format!(
                        "in the manifest {} but not in the stream",
                        self.path.display()
                    ),
                );
            }
        }
        self.tally.finish(&self.report, "the manifest check")
    }

    fn summary(&mut self) -> String {
        self.tally.summary()
    }
}
