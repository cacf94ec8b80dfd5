"""Print the exact on-disk layout of a Megatron-Bridge torch_dist checkpoint (written by
scripts/bridge_optim_spike.py): files, torch.distributed.checkpoint `.metadata`, the common state
(mcore 0.19: a `common_state` ShardedObject inside the .distcp, legacy: common.pt), the rng_state
ShardedObject, metadata.json, train_state.pt / latest_train_state.pt / tracker file.

    python scripts/bridge_optim_inspect.py [CKPT_ROOT]     (default /work/bridge-optim-spike/ckpt)

Needs only torch (run with the oracle venv to be able to unpickle mcore objects if any).
"""
import io
import json
import pickle
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/bridge-optim-spike/ckpt")
iters = sorted(root.glob("iter_*"))
it_dir = iters[-1]


def hdr(t):
    print("\n" + "=" * 100 + f"\n{t}\n" + "=" * 100)


def show(obj, path="", depth=0, out=None):
    """Every key path with type and (small) value."""
    pad = "  " * depth
    if isinstance(obj, dict):
        print(f"{pad}{path or '<root>'}: dict[{len(obj)}] keys={[k for k in obj]!r}"[:400])
        for k, v in obj.items():
            show(v, f"{path}[{k!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in obj):
        print(f"{pad}{path}: {type(obj).__name__}[{len(obj)}]")
        for i, v in enumerate(obj):
            show(v, f"{path}[{i}]", depth + 1)
    elif torch.is_tensor(obj):
        small = f" value={obj.tolist()}" if obj.numel() <= 16 else ""
        print(f"{pad}{path}: Tensor shape={tuple(obj.shape)} dtype={obj.dtype}{small}")
    else:
        r = repr(obj)
        print(f"{pad}{path}: {type(obj).__module__}.{type(obj).__qualname__} = {r[:300]}{'...' if len(r) > 300 else ''}")


# ---------------------------------------------------------------------------------------------
hdr(f"1. files  (root {root})")
for p in sorted(root.rglob("*")) + []:
    if p.is_file():
        print(f"  {str(p.relative_to(root)):45s} {p.stat().st_size:>10d} bytes")
for name in ("latest_checkpointed_iteration.txt",):
    print(f"  {name}: {(root / name).read_text()!r}")

# ---------------------------------------------------------------------------------------------
reader = FileSystemReader(str(it_dir))
md = reader.read_metadata()
hdr(f"2. {it_dir.name}/.metadata  (torch.distributed.checkpoint.metadata.Metadata)")
print("Metadata fields:", [f for f in vars(md)])
print("version:", getattr(md, "version", None))
print("storage_meta:", getattr(md, "storage_meta", None))
print("planner_data type:", type(md.planner_data).__name__, "len", len(md.planner_data or {}))
if md.planner_data:
    k0 = next(iter(md.planner_data))
    print(f"  planner_data example: {k0!r} -> {md.planner_data[k0]!r}")
print("storage_data: MetadataIndex -> _StorageInfo(relative_path, offset, length); entries:", len(md.storage_data))
sdm = md.state_dict_metadata
print(f"state_dict_metadata: {len(sdm)} keys "
      f"({sum(isinstance(v, TensorStorageMetadata) for v in sdm.values())} TensorStorageMetadata, "
      f"{sum(isinstance(v, BytesStorageMetadata) for v in sdm.values())} BytesStorageMetadata)")
storage_by_fqn = defaultdict(list)
for idx, info in md.storage_data.items():
    storage_by_fqn[idx.fqn].append((idx, info))


def line(k, v):
    st = storage_by_fqn.get(k, [])
    where = "; ".join(f"{i.relative_path}@{i.offset}+{i.length}" + (f" idx.offset={list(ix.offset)}" if ix.offset is not None else "")
                      for ix, i in st)
    if isinstance(v, TensorStorageMetadata):
        p = v.properties
        chunks = [(list(c.offsets), list(c.sizes)) for c in v.chunks]
        return f"  {k}\n      Tensor size={list(v.size)} dtype={p.dtype} chunks(offsets,sizes)={chunks}\n      storage: {where}"
    return f"  {k}\n      {type(v).__name__}  storage: {where}"


groups = defaultdict(list)
for k in sdm:
    top = k.split(".")[0].split("/")[0]
    groups[top].append(k)
for top, ks in groups.items():
    print(f"\n-- group '{top}': {len(ks)} keys")
# mcore stacks transformer layers: one key per sub-module with a leading [num_layers] axis
# ("decoder.layers.<...>"), one chunk per layer (two per layer for the GLU fc1 halves).
layer0 = [k for k in sdm if k.startswith(("decoder.layers.", "optimizer.state.")) and ".layers." in k]
nonlayer = [k for k in sdm if ".layers." not in k]
print(f"\n-- all layer (decoder.layers.*, stacked) keys incl. optimizer state ({len(layer0)}):")
for k in layer0:
    print(line(k, sdm[k]))
print(f"\n-- all non-layer keys ({len(nonlayer)}):")
for k in nonlayer:
    print(line(k, sdm[k]))
print("\n-- sorted list of ALL keys:")
for k in sorted(sdm):
    v = sdm[k]
    print(f"  {k}  " + (f"{list(v.size)} {v.properties.dtype} chunks={len(v.chunks)}" if isinstance(v, TensorStorageMetadata) else "BYTES"))
example = next(iter(sdm.values()))
if isinstance(example, TensorStorageMetadata):
    print("\nTensorProperties fields of one entry:", vars(example.properties))

# ---------------------------------------------------------------------------------------------
hdr("3. bytes items (ShardedObjects) inside the .distcp: raw pickled/torch.save payloads")
distcp_files = sorted(it_dir.glob("*.distcp"))
raw = {f.name: f.read_bytes() for f in distcp_files}
bytes_items = {}
for k, v in sdm.items():
    if isinstance(v, BytesStorageMetadata):
        (ix, info), = storage_by_fqn[k]
        blob = raw[info.relative_path][info.offset: info.offset + info.length]
        bytes_items[k] = blob
        print(f"  {k}: file={info.relative_path} offset={info.offset} length={info.length} "
              f"first bytes={blob[:8]!r} (zip/torch.save? {blob[:2] == b'PK'})")


def load_blob(blob):
    try:
        return torch.load(io.BytesIO(blob), weights_only=False, map_location="cpu"), "torch.load"
    except Exception as e:  # noqa: BLE001
        try:
            return pickle.loads(blob), f"pickle (torch.load failed: {e})"
        except Exception as e2:  # noqa: BLE001
            return None, f"could not decode: {e} / {e2}"


# ---------------------------------------------------------------------------------------------
hdr("4. common state (what used to be common.pt)")
if (it_dir / "common.pt").exists():
    common = torch.load(it_dir / "common.pt", weights_only=False)
    print("legacy common.pt present")
else:
    ck = [k for k in bytes_items if k.startswith("common_state")]
    print("no common.pt; common state is the bytes item(s):", ck)
    common, how = load_blob(bytes_items[ck[0]])
    print("decoded with", how, "; top-level type", type(common).__name__,
          (f"len {len(common)}" if isinstance(common, (list, tuple)) else ""))
    if isinstance(common, (list, tuple)) and len(common) == 1:
        print("(payload is a 1-element list [state_dict]; mcore load_common_state_dict returns loaded[0])")
        common = common[0]
show(common)

# ---------------------------------------------------------------------------------------------
hdr("5. rng_state and the other bytes items")
for k, blob in bytes_items.items():
    if k.startswith("common_state"):
        continue
    obj, how = load_blob(blob)
    print(f"\n-- {k}  ({len(blob)} bytes, decoded with {how})")
    show(obj, k)

# ---------------------------------------------------------------------------------------------
hdr("6. metadata.json / run_config.yaml (head) / train_state.pt / latest_train_state.pt / tracker")
print("metadata.json:", (it_dir / "metadata.json").read_text())
rc = (it_dir / "run_config.yaml").read_text().splitlines()
print(f"run_config.yaml: {len(rc)} lines; top-level sections:", [l[:-1] for l in rc if re.match(r"^[a-z_]+:\s*$", l)])
for l in rc:
    if re.match(r"^\s+(ckpt_format|save_optim|save_rng|dist_ckpt_optim_fully_reshardable|fully_parallel_save|"
                r"use_distributed_optimizer|tensor_model_parallel_size|pipeline_model_parallel_size|_target_):", l) \
            and "_target_" not in l:
        print("   ", l)
for f in (it_dir / "train_state.pt", root / "latest_train_state.pt"):
    ts = torch.load(f, weights_only=False)
    print(f"{f.relative_to(root)}: " + ", ".join(f"{k}: {v.dtype} {v.item()!r}" for k, v in ts.items()))
print("latest_checkpointed_iteration.txt:", repr((root / "latest_checkpointed_iteration.txt").read_text()))
same = (it_dir / "train_state.pt").read_bytes() == (root / "latest_train_state.pt").read_bytes()
print("train_state.pt == latest_train_state.pt byte for byte:", same)

# ---------------------------------------------------------------------------------------------
hdr("7. do param_state integer keys appear on disk?")
int_hits = [k for k in sdm if re.search(r"(^|\.)\d+(\.|$)", k) and ".layers." not in k]
print("metadata keys with a bare integer component outside '.layers.N.':", int_hits)
opt_keys = [k for k in sdm if k.startswith("optimizer")]
print("optimizer keys are named after the MODEL key (prefix 'optimizer.state.<state>.'):",
      all(k.startswith("optimizer.state.") for k in opt_keys), f"({len(opt_keys)} keys)")
ps = common.get("optimizer", {}).get("param_state", "<absent>") if isinstance(common, dict) else None
print("common_state['optimizer']['param_state'] =", repr(ps)[:400])
blob = b"".join(raw.values()) + (it_dir / ".metadata").read_bytes()
for pat in (b"param_state", b"param_state_sharding_type", b"param_idx"):
    print(f"raw byte occurrences of {pat!r} in .distcp+.metadata:", blob.count(pat))

ref = root.parent / "reference.pt"
if ref.exists():
    hdr("8. (NOT on disk) live-optimizer facts recorded by bridge_optim_spike.py in reference.pt")
    r = torch.load(ref, weights_only=False)
    print("param groups by name:")
    for g in r.get("param_groups_by_name", []):
        print(f"  sub_optimizer {g['sub_optimizer']} group {g['group']}: {g['params_in_order']}")
    print("fully_reshardable in-memory param_state integer key -> param:")
    for i, n in enumerate(r.get("param_idx_order", [])):
        print(f"  {i}: {n}")
    print("patches:", json.dumps(r.get("patches"), indent=1))
