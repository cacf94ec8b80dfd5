//! What a stage declares about itself beyond its ports' types, so the host can wire it without
//! knowing the plugin: named output ports, whether it keeps its inputs, the command-line
//! endpoints it serves (`hf:DIR`), the name worlds it translates between, the quantization
//! methods it undoes.
//!
//! Plugin authors write the `&'static` forms ([`Port`], [`Endpoint`], [`Translation`]) as
//! constants of their stage trait; the registry turns them into the ABI-stable forms
//! ([`OutputPort`], [`EndpointDecl`], [`TranslationDecl`]) in the [`crate::StageDescriptor`].

use crate::PortType;
use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// The name a stage's only output port gets when it declares none.
pub const DEFAULT_PORT: &str = "out";

/// A named output port, as a stage trait declares it.
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub name: &'static str,
    pub ty: PortType,
}

impl Port {
    pub const fn tensors(name: &'static str) -> Port {
        Port {
            name,
            ty: PortType::Tensors,
        }
    }
    pub const fn records(name: &'static str) -> Port {
        Port {
            name,
            ty: PortType::Records,
        }
    }
}

/// A named output port in a descriptor. Pipeline files address it as `stage.port`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct OutputPort {
    pub name: RString,
    pub ty: PortType,
}

/// The output ports a stage declares: `ports`, or one [`DEFAULT_PORT`] of type `single`.
pub(crate) fn output_ports(ports: &[Port], single: PortType) -> RVec<OutputPort> {
    if ports.is_empty() {
        return vec![OutputPort {
            name: DEFAULT_PORT.into(),
            ty: single,
        }]
        .into();
    }
    ports
        .iter()
        .map(|p| OutputPort {
            name: p.name.into(),
            ty: p.ty,
        })
        .collect()
}

/// A location scheme a reader or writer serves on the command line: `bridgeflow convert --from
/// hf:DIR` picks the reader declaring `hf`, `--to megatron:DIR` the writer declaring `megatron`.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub scheme: &'static str,
    /// Other spellings (`mcore` for `megatron`).
    pub aliases: &'static [&'static str],
    /// The tensor names the stream carries ("hf", "megatron"): when the two sides of a
    /// conversion differ, a stage declaring a [`Translation`] between them goes in between.
    /// "hf-model" is HF names known to be a whole model of their config (every tensor there,
    /// none extra, each its shape): what the exporters take, so that files read straight from
    /// disk pass the models plugin's check on their way.
    pub naming: &'static str,
    /// Config keys (a JSON object) the stage gets besides `path` when convert uses it (a reader
    /// streaming layer by layer, say).
    pub config: &'static str,
    /// Convert's options this stage takes, as `flag` (the config key of the same name) or
    /// `flag=key`: `tp`, `pp`, `vpp`, `ep`, `hf_config`, `overwrite`.
    pub options: &'static [&'static str],
    pub description: &'static str,
    /// An exporter's endpoint (declared by a transform, not a writer): the scheme of the writer
    /// that stores what the exporter emits (`hf`: the safetensors writer); empty otherwise.
    pub through: &'static str,
}

impl Endpoint {
    /// A scheme with no aliases, no extra config and no options.
    pub const fn new(
        scheme: &'static str,
        naming: &'static str,
        description: &'static str,
    ) -> Self {
        Endpoint {
            scheme,
            aliases: &[],
            naming,
            config: "{}",
            options: &[],
            description,
            through: "",
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct EndpointDecl {
    pub scheme: RString,
    pub aliases: RVec<RString>,
    pub naming: RString,
    pub config: RString,
    pub options: RVec<RString>,
    pub description: RString,
    /// See [`Endpoint::through`].
    pub through: RString,
}

impl EndpointDecl {
    /// True for the scheme or one of its aliases.
    pub fn answers(&self, scheme: &str) -> bool {
        self.scheme == scheme || self.aliases.iter().any(|a| a == scheme)
    }
}

impl From<&Endpoint> for EndpointDecl {
    fn from(e: &Endpoint) -> Self {
        EndpointDecl {
            scheme: e.scheme.into(),
            aliases: e.aliases.iter().map(|&a| RString::from(a)).collect(),
            naming: e.naming.into(),
            config: e.config.into(),
            options: e.options.iter().map(|&o| RString::from(o)).collect(),
            description: e.description.into(),
            through: e.through.into(),
        }
    }
}

/// A transform that turns a stream in one naming into another (the model mapper: `hf` to
/// `megatron` and back), with the config that selects the direction.
#[derive(Clone, Copy, Debug)]
pub struct Translation {
    pub from: &'static str,
    pub to: &'static str,
    /// Config keys (a JSON object) that select this direction.
    pub config: &'static str,
    /// Convert's options it takes, as in [`Endpoint::options`].
    pub options: &'static [&'static str],
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TranslationDecl {
    pub from: RString,
    pub to: RString,
    pub config: RString,
    pub options: RVec<RString>,
}

impl From<&Translation> for TranslationDecl {
    fn from(t: &Translation) -> Self {
        TranslationDecl {
            from: t.from.into(),
            to: t.to.into(),
            config: t.config.into(),
            options: t.options.iter().map(|&o| RString::from(o)).collect(),
        }
    }
}

/// `flag` or `flag=key` (see [`Endpoint::options`]): the config key `flag` goes to, if the
/// declaration names it.
pub fn option_key<'a>(options: &'a [RString], flag: &str) -> Option<&'a str> {
    options.iter().find_map(|o| match o.split_once('=') {
        Some((f, key)) if f == flag => Some(key),
        None if o == flag => Some(o.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_default_port_unless_declared() {
        let single = output_ports(&[], PortType::Records);
        assert_eq!(single.len(), 1);
        assert_eq!(
            (single[0].name.as_str(), single[0].ty),
            ("out", PortType::Records)
        );
        let two = output_ports(
            &[Port::tensors("weights"), Port::records("metrics")],
            PortType::Tensors,
        );
        let names: Vec<&str> = two.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["weights", "metrics"]);
    }

    #[test]
    fn options_map_flags_to_keys() {
        let opts: Vec<RString> = vec!["tp=tensor_parallel".into(), "pp".into()];
        assert_eq!(option_key(&opts, "tp"), Some("tensor_parallel"));
        assert_eq!(option_key(&opts, "pp"), Some("pp"));
        assert_eq!(option_key(&opts, "ep"), None);
    }

    #[test]
    fn aliases_answer() {
        let d = EndpointDecl::from(&Endpoint {
            aliases: &["mcore"],
            ..Endpoint::new("megatron", "megatron", "torch_dist")
        });
        assert!(d.answers("megatron") && d.answers("mcore") && !d.answers("hf"));
    }
}
