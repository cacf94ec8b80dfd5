//! One HF tensor, renamed (Megatron-Bridge's `AutoMapping` / `DirectMapping`); with `{e}` in its
//! HF name, one expert's tensor at its index of a leading expert axis.

use super::rows::{self, Rows};
use super::{hf_name, Geometry, Group, Layout, Parts, Routes};
use bridgeflow_megatron::mapping::{row_segments, Entry, Index, Kind, RowSegment};
use bridgeflow_sdk::{Emitter, Result, Tensor, TensorInfo};

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Direct;

impl Rows for Direct {
    fn segments(&self, fused: u64, cx: &Geometry) -> Result<(Vec<u64>, Vec<RowSegment>)> {
        row_segments(Kind::Direct, fused, cx.heads, cx.vocab)
    }
}

impl Layout for Direct {
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
        if e.per_expert() {
            return rows::to_hf(self, e, idx, t, cx, out);
        }
        // Renamed; a piece (of any axis) stays a piece of the renamed tensor.
        let name = hf_name(e, 0, idx.layer, None);
        let n = match t.name().split_once('#') {
            Some((_, id)) => format!("{name}#{id}"),
            None => name,
        };
        out.tensor(Tensor::new(t.info.clone().with_name(n), t.data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn renamed_both_ways() {
        let e = Entry::direct(
            "decoder.layers.{l}.self_attention.linear_proj.weight",
            "model.layers.{l}.self_attn.o_proj.weight",
        );
        let idx = Index {
            layer: Some(1),
            expert: None,
        };
        let cx = geometry();
        let hf = tensor("model.layers.0.self_attn.o_proj.weight", &[2, 3], 0);
        let (planned, routes) =
            plan_import(&Direct, &e, std::slice::from_ref(&hf.info), None, &cx).unwrap();
        assert_eq!(
            planned[0].name(),
            "decoder.layers.0.self_attention.linear_proj.weight"
        );
        assert_eq!(routes.whole.len(), 1, "a whole tensor, as it is");
        let got = run_import(&Direct, &e, &routes, vec![((0, 0), hf.clone())], &cx);
        assert_eq!(got[0].bytes(), hf.bytes());
        // Back: a stored chunk of any axis stays that chunk of the renamed tensor.
        let mut chunk = tensor(
            "decoder.layers.1.self_attention.linear_proj.weight#c1",
            &[2, 1],
            5,
        );
        chunk.info = chunk.info.with_shard(&[2, 3], &[0, 2]);
        let got = collect(|out| Direct.to_hf(&e, idx, chunk.clone(), &cx, out));
        assert_eq!(got[0].name(), "model.layers.1.self_attn.o_proj.weight#c1");
        assert_eq!(got[0].info.shard(), chunk.info.shard());
        let plan = Direct.plan_to_hf(&e, idx, &chunk.info, &cx).unwrap();
        assert_eq!(plan[0].shape.to_vec(), vec![2, 3]);
    }

    #[test]
    fn experts_stack_on_a_leading_axis_both_ways() {
        let e = Entry::direct(
            "decoder.layers.{l}.mlp.experts.linear_fc2.weight",
            "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
        );
        let idx = Index {
            layer: Some(0),
            expert: None,
        };
        let x0 = tensor("model.layers.0.mlp.experts.0.down_proj.weight", &[2, 2], 0);
        let x1 = tensor("model.layers.0.mlp.experts.1.down_proj.weight", &[2, 2], 10);
        let stacked = [x0.bytes(), x1.bytes()].concat();
        for zero_copy in [true, false] {
            let cx = Geometry {
                zero_copy,
                ..geometry()
            };
            let infos = [x0.info.clone(), x1.info.clone()];
            let (planned, routes) = plan_import(&Direct, &e, &infos, Some(2), &cx).unwrap();
            assert_eq!(planned.len(), if zero_copy { 2 } else { 1 });
            let inputs = vec![((0, 0), x0.clone()), ((1, 0), x1.clone())];
            let got = placed(&run_import(&Direct, &e, &routes, inputs, &cx));
            assert_eq!(
                got["decoder.layers.0.mlp.experts.linear_fc2.weight"],
                stacked
            );
        }
        let cx = geometry();
        let t = Tensor::new(
            TensorInfo::new(
                "decoder.layers.0.mlp.experts.linear_fc2.weight",
                x0.info.dtype,
                &[2, 2, 2],
            ),
            bridgeflow_sdk::Buffer::from_vec(stacked),
        )
        .unwrap();
        let plan = Direct.plan_to_hf(&e, idx, &t.info, &cx).unwrap();
        assert_eq!(
            plan[1].name(),
            "model.layers.0.mlp.experts.1.down_proj.weight"
        );
        let got = collect(|out| Direct.to_hf(&e, idx, t, &cx, out));
        assert_eq!((got[0].bytes(), got[1].bytes()), (x0.bytes(), x1.bytes()));
    }
}
