//! Where each input tensor's bytes go in an engine's per-rank files — pure placement, no I/O.
//!
//! Every output tensor, viewed as a matrix (`[shape[0] · … · shape[n-2], shape[n-1]]`, a 1-D
//! tensor as one column), is the rows of its [`Seg`]ments stacked in order: a box (rows ×
//! columns) of one input tensor viewed the same way, or rows of zeros (vocabulary padding).
//! That one form covers every layout the engines use: a TP chunk of rows or of columns,
//! `cat(q_r, k_r, v_r)` with KV heads repeated, `cat(gate_r, up_r)`, experts stacked, padded
//! vocabularies. The tables ([`crate::trtllm`], [`crate::vllm`]) say which segments; this module
//! checks that they tile each output exactly and turns them into routes per input tensor.

use bridgeflow_sdk::{DType, PluginError, Result, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// Rows of one input tensor (a box of it), or of one value.
#[derive(Debug, Clone, PartialEq)]
pub struct Seg {
    /// The input tensor's name; None for rows of `fill`.
    pub src: Option<String>,
    pub rows: Range<u64>,
    pub cols: Range<u64>,
    pub fill: f64,
}

impl Seg {
    /// All of `src`'s rows and columns (`shape` its shape).
    pub fn whole(src: &str, shape: &[u64]) -> Seg {
        let (r, c) = matrix(shape);
        Seg::rows(src, 0..r, c)
    }
    /// Rows `rows` of `src`, every column of its `width`.
    pub fn rows(src: &str, rows: Range<u64>, width: u64) -> Seg {
        Seg {
            src: Some(src.to_string()),
            rows,
            cols: 0..width,
            fill: 0.0,
        }
    }
    /// `n` rows of zeros, `width` wide.
    pub fn zeros(n: u64, width: u64) -> Seg {
        Seg::fill(n, width, 0.0)
    }
    /// `n` rows of `value`, `width` wide.
    pub fn fill(n: u64, width: u64, value: f64) -> Seg {
        Seg {
            src: None,
            rows: 0..n,
            cols: 0..width,
            fill: value,
        }
    }
    fn height(&self) -> u64 {
        self.rows.end - self.rows.start
    }
    fn width(&self) -> u64 {
        self.cols.end - self.cols.start
    }
}

/// One tensor of an engine's file set: its name in the stream (`FILE/NAME`), dtype, shape and
/// the segments it is made of.
#[derive(Debug, Clone)]
pub struct Out {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub segs: Vec<Seg>,
}

/// A tensor viewed as a matrix: (rows, columns).
pub fn matrix(shape: &[u64]) -> (u64, u64) {
    match shape {
        [] => (1, 1),
        [n] => (*n, 1),
        [rest @ .., last] => (rest.iter().product(), *last),
    }
}

/// Where one run of an input's rows goes: output `out`, starting at its row `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub out: usize,
    pub at: u64,
    pub rows: Range<u64>,
    pub cols: Range<u64>,
}

/// The outputs, checked, and for each input tensor the routes of its bytes.
#[derive(Debug)]
pub struct Placement {
    pub outs: Vec<Out>,
    pub routes: HashMap<String, Vec<Route>>,
    /// Rows of one value: (output, its rows, the value).
    pub fills: Vec<(usize, Range<u64>, f64)>,
}

impl Placement {
    /// Checks `outs` against the input tensors and builds the routes. Refused, by name: an
    /// output whose segments do not stack up to its shape, a segment outside its input or of
    /// an input the stream lacks, an input no output uses (but those in `unused`, which the
    /// engine does not keep), two outputs of one name.
    pub fn new(outs: Vec<Out>, inputs: &[TensorInfo], unused: &[String]) -> Result<Placement> {
        let shapes: HashMap<&str, &TensorInfo> = inputs.iter().map(|t| (t.name(), t)).collect();
        let mut names = std::collections::HashSet::new();
        let mut routes: HashMap<String, Vec<Route>> = HashMap::new();
        let mut fills = Vec::new();
        for (i, o) in outs.iter().enumerate() {
            if !names.insert(o.name.as_str()) {
                return Err(PluginError::internal(format!(
                    "output '{}' is placed twice",
                    o.name
                )));
            }
            let (rows, width) = matrix(&o.shape);
            let mut at = 0;
            for s in &o.segs {
                if s.width() != width {
                    return Err(bad_seg(o, s, &format!("is {} columns wide", s.width())));
                }
                match &s.src {
                    None => fills.push((i, at..at + s.height(), s.fill)),
                    Some(src) => {
                        let t = shapes.get(src.as_str()).ok_or_else(|| {
                            PluginError::shape(format!(
                                "'{}' is made from '{src}', which the input does not have",
                                o.name
                            ))
                        })?;
                        let (r, c) = matrix(&t.shape);
                        if s.rows.end > r || s.cols.end > c || s.height() == 0 {
                            return Err(bad_seg(
                                o,
                                s,
                                &format!("is outside {src} {}", t.shape_string()),
                            ));
                        }
                        routes.entry(src.clone()).or_default().push(Route {
                            out: i,
                            at,
                            rows: s.rows.clone(),
                            cols: s.cols.clone(),
                        });
                    }
                }
                at += s.height();
            }
            if at != rows {
                return Err(PluginError::shape(format!(
                    "'{}' {:?}: its parts make {at} rows, not {rows}",
                    o.name, o.shape
                )));
            }
        }
        let stray = inputs
            .iter()
            .find(|t| !routes.contains_key(t.name()) && !unused.iter().any(|u| u == t.name()));
        if let Some(unused) = stray {
            return Err(PluginError::shape(format!(
                "tensor '{}' {} has no place in the output (an unexpected tensor, or a model this table does not describe)",
                unused.name(),
                unused.shape_string()
            )));
        }
        Ok(Placement {
            outs,
            routes,
            fills,
        })
    }

    /// Output bytes per file (the `FILE/` prefix of each name).
    pub fn file_bytes(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for o in &self.outs {
            let file = o.name.split_once('/').map_or("", |(f, _)| f);
            let n: u64 = o.shape.iter().product::<u64>() * o.dtype.size() as u64;
            *m.entry(file.to_string()).or_default() += n;
        }
        m
    }
}

fn bad_seg(o: &Out, s: &Seg, what: &str) -> PluginError {
    PluginError::shape(format!(
        "'{}': the part from {} (rows {:?}, columns {:?}) {what}",
        o.name,
        s.src.as_deref().unwrap_or("zeros"),
        s.rows,
        s.cols
    ))
}

/// Chunk `r` of `n` equal chunks of `0..len` (`torch.chunk` of a divisible length); a length
/// that does not divide is refused, naming `what`.
pub fn chunk(len: u64, n: u64, r: u64, what: &str) -> Result<Range<u64>> {
    if n == 0 || !len.is_multiple_of(n) {
        return Err(PluginError::shape(format!(
            "{what}: {len} does not split into {n} equal parts"
        )));
    }
    let k = len / n;
    Ok(r * k..(r + 1) * k)
}

/// The rows of `heads` heads of `head_dim` that TP rank `r` of `tp` holds: its share when the
/// heads divide among the ranks, else the one head it repeats (`tp % heads == 0`: ranks
/// `h·tp/heads ..` share head `h`), as both TensorRT-LLM and vLLM place KV heads.
pub fn head_rows(heads: u64, head_dim: u64, tp: u64, r: u64, what: &str) -> Result<Range<u64>> {
    if heads >= tp {
        let h = chunk(heads, tp, r, what)?;
        return Ok(h.start * head_dim..h.end * head_dim);
    }
    if !tp.is_multiple_of(heads) {
        return Err(PluginError::shape(format!(
            "{what}: {heads} heads cannot be repeated over {tp} ranks"
        )));
    }
    let h = r / (tp / heads);
    Ok(h * head_dim..(h + 1) * head_dim)
}

/// The rows of a vocabulary of `vocab` rows padded to `padded` that rank `r` of `tp` holds:
/// the real rows in its chunk, then its zero rows.
pub fn vocab_segs(
    src: &str,
    vocab: u64,
    width: u64,
    padded: u64,
    tp: u64,
    r: u64,
) -> Result<Vec<Seg>> {
    let c = chunk(padded, tp, r, src)?;
    let real = c.start.min(vocab)..c.end.min(vocab);
    let mut segs = Vec::new();
    if real.end > real.start {
        segs.push(Seg::rows(src, real.clone(), width));
    }
    let pad = (c.end - c.start) - (real.end - real.start);
    if pad > 0 {
        segs.push(Seg::zeros(pad, width));
    }
    Ok(segs)
}

/// Columns chunk `r` of `tp` of `src` (`shape` [rows, cols]): row-parallel layers.
pub fn col_chunk(src: &str, shape: &[u64], tp: u64, r: u64) -> Result<Seg> {
    let (rows, cols) = matrix(shape);
    Ok(Seg {
        src: Some(src.to_string()),
        rows: 0..rows,
        cols: chunk(cols, tp, r, src)?,
        fill: 0.0,
    })
}

/// Rows chunk `r` of `tp` of `src`: column-parallel layers.
pub fn row_chunk(src: &str, shape: &[u64], tp: u64, r: u64) -> Result<Seg> {
    let (rows, cols) = matrix(shape);
    Ok(Seg::rows(src, chunk(rows, tp, r, src)?, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, shape: &[u64]) -> TensorInfo {
        TensorInfo::new(name, DType::F32, shape)
    }

    #[test]
    fn segments_must_stack_to_the_shape() {
        let inputs = [info("a", &[4, 3]), info("b", &[2, 3])];
        let out = |segs| Out {
            name: "r0/x".into(),
            dtype: DType::F32,
            shape: vec![6, 3],
            segs,
        };
        let p = Placement::new(
            vec![out(vec![
                Seg::whole("b", &[2, 3]),
                Seg::whole("a", &[4, 3]),
            ])],
            &inputs,
            &[],
        )
        .unwrap();
        assert_eq!(p.routes["a"][0].at, 2);
        // Too few rows, an input nobody uses, a missing input, a box outside its input.
        let e = Placement::new(vec![out(vec![Seg::whole("a", &[4, 3])])], &inputs[..1], &[]);
        assert!(e.unwrap_err().message.contains("make 4 rows, not 6"));
        let e = Placement::new(
            vec![out(vec![Seg::whole("a", &[4, 3]), Seg::zeros(2, 3)])],
            &inputs,
            &[],
        );
        assert!(e.unwrap_err().message.contains("'b' [2, 3] has no place"));
        let e = Placement::new(vec![out(vec![Seg::whole("c", &[6, 3])])], &inputs, &[]);
        assert!(e
            .unwrap_err()
            .message
            .contains("'c', which the input does not have"));
        let e = Placement::new(vec![out(vec![Seg::rows("a", 0..6, 3)])], &inputs, &[]);
        assert!(e.unwrap_err().message.contains("is outside a [4, 3]"));
    }

    #[test]
    fn kv_heads_are_shared_or_repeated() {
        // 2 KV heads of 16 rows: at TP 2 one each, at TP 4 each repeated on two ranks.
        assert_eq!(head_rows(2, 16, 2, 1, "k").unwrap(), 16..32);
        let tp4: Vec<_> = (0..4)
            .map(|r| head_rows(2, 16, 4, r, "k").unwrap())
            .collect();
        assert_eq!(tp4, [0..16, 0..16, 16..32, 16..32]);
        assert!(head_rows(3, 16, 4, 0, "k").is_err());
        assert!(head_rows(6, 16, 4, 0, "k").is_err());
    }

    #[test]
    fn vocabulary_padding_goes_to_the_last_ranks() {
        // 250 rows padded to 252 over 4 ranks: 63 each, the last one 61 real + 2 zeros.
        let last = vocab_segs("e", 250, 64, 252, 4, 3).unwrap();
        assert_eq!(last, [Seg::rows("e", 189..250, 64), Seg::zeros(2, 64)]);
        assert_eq!(
            vocab_segs("e", 250, 64, 252, 4, 0).unwrap(),
            [Seg::rows("e", 0..63, 64)]
        );
        // A rank wholly past the real rows holds zeros only.
        assert_eq!(
            vocab_segs("e", 10, 1, 16, 4, 3).unwrap(),
            [Seg::zeros(4, 1)]
        );
    }
}
