//! `rename` and `filter`: name-based stream edits.

use bridgeflow_sdk::{schemars, serde, Emitter, Item, PluginError, Result, StreamPlan, Transform};
use regex::Regex;
use std::collections::HashMap;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct RenameRule {
    /// Regular expression matched against the tensor name.
    pub pattern: String,
    /// Replacement; `$1`, `${name}` refer to capture groups.
    pub replace: String,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct RenameConfig {
    /// Applied in order, each to the result of the previous.
    pub rules: Vec<RenameRule>,
}

pub struct Rename {
    rules: Vec<(Regex, String)>,
    map: HashMap<String, String>,
}

fn compile(field: &str, p: &str) -> Result<Regex> {
    Regex::new(p).map_err(|e| PluginError::config(format!("{field} \"{p}\": {e}")))
}

impl Rename {
    fn apply(&self, name: &str) -> String {
        let mut n = name.to_string();
        for (re, rep) in &self.rules {
            n = re.replace_all(&n, rep.as_str()).into_owned();
        }
        n
    }
}

impl Transform for Rename {
    type Config = RenameConfig;
    const DESCRIPTION: &'static str = "Renames tensors with regular expressions";

    fn new(c: RenameConfig) -> Result<Self> {
        let rules = c
            .rules
            .iter()
            .map(|r| Ok((compile("pattern", &r.pattern)?, r.replace.clone())))
            .collect::<Result<_>>()?;
        Ok(Rename {
            rules,
            map: HashMap::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let mut plan = inputs[0].clone();
        let mut seen: HashMap<String, String> = HashMap::new();
        for t in plan.tensors.iter_mut() {
            let new = self.apply(t.name());
            if let Some(prev) = seen.insert(new.clone(), t.name().to_string()) {
                return Err(PluginError::config(format!(
                    "rename maps both '{prev}' and '{}' to '{new}'",
                    t.name()
                )));
            }
            self.map.insert(t.name().to_string(), new.clone());
            *t = t.clone().with_name(new);
        }
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let mut t = item.into_tensor()?;
        let new = match self.map.get(t.name()) {
            Some(n) => n.clone(),
            None => self.apply(t.name()),
        };
        t.info = t.info.with_name(new);
        out.tensor(t)
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct FilterConfig {
    /// Keep only tensors matching one of these regular expressions (default: all).
    #[serde(default)]
    pub include: Vec<String>,
    /// Drop tensors matching any of these.
    #[serde(default)]
    pub exclude: Vec<String>,
}

pub struct Filter {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
}

impl Filter {
    fn keeps(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
            && !self.exclude.iter().any(|r| r.is_match(name))
    }
}

impl Transform for Filter {
    type Config = FilterConfig;
    const DESCRIPTION: &'static str = "Keeps or drops tensors by name pattern";

    fn new(c: FilterConfig) -> Result<Self> {
        Ok(Filter {
            include: c
                .include
                .iter()
                .map(|p| compile("include", p))
                .collect::<Result<_>>()?,
            exclude: c
                .exclude
                .iter()
                .map(|p| compile("exclude", p))
                .collect::<Result<_>>()?,
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let mut plan = inputs[0].clone();
        let before = plan.tensors.len();
        plan.tensors = plan
            .tensors
            .iter()
            .filter(|t| self.keeps(t.name()))
            .cloned()
            .collect();
        if before > 0 && plan.tensors.is_empty() {
            return Err(PluginError::config(format!(
                "the filter drops all {before} tensors"
            )));
        }
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if self.keeps(t.name()) {
            out.tensor(t)?;
        }
        Ok(())
    }
}
