//! Megatron's `linear_qkv`: q, k and v fused per query group — for each group its
//! heads/groups q heads, then its k head, then its v head (weights or biases; Megatron-Bridge's
//! `QKVMapping`). With zero_copy each group's runs of rows move as views; without, export splits
//! the whole tensor into whole q, k and v.

use super::rows::{self, Rows};
use super::{hf_name, row_bytes, with_first, Geometry, Group, Layout, Parts, Routes};
use bridgeflow_megatron::mapping::{row_segments, split_qkv, Entry, Index, Kind, RowSegment};
use bridgeflow_sdk::{Buffer, Emitter, PluginError, Result, Tensor, TensorInfo};

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct FusedQkv;

impl Rows for FusedQkv {
    fn segments(&self, fused: u64, cx: &Geometry) -> Result<(Vec<u64>, Vec<RowSegment>)> {
        row_segments(Kind::Qkv, fused, cx.heads, cx.vocab)
    }
}

impl Layout for FusedQkv {
    fn parts(&self) -> usize {
        3
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
        if cx.zero_copy {
            return rows::to_hf(self, e, idx, t, cx, out);
        }
        if t.info.shard().is_some() {
            return Err(PluginError::config(format!(
                "'{}' arrives in pieces; whole q/k/v tensors need zero_copy = true or a reader without row_pieces",
                t.name()
            )));
        }
        let row = row_bytes(&t.info.shape, t.info.dtype) as usize;
        let (q, k, v) = split_qkv(t.bytes(), cx.heads, row).map_err(|err| err.context(t.name()))?;
        for (p, data) in [q, k, v].into_iter().enumerate() {
            let shape = with_first((data.len() / row) as u64, &t.info.shape[1..]);
            let info = TensorInfo::new(hf_name(e, p, idx.layer, None), t.info.dtype, &shape);
            out.tensor(Tensor::new(info, Buffer::from_vec(data))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn entry() -> Entry {
        Entry::qkv(
            "decoder.layers.{l}.self_attention.linear_qkv.weight",
            "model.layers.{l}.self_attn.q_proj.weight",
            "model.layers.{l}.self_attn.k_proj.weight",
            "model.layers.{l}.self_attn.v_proj.weight",
        )
    }

    #[test]
    fn per_group_layout_both_ways() {
        // 4 heads in 2 groups, head_dim 1, one column: q = 0..4, k = 10..12, v = 20..22.
        let q = tensor("model.layers.0.self_attn.q_proj.weight", &[4, 1], 0);
        let k = tensor("model.layers.0.self_attn.k_proj.weight", &[2, 1], 10);
        let v = tensor("model.layers.0.self_attn.v_proj.weight", &[2, 1], 20);
        let fused = vec![0, 1, 10, 20, 2, 3, 11, 21];
        let idx = Index {
            layer: Some(0),
            expert: None,
        };
        for zero_copy in [true, false] {
            let cx = Geometry {
                zero_copy,
                ..geometry()
            };
            let infos = [q.info.clone(), k.info.clone(), v.info.clone()];
            let (_, routes) = plan_import(&FusedQkv, &entry(), &infos, None, &cx).unwrap();
            let inputs = vec![
                ((0, 0), q.clone()),
                ((0, 1), k.clone()),
                ((0, 2), v.clone()),
            ];
            let got = placed(&run_import(&FusedQkv, &entry(), &routes, inputs, &cx));
            assert_eq!(
                got["decoder.layers.0.self_attention.linear_qkv.weight"],
                fused
            );
            // Back: whole q, k, v without zero_copy, row pieces of them with.
            let t = Tensor::new(
                TensorInfo::new(
                    "decoder.layers.0.self_attention.linear_qkv.weight",
                    q.info.dtype,
                    &[8, 1],
                ),
                Buffer::from_vec(fused.clone()),
            )
            .unwrap();
            let plan = FusedQkv.plan_to_hf(&entry(), idx, &t.info, &cx).unwrap();
            assert_eq!(
                plan.iter().map(|t| t.shape[0]).collect::<Vec<_>>(),
                [4, 2, 2]
            );
            let got = collect(|out| FusedQkv.to_hf(&entry(), idx, t, &cx, out));
            assert_eq!(got.len(), if zero_copy { 6 } else { 3 });
            let back = placed(&got);
            for want in [&q, &k, &v] {
                assert_eq!(back[want.name()], want.bytes(), "zero_copy {zero_copy}");
            }
        }
        // Whole tensors from a stored block: refused by name.
        let cx = Geometry {
            zero_copy: false,
            ..geometry()
        };
        let mut block = tensor(
            "decoder.layers.0.self_attention.linear_qkv.weight#0",
            &[4, 1],
            0,
        );
        block.info = block.info.with_shard(&[8, 1], &[0, 0]);
        let e = try_collect(|out| FusedQkv.to_hf(&entry(), idx, block, &cx, out)).unwrap_err();
        assert!(e.message.contains("arrives in pieces"), "{}", e.message);
    }
}
