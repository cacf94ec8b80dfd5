"""The oracle's `check_megatron.py` on bf16 checkpoints. Its strict load ends in
`m.load_state_dict(...).missing_keys`, but megatron-core wraps a bf16 model in `Float16Module`,
whose `load_state_dict` returns None — so the script fails with an AttributeError on every bf16
fixture, Bridge's own included. This runs the same script with that wrapper returning its inner
module's result; nothing else changes (same model, same strict load, same tolerances).

    python scripts/check_megatron_bf16.py --hf HF_DIR --megatron CKPT_ROOT

Needs the oracle venv. Not needed by the build or CI.
"""
import sys
from pathlib import Path

ORACLE = Path(__file__).resolve().parents[2] / "shared" / "oracle"
sys.path.insert(0, str(ORACLE))
import mb_cpu_shim  # noqa: E402,F401
import check_megatron  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402


def load_state_dict(self, state_dict, strict=True):
    return self.module.load_state_dict(state_dict, strict=strict)


Float16Module.load_state_dict = load_state_dict
sys.exit(check_megatron.main(sys.argv[1:]))
