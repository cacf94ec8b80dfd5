#!/usr/bin/env python3
"""Golden files for megatron-core's GPTDataset sample construction.

Builds GPTDataset splits with megatron-core's own classes (BlendedMegatronDatasetBuilder,
GPTDatasetConfig, GPTDataset, IndexedDataset and the compiled C++ helper
`megatron.core.datasets.helpers_cpp.build_sample_idx_*`) on the Megatron indexed fixture
tests/fixtures/shared/data/indexed/corpus_bpe8k_text_document and writes, per case and split,
the three index arrays plus the first raw samples to
tests/fixtures/train/gpt_dataset/<case>_<split>.safetensors, and cases.json with every setting.

Run from the repository root with the oracle venv (megatron-core 0.19.2, see
tests/fixtures/shared/oracle/README.md or /work/shared/oracle/README.md):

    nice -n 10 VENV/bin/python scripts/gpt_dataset_goldens.py [--out tests/fixtures/train/gpt_dataset]

Deterministic: re-running gives byte-identical files. Index caches are written to a temporary
directory (GPTDatasetConfig.path_to_cache), never into the repository.
This is an oracle script (a judge), not project code; CI only reads the files it wrote.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections import OrderedDict

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import numpy  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import megatron.core  # noqa: E402
from megatron.core.datasets import helpers, helpers_cpp  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.datasets.utils import Split  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX_REL = "tests/fixtures/shared/data/indexed/corpus_bpe8k_text_document"
NUM_FIRST = 16


class MockTokenizer:
    """The attributes GPTDatasetConfig / GPTDataset / MegatronDataset read from a tokenizer.

    vocab_size: GPTDatasetConfig.__post_init__ -> token_dtype_code (8 = uint16 when <= 65536);
    eod: _get_ltor_masks_and_position_ids (masks only); pad: MegatronDataset._pad_token_id
    (-1 = megatron's _PAD_TOKEN_ID, what its NullTokenizer gives: it has no `pad` attribute, so
    MegatronDataset falls back to -1); unique_identifiers: the dataset's cache description.
    """

    def __init__(self, vocab_size=8000, eod=0, pad=-1):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = pad

    @property
    def unique_identifiers(self):
        return OrderedDict(
            {"class": "MockTokenizer", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}
        )


# name, seq_length, seed, split, sizes [train, valid, test], splits to save
CASES = [
    ("case1_seq64_seed1234", 64, 1234, "969,30,1", [200, 10, 10], ["train", "valid", "test"]),
    ("case2_seq128_seed42", 128, 42, "969,30,1", [5000, 10, 10], ["train", "valid", "test"]),
    ("case3_seq32_seed7_single", 32, 7, "1,0,0", [1000, 0, 0], ["train"]),
    # Extra cases (not in the brief): case2's 5000 train samples fit in one epoch of the train
    # split (9697 samples), so these two make the train split span several epochs. Their valid
    # and test splits are identical to case2's (checked below) and are not saved.
    ("case4_seq128_seed42_3epochs_separate", 128, 42, "969,30,1", [21000, 10, 10], ["train"]),
    ("case5_seq128_seed42_2epochs_joint", 128, 42, "969,30,1", [18000, 10, 10], ["train"]),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def epoch_facts(ds):
    """Re-state GPTDataset._build_document_sample_shuffle_indices' epoch arithmetic (megatron
    does not keep these values on the object) using its own _get_num_* methods."""
    seq = ds.config.sequence_length
    extra = int(ds.config.add_extra_token_to_sequence)
    tokens_per_epoch = ds._get_num_tokens_per_epoch()
    num_epochs = ds._get_num_epochs(tokens_per_epoch)
    facts = {
        "num_tokens_per_epoch": tokens_per_epoch,
        "num_epochs": num_epochs,
        "num_tokens_requested": ds.num_samples * seq + extra,
    }
    if num_epochs == 1:
        facts["separate_final_epoch"] = False
    else:
        sans = ((num_epochs - 1) * tokens_per_epoch - extra) // seq
        from_final = ds.num_samples - sans
        per_epoch = (tokens_per_epoch - extra) // seq
        facts.update(
            {
                "num_samples_sans_final_epoch": sans,
                "num_samples_from_final_epoch": from_final,
                "num_samples_per_epoch": per_epoch,
                "threshold": 0.8,
                "threshold_samples": int(0.8 * per_epoch),
                "separate_final_epoch": bool(from_final < int(0.8 * per_epoch)),
            }
        )
    return facts


def python_sample_index(sizes, document_index, seq, num_epochs, tokens_per_epoch, extra):
    """Line-by-line Python restatement of helpers.cpp build_sample_idx (drop_last=True), used
    only as a self-check of the C++ helper's output (the goldens come from the helper)."""
    num_samples = (num_epochs * tokens_per_epoch - extra) // seq
    out = numpy.zeros((num_samples + 1, 2), dtype=numpy.int64)
    di, off, k = 0, 0, 1
    while k <= num_samples:
        remaining = seq + extra
        while remaining != 0:
            length = int(sizes[document_index[di]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - extra
                remaining = 0
            else:
                if di == len(document_index) - 1:
                    assert k == num_samples
                    off = int(sizes[document_index[di]]) - extra
                    break
                di += 1
                off = 0
        out[k] = (di, off)
        k += 1
    return out


def build_case(prefix, seq, seed, split, sizes, cache_dir):
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq,
        blend=([prefix], None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=MockTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        add_extra_token_to_sequence=True,
        create_attention_mask=False,
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return config, datasets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/train/gpt_dataset"))
    args = ap.parse_args()

    # The judge is the compiled C++ helper, never a Python fallback.
    assert helpers_cpp.__file__.endswith(".so"), helpers_cpp.__file__
    assert helpers.build_sample_idx_int32 is helpers_cpp.build_sample_idx_int32

    os.chdir(REPO)  # relative dataset path keeps the dataset description machine independent
    prefix = PREFIX_REL
    os.makedirs(args.out, exist_ok=True)

    low = IndexedDataset(prefix)
    sizes_all = low.sequence_lengths

    summary = OrderedDict()
    summary["generator"] = "scripts/gpt_dataset_goldens.py"
    summary["versions"] = {
        "python": sys.version.split()[0],
        "megatron_core": megatron.core.__version__,
        "numpy": numpy.__version__,
        "helpers_cpp": os.path.basename(helpers_cpp.__file__),
        "helpers_cpp_sha256": sha256_file(helpers_cpp.__file__),
    }
    summary["dataset"] = {
        "prefix": prefix,
        "bin_sha256": sha256_file(prefix + ".bin"),
        "idx_sha256": sha256_file(prefix + ".idx"),
        "token_dtype": str(low.index.dtype.__name__),
        "num_sequences": int(len(sizes_all)),
        "num_documents": int(len(low.document_indices) - 1),
        "total_tokens": int(sizes_all.sum()),
        "max_sequence_length": int(sizes_all.max()),
        "argmax_sequence": int(sizes_all.argmax()),
        "note": "GPTDataset splits and indexes by *sequence* (numel_low_level_dataset = "
        "len(sequence_lengths)); 'document' in document_index means sequence index. "
        "Empty documents have no sequence, so 3061 documents give 3059 sequences.",
    }
    summary["tokenizer"] = MockTokenizer().unique_identifiers
    summary["cases"] = OrderedDict()

    kept = {}
    for name, seq, seed, split, sizes, save_splits in CASES:
        with tempfile.TemporaryDirectory(prefix="gptds_cache_") as cache_dir:
            config, datasets = build_case(prefix, seq, seed, split, sizes, cache_dir)
        case = OrderedDict()
        case["config"] = OrderedDict(
            {
                "sequence_length": seq,
                "random_seed": seed,
                "split": split,
                "split_matrix": config.split_matrix,
                "sizes": sizes,
                "reset_position_ids": False,
                "reset_attention_mask": False,
                "eod_mask_loss": False,
                "add_extra_token_to_sequence": True,
                "drop_last_partial_validation_sequence": config.drop_last_partial_validation_sequence,
                "create_attention_mask": False,
                "mmap_bin_files": config.mmap_bin_files,
                "token_dtype_code": config.token_dtype_code,
                "path_to_cache": "<temporary directory>",
                "blend": [[prefix], None],
                "builder": "BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()",
            }
        )
        case["splits"] = OrderedDict()
        for sp in Split:
            ds = datasets[sp.value]
            if ds is None:
                case["splits"][sp.name] = None
                continue
            assert isinstance(ds, GPTDataset), type(ds)
            facts = epoch_facts(ds)
            di, si, sh = ds.document_index, ds.sample_index, ds.shuffle_index
            n = len(ds)
            assert n == si.shape[0] - 1 == sh.shape[0]
            extra = int(config.add_extra_token_to_sequence)
            assert n == (facts["num_epochs"] * facts["num_tokens_per_epoch"] - extra) // seq
            # self-check of the helper against its source, restated in Python
            ref = python_sample_index(
                sizes_all, di, seq, facts["num_epochs"], facts["num_tokens_per_epoch"], extra
            )
            assert numpy.array_equal(ref, si.astype(numpy.int64)), f"{name} {sp.name}"

            k = min(NUM_FIRST, n)
            first, first_docs = [], []
            for i in range(k):
                text, doc_ids, _ = ds._query_document_sample_shuffle_indices(i)
                assert text.dtype == numpy.int64 and text.shape == (seq + extra,)
                assert (text >= 0).all(), "padding appeared"  # drop_last => never padded
                first.append(text)
                first_docs.append(doc_ids)
            maxd = max(len(d) for d in first_docs)
            first_docs_arr = numpy.full((k, maxd), -1, dtype=numpy.int64)
            for i, d in enumerate(first_docs):
                first_docs_arr[i, : len(d)] = d
            first_arr = numpy.stack(first)
            # __getitem__ splits the raw sample: tokens = raw[:-1], labels = raw[1:]
            item0 = ds[0]
            assert numpy.array_equal(item0["tokens"].numpy(), first_arr[0, :-1])
            assert numpy.array_equal(item0["labels"].numpy(), first_arr[0, 1:])

            beg, end = int(ds.indices[0]), int(ds.indices[-1]) + 1
            assert numpy.array_equal(ds.indices, numpy.arange(beg, end, dtype=numpy.int32))
            info = OrderedDict()
            info["document_range"] = [beg, end]
            info["document_range_note"] = "[start, end) sequence indices: int(round(bookend * num_sequences))"
            info["num_samples_requested"] = ds.num_samples
            info["len"] = n
            info.update(facts)
            info["drop_last_partial_sequence"] = (
                config.drop_last_partial_validation_sequence if sp == Split.valid else True
            )
            info["dtypes"] = {
                "indices": str(ds.indices.dtype),
                "document_index": str(di.dtype),
                "sample_index": str(si.dtype),
                "shuffle_index": str(sh.dtype),
                "first_tokens": str(first_arr.dtype),
                "first_document_ids": "int64",
            }
            info["shapes"] = {
                "document_index": list(di.shape),
                "sample_index": list(si.shape),
                "shuffle_index": list(sh.shape),
                "first_tokens": list(first_arr.shape),
                "first_document_ids": list(first_docs_arr.shape),
            }
            info["num_first"] = k
            info["saved"] = sp.name in save_splits
            kept[(name, sp.name)] = (di, si, sh)
            if sp.name in save_splits:
                fname = f"{name}_{sp.name}.safetensors"
                info["file"] = fname
                save_file(
                    {
                        "document_index": numpy.ascontiguousarray(di),
                        "sample_index": numpy.ascontiguousarray(si),
                        "shuffle_index": numpy.ascontiguousarray(sh),
                        "first_tokens": first_arr,
                        "first_document_ids": first_docs_arr,
                    },
                    os.path.join(args.out, fname),
                )
                os.chmod(os.path.join(args.out, fname), 0o644)
            case["splits"][sp.name] = info
        summary["cases"][name] = case
        print(
            name,
            {s: (v["document_range"], v["num_epochs"], v["separate_final_epoch"], v["len"])
             for s, v in case["splits"].items() if v},
            flush=True,
        )

    # the extra cases' valid/test splits equal case2's (valid/test do not depend on train size)
    for extra_case in ("case4_seq128_seed42_3epochs_separate", "case5_seq128_seed42_2epochs_joint"):
        for sp in ("valid", "test"):
            for a, b in zip(kept[(extra_case, sp)], kept[("case2_seq128_seed42", sp)]):
                assert a.dtype == b.dtype and numpy.array_equal(a, b), (extra_case, sp)

    # numpy legacy RandomState vectors (the RNG megatron uses for both shuffles)
    rng = {}
    for seed in (1234, 42, 7):
        rs = numpy.random.RandomState(seed)
        rng[f"seed{seed}_raw_u32"] = rs._bit_generator.random_raw(16).astype(numpy.uint32)
        rs = numpy.random.RandomState(seed)
        a = numpy.arange(20, dtype=numpy.int32)
        rs.shuffle(a)
        rng[f"seed{seed}_shuffle_arange20_int32"] = a
        b = numpy.arange(20, dtype=numpy.uint32)
        rs.shuffle(b)  # same RandomState, continuing: the second shuffle's permutation
        rng[f"seed{seed}_then_shuffle_arange20_uint32"] = b
    save_file(rng, os.path.join(args.out, "numpy_rng_vectors.safetensors"))
    os.chmod(os.path.join(args.out, "numpy_rng_vectors.safetensors"), 0o644)
    summary["numpy_rng_vectors"] = {
        "file": "numpy_rng_vectors.safetensors",
        "what": "RandomState(seed)._bit_generator.random_raw(16) (MT19937 after legacy "
        "init_genrand(seed) seeding); RandomState(seed).shuffle(arange(20, int32)); then the "
        "same state's shuffle(arange(20, uint32))",
    }

    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
