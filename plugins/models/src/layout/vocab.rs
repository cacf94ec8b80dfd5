//! A tensor whose first axis is the vocabulary (embeddings, output layer): padded with rows of
//! zeros to the padded vocabulary on import, truncated to the vocabulary on export.

use super::rows::{self, Rows};
use super::{Geometry, Group, Layout, Parts, Routes};
use bridgeflow_megatron::mapping::{row_segments, Entry, Index, Kind, RowSegment};
use bridgeflow_sdk::{Emitter, Result, Tensor, TensorInfo};

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Vocab;

impl Rows for Vocab {
    fn fused_rows(&self, part_rows: &[u64], cx: &Geometry) -> u64 {
        cx.padded_vocab.max(part_rows[0])
    }
    fn segments(&self, fused: u64, cx: &Geometry) -> Result<(Vec<u64>, Vec<RowSegment>)> {
        row_segments(Kind::Vocab, fused, cx.heads, cx.vocab)
    }
}

impl Layout for Vocab {
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
        Entry::vocab(
            "embedding.word_embeddings.weight",
            "model.embed_tokens.weight",
        )
    }

    #[test]
    fn pads_on_import_and_truncates_on_export() {
        // Vocabulary 5 padded to 8, two columns.
        let hf = tensor("model.embed_tokens.weight", &[5, 2], 1);
        let mut want = hf.bytes().to_vec();
        want.extend([0; 6]);
        for zero_copy in [true, false] {
            let cx = Geometry {
                zero_copy,
                ..geometry()
            };
            let (planned, routes) =
                plan_import(&Vocab, &entry(), std::slice::from_ref(&hf.info), None, &cx).unwrap();
            let got = run_import(&Vocab, &entry(), &routes, vec![((0, 0), hf.clone())], &cx);
            assert_eq!(got.len(), planned.len(), "zero_copy {zero_copy}");
            let placed = placed(&got);
            assert_eq!(placed["embedding.word_embeddings.weight"], want);
        }
        // Back: the padding rows dropped.
        let cx = geometry();
        let meg = tensor("embedding.word_embeddings.weight", &[8, 2], 1);
        let plan = Vocab
            .plan_to_hf(&entry(), Index::default(), &meg.info, &cx)
            .unwrap();
        assert_eq!(plan[0].shape.to_vec(), vec![5, 2]);
        let got = collect(|out| Vocab.to_hf(&entry(), Index::default(), meg, &cx, out));
        assert_eq!(got[0].name(), "model.embed_tokens.weight");
        assert_eq!(got[0].bytes(), hf.bytes());
        // Fewer rows than the vocabulary: named.
        let short = TensorInfo::new("embedding.word_embeddings.weight", hf.info.dtype, &[4, 2]);
        let e = Vocab
            .plan_to_hf(&entry(), Index::default(), &short, &cx)
            .unwrap_err();
        assert!(
            e.message.contains("fewer than the vocabulary of 5"),
            "{}",
            e.message
        );
    }
}
