//! Rows stored as one key per named block: a Mamba-2 mixer's `in_proj` [z; x; B; C; dt] and
//! `conv1d` [x; B; C], which megatron-core's torch_dist writes as `<name>.z`, `<name>.x`, ...
//! (its split-tensor factory). Each key is a view of the HF tensor's rows, both ways.

use super::{global_shape, hf_name, with_first, Geometry, Group, Layout, Parts, Piece, Routes};
use bridgeflow_megatron::mapping::{fill, Entry, Index, Kind};
use bridgeflow_sdk::{Emitter, PluginError, Result, Tensor, TensorInfo};

/// The blocks of one of the split kinds (`mamba-in-proj`, `mamba-conv`).
#[derive(Debug, Clone, Copy)]
pub struct SplitRows(pub Kind);

impl SplitRows {
    fn blocks(&self, cx: &Geometry, name: &str) -> Result<Vec<(&'static str, u64)>> {
        let m = cx.mamba.ok_or_else(|| {
            PluginError::format(format!(
                "'{name}' is a Mamba mixer's, but the config gives no mamba_num_heads / mamba_head_dim"
            ))
        })?;
        self.0.split_rows(m).ok_or_else(|| {
            PluginError::internal(format!("{:?} is not stored as separate keys", self.0))
        })
    }

    /// A key's block: its first row and the fused row count.
    fn place(&self, cx: &Geometry, key: &str) -> Result<(u64, u64)> {
        let (base, part) = key.rsplit_once('.').unwrap_or((key, ""));
        let blocks = self.blocks(cx, base)?;
        let at = blocks
            .iter()
            .position(|(p, _)| *p == part)
            .ok_or_else(|| PluginError::internal(format!("'{key}' is no block of {:?}", self.0)))?;
        let first = blocks[..at].iter().map(|(_, r)| r).sum();
        Ok((first, blocks.iter().map(|(_, r)| r).sum()))
    }
}

impl Layout for SplitRows {
    fn split_blocks(&self, cx: &Geometry, name: &str) -> Result<Option<Vec<(&'static str, u64)>>> {
        self.blocks(cx, name).map(Some)
    }

    fn plan_to_megatron(
        &self,
        g: &Group,
        cx: &Geometry,
        routes: &mut Routes,
    ) -> Result<Vec<TensorInfo>> {
        let (first, name) = (g.first(), &g.name);
        let rows = self.blocks(cx, name)?;
        let total: u64 = rows.iter().map(|(_, r)| r).sum();
        if first.shape.first() != Some(&total) || g.blocks_of(first).len() > 1 {
            return Err(PluginError::shape(format!(
                "'{}' {}: expected one whole tensor of {total} rows ({})",
                first.name(),
                first.shape_string(),
                rows.iter()
                    .map(|(p, r)| format!("{p} {r}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut out = Vec::new();
        let mut at = 0;
        for (part, n) in rows {
            let info = TensorInfo::new(
                format!("{name}.{part}"),
                first.dtype,
                &with_first(n, &first.shape[1..]),
            );
            out.push(info.clone());
            routes
                .pieces
                .entry(first.name().to_string())
                .or_default()
                .push(Piece {
                    info,
                    rows: Some(at..at + n),
                });
            at += n;
        }
        Ok(out)
    }

    fn to_megatron(
        &self,
        _e: &Entry,
        _cx: &Geometry,
        target: &TensorInfo,
        _parts: Parts,
        _out: &mut Emitter,
    ) -> Result<()> {
        Err(PluginError::internal(format!(
            "'{}': row blocks stored apart move as pieces only",
            target.name()
        )))
    }

    fn plan_to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: &TensorInfo,
        cx: &Geometry,
    ) -> Result<Vec<TensorInfo>> {
        // One of the row blocks stored apart: the fused HF tensor (the mapper keeps one).
        let (_, total) = self.place(cx, t.base_name())?;
        let global = global_shape(t);
        let name = fill(&e.hf[0], idx);
        Ok(vec![TensorInfo::new(
            name,
            t.dtype,
            &with_first(total, &global[1..]),
        )])
    }

    fn to_hf(
        &self,
        e: &Entry,
        idx: Index,
        t: Tensor,
        cx: &Geometry,
        out: &mut Emitter,
    ) -> Result<()> {
        // A row block stored apart (or a piece of one): its rows of the fused HF tensor.
        let (first, total) = self.place(cx, t.info.base_name())?;
        let name = hf_name(e, 0, idx.layer, idx.expert);
        let row = first + t.info.shard().map_or(0, |s| s.offsets[0]);
        let global = with_first(total, &t.info.shape[1..]);
        let mut at = vec![0; global.len()];
        at[0] = row;
        let info = t
            .info
            .clone()
            .with_name(format!("{name}#{row}"))
            .with_shard(&global, &at);
        out.tensor(Tensor::new(info, t.data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn entry() -> Entry {
        Entry::new(
            Kind::MambaInProj,
            "decoder.layers.{l}.mixer.in_proj.weight",
            &["backbone.layers.{l}.mixer.in_proj.weight"],
        )
    }

    #[test]
    fn one_key_per_block_both_ways() {
        // inner 2, bc 1, heads 1: z 2, x 2, B 1, C 1, dt 1 rows.
        let cx = geometry();
        let hf = tensor("backbone.layers.0.mixer.in_proj.weight", &[7, 3], 0);
        let (planned, routes) = plan_import(
            &SplitRows(Kind::MambaInProj),
            &entry(),
            std::slice::from_ref(&hf.info),
            None,
            &cx,
        )
        .unwrap();
        let names: Vec<&str> = planned.iter().map(|t| t.name()).collect();
        assert_eq!(names.len(), 5);
        assert_eq!(names[4], "decoder.layers.0.mixer.in_proj.weight.dt");
        let got = run_import(
            &SplitRows(Kind::MambaInProj),
            &entry(),
            &routes,
            vec![((0, 0), hf.clone())],
            &cx,
        );
        assert_eq!(got[1].name(), "decoder.layers.0.mixer.in_proj.weight.x");
        assert_eq!(got[1].bytes(), &hf.bytes()[6..12]);
        // Back: each key to its rows of the HF tensor.
        let idx = Index {
            layer: Some(0),
            expert: None,
        };
        let l = SplitRows(Kind::MambaInProj);
        let plan = l.plan_to_hf(&entry(), idx, &got[2].info, &cx).unwrap();
        assert_eq!(plan[0].shape.to_vec(), vec![7, 3]);
        let back: Vec<Tensor> = got
            .into_iter()
            .flat_map(|t| collect(|out| l.to_hf(&entry(), idx, t, &cx, out)))
            .collect();
        assert_eq!(
            placed(&back)["backbone.layers.0.mixer.in_proj.weight"],
            hf.bytes()
        );
        // A tensor of other rows, and a config without Mamba widths, are named.
        let wrong = TensorInfo::new(hf.name(), hf.info.dtype, &[6, 3]);
        let e = plan_import(&l, &entry(), &[wrong], None, &cx).unwrap_err();
        assert!(
            e.message
                .contains("expected one whole tensor of 7 rows (z 2, x 2, B 1, C 1, dt 1)"),
            "{}",
            e.message
        );
        let no_mamba = Geometry { mamba: None, ..cx };
        let e = plan_import(
            &l,
            &entry(),
            std::slice::from_ref(&hf.info),
            None,
            &no_mamba,
        )
        .unwrap_err();
        assert!(e.message.contains("is a Mamba mixer's"), "{}", e.message);
    }
}
