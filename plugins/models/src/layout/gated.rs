//! SwiGLU's `linear_fc1`: gate and up concatenated by rows, [gate; up] (Megatron-Bridge's
//! `GatedMLPMapping`). Under tensor parallelism each rank holds its half of each, which the
//! torch_dist writer places as chunks of these rows.

use super::rows::{self, Rows};
use super::{Geometry, Group, Layout, Parts, Routes};
use bridgeflow_megatron::mapping::{row_segments, Entry, Index, Kind, RowSegment};
use bridgeflow_sdk::{Emitter, Result, Tensor, TensorInfo};

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct GatedMlp;

impl Rows for GatedMlp {
    fn segments(&self, fused: u64, cx: &Geometry) -> Result<(Vec<u64>, Vec<RowSegment>)> {
        row_segments(Kind::GatedMlp, fused, cx.heads, cx.vocab)
    }
}

impl Layout for GatedMlp {
    fn parts(&self) -> usize {
        2
    }

    fn plan_to_megatron(
        &self,
        g: &Group,
        cx: &Geometry,
        routes: &mut Routes,
    ) -> Result<Vec<TensorInfo>> {
        rows::plan_to_megatron(self, g, cx, routes)
    }

    fn to_megatron(
        &self,
        e: &Entry,
        cx: &Geometry,
        target: &TensorInfo,
        parts: Parts,
        out: &mut Emitter,
    ) -> Result<()> {
        rows::assemble(self, cx, target, e.per_expert(), parts, out)
    }

    fn plan_to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: &TensorInfo,
        cx: &Geometry,
    ) -> Result<Vec<TensorInfo>> {
        rows::plan_to_hf(self, e, idx, t, cx)
    }

    fn to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: Tensor,
        cx: &Geometry,
        out: &mut Emitter,
    ) -> Result<()> {
        rows::to_hf(self, e, idx, t, cx, out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn entry() -> Entry {
        Entry::gated(
            "decoder.layers.{l}.mlp.linear_fc1.weight",
            "model.layers.{l}.mlp.gate_proj.weight",
            "model.layers.{l}.mlp.up_proj.weight",
        )
    }

    #[test]
    fn gate_then_up_both_ways() {
        let gate = tensor("model.layers.0.mlp.gate_proj.weight", &[2, 3], 0);
        let up = tensor("model.layers.0.mlp.up_proj.weight", &[2, 3], 100);
        let want = [gate.bytes(), up.bytes()].concat();
        for zero_copy in [true, false] {
            let cx = Geometry {
                zero_copy,
                ..geometry()
            };
            let infos = [gate.info.clone(), up.info.clone()];
            let (planned, routes) = plan_import(&GatedMlp, &entry(), &infos, None, &cx).unwrap();
            assert_eq!(planned.len(), if zero_copy { 2 } else { 1 });
            let inputs = vec![((0, 0), gate.clone()), ((0, 1), up.clone())];
            let got = placed(&run_import(&GatedMlp, &entry(), &routes, inputs, &cx));
            assert_eq!(got["decoder.layers.0.mlp.linear_fc1.weight"], want);
        }
        // Back, whole and from a stored block of rows 1..3 (the end of gate, the start of up).
        let cx = geometry();
        let idx = Index {
            layer: Some(0),
            expert: None,
        };
        let fused = tensor("decoder.layers.0.mlp.linear_fc1.weight", &[4, 3], 0);
        let plan = GatedMlp
            .plan_to_hf(&entry(), idx, &fused.info, &cx)
            .unwrap();
        assert_eq!(
            plan.iter().map(|t| t.shape.to_vec()).collect::<Vec<_>>(),
            [[2, 3], [2, 3]]
        );
        let got = collect(|out| GatedMlp.to_hf(&entry(), idx, fused.clone(), &cx, out));
        assert_eq!(got[0].bytes(), &fused.bytes()[..6]);
        assert_eq!(got[1].name(), "model.layers.0.mlp.up_proj.weight");
        let mut block = tensor("decoder.layers.0.mlp.linear_fc1.weight#1", &[2, 3], 3);
        block.info = block.info.with_shard(&[4, 3], &[1, 0]);
        let got = collect(|out| GatedMlp.to_hf(&entry(), idx, block, &cx, out));
        let names: Vec<&str> = got.iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.gate_proj.weight#1",
                "model.layers.0.mlp.up_proj.weight#2"
            ]
        );
        assert_eq!(got[0].info.shard().unwrap().offsets.to_vec(), vec![1, 0]);
        assert_eq!(got[1].info.shard().unwrap().offsets.to_vec(), vec![0, 0]);
        // An odd row count has no halves.
        let odd = TensorInfo::new(
            "decoder.layers.0.mlp.linear_fc1.weight",
            fused.info.dtype,
            &[5, 3],
        );
        assert!(GatedMlp.plan_to_hf(&entry(), idx, &odd, &cx).is_err());
    }
}
