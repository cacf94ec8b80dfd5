//! All of a layer's experts fused in one HF tensor, reshuffled expert by expert (GPT-OSS):
//! `gate_up_proj` [E, in, 2·ffn] with gate and up interleaved by column ⇄ Megatron [E, 2·ffn,
//! in] as [gate; up] rows, its bias likewise, `down_proj` [E, a, b] ⇄ [E, b, a]. Each expert is
//! a copy the size of one expert; the tensor may arrive in blocks of whole experts (a
//! dequantizing stage's pieces), and each block goes out as it comes.

use super::{global_shape, hf_name, Geometry, Group, Layout, Parts, Routes};
use bridgeflow_megatron::mapping::{expert_block, expert_block_dims, Entry, Index, Kind};
use bridgeflow_sdk::{Buffer, Emitter, PluginError, Result, Tensor, TensorInfo};
use std::collections::HashMap;
use std::ops::Range;

/// The element order within each expert: one of the `experts-*` kinds.
#[derive(Debug, Clone, Copy)]
pub struct ExpertBlocks(pub Kind);

impl ExpertBlocks {
    /// The target shape for a source [E, ...]: the expert axis, then one expert's block.
    fn target_shape(&self, source: &[u64]) -> Vec<u64> {
        std::iter::once(source[0])
            .chain(expert_block_dims(self.0, &source[1..]))
            .collect()
    }

    /// Expert `x`'s piece of a tensor of `global` shape, named `name#x`.
    fn expert_piece(
        name: &str,
        dtype: bridgeflow_sdk::DType,
        global: &[u64],
        x: u64,
    ) -> TensorInfo {
        let mut at = vec![0; global.len()];
        at[0] = x;
        let mut shape = global.to_vec();
        shape[0] = 1;
        TensorInfo::new(format!("{name}#{x}"), dtype, &shape).with_shard(global, &at)
    }
}

/// Experts that arrive in blocks smaller than one expert (the torch_dist reader hands a large
/// layer's experts out as stored: each expert's gate and up halves). The reshuffle needs all
/// of an expert at once, so each expert's blocks are copied into one buffer until it is whole.
#[derive(Default)]
pub struct PartialExperts(HashMap<(String, u64), Partial>);

struct Partial {
    bytes: Vec<u8>,
    /// The byte ranges filled so far.
    have: Vec<Range<usize>>,
}

impl PartialExperts {
    /// `t` itself when it holds whole experts; else None until the expert it is part of is
    /// whole, then that expert, as the piece `name#x` of the tensor.
    pub fn whole(&mut self, t: Tensor) -> Result<Option<Tensor>> {
        let global = global_shape(&t.info);
        // Whole experts (or no expert axis at all, which the layout names).
        if t.info.shape.get(1..) == global.get(1..) {
            return Ok(Some(t));
        }
        let part_of_one = || {
            PluginError::shape(format!(
                "'{}' {} at {:?} of {global:?} is not one run of one expert's elements",
                t.name(),
                t.info.shape_string(),
                t.info.shard().map(|s| s.offsets.to_vec())
            ))
        };
        let offset = t.info.piece_offset().ok_or_else(part_of_one)?;
        let es = t.info.dtype.size() as u64;
        let per = global[1..].iter().product::<u64>();
        let (x, within) = (offset / per, (offset % per * es) as usize);
        let end = within + t.bytes().len();
        if t.info.shape[0] != 1 || end as u64 > per * es {
            return Err(part_of_one());
        }
        let base = t.info.base_name().to_string();
        let slot = self.0.entry((base.clone(), x)).or_insert_with(|| Partial {
            bytes: vec![0; (per * es) as usize],
            have: Vec::new(),
        });
        if slot.have.iter().any(|r| r.start < end && within < r.end) {
            return Err(PluginError::shape(format!(
                "'{}': pieces of expert {x} overlap",
                t.name()
            )));
        }
        slot.bytes[within..end].copy_from_slice(t.bytes());
        slot.have.push(within..end);
        if slot.have.iter().map(|r| r.len()).sum::<usize>() < slot.bytes.len() {
            return Ok(None);
        }
        let whole = self.0.remove(&(base.clone(), x)).expect("present").bytes;
        let info = ExpertBlocks::expert_piece(&base, t.info.dtype, &global, x);
        Ok(Some(Tensor::new(info, Buffer::from_vec(whole))?))
    }

    /// An error naming an expert that never got all its pieces.
    pub fn check_complete(&self) -> Result<()> {
        match self.0.keys().next() {
            Some((name, x)) => Err(PluginError::shape(format!(
                "'{name}': expert {x} never got all its pieces from the input"
            ))),
            None => Ok(()),
        }
    }
}

impl Layout for ExpertBlocks {
    fn needs_whole_experts(&self) -> bool {
        true
    }

    fn plan_to_megatron(
        &self,
        g: &Group,
        cx: &Geometry,
        routes: &mut Routes,
    ) -> Result<Vec<TensorInfo>> {
        let (first, name) = (g.first(), &g.name);
        if first.shape.len() < 2 {
            return Err(PluginError::shape(format!(
                "'{}': expected a tensor with a leading expert axis",
                first.name()
            )));
        }
        if g.blocks_of(first).len() > 1 && !cx.zero_copy {
            return Err(PluginError::config(format!(
                "'{name}' is made of HF tensors that arrive in pieces; whole tensors need them whole (zero_copy = true takes pieces)"
            )));
        }
        let global = self.target_shape(&first.shape);
        let out = if cx.zero_copy {
            (0..global[0])
                .map(|x| Self::expert_piece(name, first.dtype, &global, x))
                .collect()
        } else {
            vec![TensorInfo::new(name.clone(), first.dtype, &global)]
        };
        let target = TensorInfo::new(name.clone(), first.dtype, &global);
        for (block, _) in g.blocks_of(first) {
            routes.own.insert(block.clone(), (g.row, target.clone()));
        }
        Ok(out)
    }

    fn to_megatron(
        &self,
        _e: &Entry,
        cx: &Geometry,
        target: &TensorInfo,
        parts: Parts,
        out: &mut Emitter,
    ) -> Result<()> {
        let t = parts.into_values().next().expect("the HF tensor");
        let (name, global) = (target.name(), &target.shape);
        let es = t.info.dtype.size();
        let n = t.info.shape[0] as usize;
        let first = t.info.shard().map_or(0, |s| s.offsets[0]);
        let per = t.bytes().len() / n.max(1);
        let src_dims = &t.info.shape[1..];
        let mut whole = Vec::new();
        for x in 0..n {
            let block = &t.bytes()[x * per..(x + 1) * per];
            let b = expert_block(self.0, block, src_dims, es, true);
            t.data.discard(x * per..(x + 1) * per);
            if !cx.zero_copy {
                whole.extend_from_slice(&b);
                continue;
            }
            let info = Self::expert_piece(name, t.info.dtype, global, first + x as u64);
            out.tensor(Tensor::new(info, Buffer::from_vec(b))?)?;
        }
        if !cx.zero_copy {
            let info = TensorInfo::new(name, t.info.dtype, global);
            out.tensor(Tensor::new(info, Buffer::from_vec(whole))?)?;
        }
        Ok(())
    }

    fn plan_to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: &TensorInfo,
        _cx: &Geometry,
    ) -> Result<Vec<TensorInfo>> {
        let hf = self.target_shape(&global_shape(t));
        let name = hf_name(e, 0, idx.layer, None);
        Ok(vec![TensorInfo::new(name, t.dtype, &hf)])
    }

    fn to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: Tensor,
        _cx: &Geometry,
        out: &mut Emitter,
    ) -> Result<()> {
        // Expert by expert back to the HF layout: a whole tensor, or (from stored blocks) the
        // experts this block holds, each a piece of the HF tensor.
        let global = global_shape(&t.info);
        if t.info.shape[1..] != global[1..] {
            return Err(PluginError::shape(format!(
                "'{}' holds part of an expert; its experts are reshuffled whole",
                t.name()
            )));
        }
        let first = t.info.shard().map_or(0, |s| s.offsets[0]);
        let n = t.info.shape[0] as usize;
        let es = t.info.dtype.size();
        let per = t.bytes().len() / n.max(1);
        let dims = &global[1..];
        let hf = self.target_shape(&global);
        let hf_name = hf_name(e, 0, idx.layer, None);
        let blocks: Vec<Vec<u8>> = (0..n)
            .map(|x| expert_block(self.0, &t.bytes()[x * per..(x + 1) * per], dims, es, false))
            .collect();
        if t.info.shard().is_none() {
            let info = TensorInfo::new(hf_name, t.info.dtype, &hf);
            return out.tensor(Tensor::new(info, Buffer::from_vec(blocks.concat()))?);
        }
        for (x, b) in blocks.into_iter().enumerate() {
            let info = Self::expert_piece(&hf_name, t.info.dtype, &hf, first + x as u64);
            out.tensor(Tensor::new(info, Buffer::from_vec(b))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn entry(kind: Kind) -> Entry {
        Entry::new(
            kind,
            "decoder.layers.{l}.mlp.experts.linear_fc1.weight",
            &["model.layers.{l}.mlp.experts.gate_up_proj"],
        )
    }

    /// An expert's gate and up halves, in either order, become the expert once both are in;
    /// whole experts pass through; overlapping or missing pieces are named.
    #[test]
    fn partial_experts_are_gathered_whole() {
        let name = "decoder.layers.0.mlp.experts.linear_fc1.weight";
        let whole = tensor(name, &[2, 4, 3], 0);
        let half = |x: u64, row: u64| {
            let at = ((x * 4 + row) * 3) as usize;
            let mut t = tensor(&format!("{name}#{x}.{row}.0"), &[1, 2, 3], at as u8);
            t.info = t.info.with_shard(&[2, 4, 3], &[x, row, 0]);
            t
        };
        let mut g = PartialExperts::default();
        assert_eq!(
            g.whole(whole.clone()).unwrap().unwrap().bytes(),
            whole.bytes()
        );
        assert!(g.whole(half(1, 2)).unwrap().is_none());
        assert!(g
            .check_complete()
            .unwrap_err()
            .to_string()
            .contains("expert 1"));
        let e1 = g.whole(half(1, 0)).unwrap().unwrap();
        assert_eq!(e1.name(), format!("{name}#1"));
        assert_eq!(e1.info.shard().unwrap().offsets.to_vec(), vec![1, 0, 0]);
        assert_eq!(e1.bytes(), &whole.bytes()[12..]);
        g.check_complete().unwrap();
        assert!(g.whole(half(0, 0)).unwrap().is_none());
        let e = g.whole(half(0, 0)).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        // The reshuffle of a gathered expert equals that of the whole tensor's.
        let l = ExpertBlocks(Kind::ExpertsTransposed);
        let idx = Index {
            layer: Some(0),
            expert: None,
        };
        let ent = entry(Kind::ExpertsTransposed);
        let from_whole = collect(|out| l.to_hf(&ent, idx, whole.clone(), &geometry(), out));
        let from_e1 = collect(|out| l.to_hf(&ent, idx, e1, &geometry(), out));
        let per = from_whole[0].bytes().len() / 2;
        assert_eq!(from_e1[0].bytes(), &from_whole[0].bytes()[per..]);
    }

    #[test]
    fn every_order_both_ways_whole_and_by_expert() {
        let idx = Index {
            layer: Some(0),
            expert: None,
        };
        // Two experts of [in 2, 2·ffn 4] (or a 4-wide bias).
        for (kind, shape) in [
            (Kind::ExpertsGateUpInterleavedT, vec![2, 2, 4]),
            (Kind::ExpertsGateUpInterleaved, vec![2, 4]),
            (Kind::ExpertsTransposed, vec![2, 2, 4]),
        ] {
            let l = ExpertBlocks(kind);
            let e = entry(kind);
            let hf = tensor("model.layers.0.mlp.experts.gate_up_proj", &shape, 0);
            let per = hf.bytes().len() / 2;
            let want: Vec<u8> = (0..2)
                .flat_map(|x| {
                    let b = &hf.bytes()[x * per..(x + 1) * per];
                    expert_block(kind, b, &shape[1..], 1, true)
                })
                .collect();
            for zero_copy in [true, false] {
                let cx = Geometry {
                    zero_copy,
                    ..geometry()
                };
                let (planned, routes) =
                    plan_import(&l, &e, std::slice::from_ref(&hf.info), None, &cx).unwrap();
                assert_eq!(planned.len(), if zero_copy { 2 } else { 1 }, "{kind:?}");
                let got = run_import(&l, &e, &routes, vec![((0, 0), hf.clone())], &cx);
                let meg = &placed(&got)["decoder.layers.0.mlp.experts.linear_fc1.weight"];
                assert_eq!(meg, &want, "{kind:?}");
                // And back, whole and as a stored block of expert 1.
                let global = planned[0]
                    .shard()
                    .map_or(planned[0].shape.to_vec(), |s| s.global_shape.to_vec());
                let t = Tensor::new(
                    TensorInfo::new(
                        "decoder.layers.0.mlp.experts.linear_fc1.weight",
                        hf.info.dtype,
                        &global,
                    ),
                    Buffer::from_vec(meg.clone()),
                )
                .unwrap();
                let plan = l.plan_to_hf(&e, idx, &t.info, &cx).unwrap();
                assert_eq!(plan[0].shape, hf.info.shape, "{kind:?}");
                let back = collect(|out| l.to_hf(&e, idx, t, &cx, out));
                assert_eq!(back[0].bytes(), hf.bytes(), "{kind:?}");
            }
            let cx = geometry();
            let mut one = global_shape(&hf.info);
            one = l.target_shape(&one);
            let mut shape1 = one.clone();
            shape1[0] = 1;
            let mut at = vec![0; one.len()];
            at[0] = 1;
            let block = Tensor::new(
                TensorInfo::new(
                    "decoder.layers.0.mlp.experts.linear_fc1.weight#1",
                    hf.info.dtype,
                    &shape1,
                )
                .with_shard(&one, &at),
                Buffer::from_vec(want[per..].to_vec()),
            )
            .unwrap();
            let back = collect(|out| l.to_hf(&e, idx, block, &cx, out));
            assert_eq!(back[0].name(), "model.layers.0.mlp.experts.gate_up_proj#1");
            assert_eq!(back[0].bytes(), &hf.bytes()[per..], "{kind:?}");
        }
    }

    #[test]
    fn a_tensor_without_an_expert_axis_is_named() {
        let l = ExpertBlocks(Kind::ExpertsTransposed);
        let e = entry(Kind::ExpertsTransposed);
        let flat = TensorInfo::new(
            "model.layers.0.mlp.experts.gate_up_proj",
            bridgeflow_sdk::DType::U8,
            &[4],
        );
        let err = plan_import(&l, &e, &[flat], None, &geometry()).unwrap_err();
        assert!(
            err.message.contains("leading expert axis"),
            "{}",
            err.message
        );
    }
}
