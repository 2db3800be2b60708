"""Finding the model a request names: a local folder, or a Hugging Face id already in the local cache.

Nothing is ever downloaded: a model that is not on this machine is refused at submit time, not
minutes later in the trainer.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

from posttrain.domain.recipes import LoRA
from posttrain.errors import InvalidRequest
from posttrain.services.paths import FileAreas, resolve_inside


def _cached_snapshot(model_id: str, hf_cache: Path) -> Path | None:
    """The newest snapshot of ``org/name`` in a Hugging Face hub cache, if any."""
    repo = hf_cache / f"models--{model_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1].parent if snapshots else None


def resolve_model(
    name: str | None,
    *,
    model_roots: list[Path],
    hf_cache: Path,
    trust_remote_code: bool,
    field: str = "model",
    allow_adapter: bool = False,
    areas: FileAreas | None = None,
) -> tuple[Path, Path | None]:
    """The model folder to load, and the LoRA adapter folder to merge into it first (if ``name``
    is an adapter checkpoint, e.g. a finished SFT job's, and ``allow_adapter``).

    Model roots are the operator's, shared read-only by every tenant; given the caller's
    ``areas``, a folder inside another tenant's file area is refused as if it were outside them."""
    if not name:
        raise InvalidRequest(f"{field}: a model is required (a local Hugging Face model folder or a cached model id)")
    if name.startswith(("/", "~", "file://")):
        folder = resolve_inside(name.removeprefix("file://"), roots=model_roots, field=field, areas=areas)
    else:
        if ".." in name.split("/") or name.count("/") > 1:
            raise InvalidRequest(f"{field}: '{name}' is neither an absolute folder path nor a model id like org/name")
        snapshot = _cached_snapshot(name, hf_cache)
        if snapshot is None:
            raise InvalidRequest(
                f"{field}: '{name}' is not in the local Hugging Face cache ({hf_cache}) and this server does not "
                "download models; pass the absolute path of a model folder instead"
            )
        folder = snapshot
    adapter_config = folder / "adapter_config.json"
    if allow_adapter and adapter_config.is_file() and not (folder / "config.json").is_file():
        try:
            base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidRequest(f"{field}: adapter_config.json of '{name}' names no base model: {exc}") from exc
        base_folder, _ = resolve_model(base, model_roots=model_roots, hf_cache=hf_cache,
                                       trust_remote_code=trust_remote_code, field=f"{field} (its base model)",
                                       areas=areas)
        return base_folder, folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidRequest(f"{field}: '{name}' has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{field}: config.json of '{name}' cannot be read: {exc}") from exc
    if config.get("auto_map") and not trust_remote_code:
        raise InvalidRequest(
            f"{field}: '{name}' ships its own model code (auto_map in config.json); this server runs it only when the "
            "operator sets POSTTRAIN_TRUST_REMOTE_CODE=true"
        )
    return folder, None


#: What the trainer's ``ATTENTION_ALIASES`` accept for ``q_proj``: a model with one of these
#: layers takes the DPO adapter on its own attention names.
_QUERY_LAYER_NAMES = ("q_proj", "query", "wq")


def check_default_lora_targets(folder: Path, lora: LoRA | None, *, field: str) -> None:
    """Refuse at submit an adapter asking for the architecture's default targets (DPO's) on a model
    that has no q_proj-style attention layer and whose ``model_type`` peft names no default LoRA
    targets for: the trainer would fail on it at its first step. Reads config.json and the
    safetensors headers only; a model whose layer names cannot be read that way is left to the trainer."""
    if lora is None or not lora.architecture_defaults:
        return
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return
    defaults = peft_default_lora_targets()
    if defaults is None or model_type in defaults:
        return
    names = _weight_layer_names(folder)
    if names is None or names & set(_QUERY_LAYER_NAMES):
        return
    raise InvalidRequest(
        f"{field}: model type {model_type!r} has no q_proj-style attention layer and peft names no default "
        f"LoRA targets for it, so this server cannot place the preference-optimization adapter; "
        f"model types it can: {', '.join(sorted(defaults))} and any model with q_proj/k_proj/v_proj layers"
    )


@functools.lru_cache(maxsize=1)
def peft_default_lora_targets() -> dict[str, Any] | None:
    """peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, read from the installed
    peft's source rather than imported: importing peft imports torch and transformers, which the
    request path never loads. None when peft or the table cannot be found."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "utils" / "constants.py"
    try:
        tree = ast.parse(source.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
                                                    for t in node.targets):
                table = ast.literal_eval(node.value)
                return table if isinstance(table, dict) else None
    except (OSError, SyntaxError, ValueError):
        return None
    return None


#: safetensors' own bound on a header (100 MB); a file claiming more is no safetensors file, and
#: reading what it claims would be a MemoryError (a 500), not a refusal.
_MAX_SAFETENSORS_HEADER = 100_000_000


def _header_size(size: int) -> int:
    if size > _MAX_SAFETENSORS_HEADER:
        raise ValueError(f"a safetensors header of {size} bytes")
    return size


def _weight_layer_names(folder: Path) -> set[str] | None:
    """The layer names (``...self_attn.q_proj.weight`` -> ``q_proj``) of a model's safetensors
    weights, from the files' JSON headers; None when the model keeps no safetensors."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            keys = list(json.loads(index.read_text())["weight_map"])
        else:
            keys = []
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                return None
            for path in files:
                with path.open("rb") as handle:
                    (size,) = struct.unpack("<Q", handle.read(8))
                    keys += [k for k in json.loads(handle.read(_header_size(size))) if k != "__metadata__"]
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return {parts[-2] for parts in (key.split(".") for key in keys) if len(parts) >= 2}


#: Bytes a trainable adapter parameter takes as an fp32 weight (its gradient and AdamW's two
#: moments take three times that again while it trains).
_ADAPTER_BYTES_PER_PARAMETER = 4


def _shapes(config: dict[str, Any]) -> dict[str, int] | None:
    """The sizes LoRA's estimate needs, from config.json (Llama-style keys, or GPT-2's); None when
    the config does not say them."""
    hidden = config.get("hidden_size", config.get("n_embd", config.get("d_model")))
    layers = config.get("num_hidden_layers", config.get("n_layer", config.get("num_layers")))
    if not isinstance(hidden, int) or not isinstance(layers, int) or hidden < 1 or layers < 1:
        return None
    heads = config.get("num_attention_heads", config.get("n_head"))
    heads = heads if isinstance(heads, int) and heads >= 1 else 1
    head_dim = config.get("head_dim")
    head_dim = head_dim if isinstance(head_dim, int) and head_dim >= 1 else max(hidden // heads, 1)
    kv_heads = config.get("num_key_value_heads")
    kv_heads = kv_heads if isinstance(kv_heads, int) and kv_heads >= 1 else heads
    inner = config.get("intermediate_size", config.get("n_inner"))
    vocab = config.get("vocab_size")
    return {"hidden": hidden, "layers": layers, "q": heads * head_dim, "kv": kv_heads * head_dim,
            "inner": inner if isinstance(inner, int) and inner >= 1 else 4 * hidden,
            "mlp_matrices": 3 if "intermediate_size" in config else 2,
            "vocab": vocab if isinstance(vocab, int) and vocab >= 1 else 0}


def _lora_targets(lora: LoRA, shape: dict[str, int]) -> list[tuple[int, int, int]]:
    """(in, out, how many) of each linear layer the adapter targets."""
    hidden, layers = shape["hidden"], shape["layers"]
    by_module = {"q_proj": (hidden, shape["q"]), "k_proj": (hidden, shape["kv"]), "v_proj": (hidden, shape["kv"]),
                 "output_proj": (shape["q"], hidden)}
    # peft's default targets are the query and value projections (or the fused attention layer) for most types.
    attention = set(lora.attention) | ({"q_proj", "v_proj"} if lora.architecture_defaults else set())
    targets = [(*by_module[name], layers) for name in sorted(attention)]
    if lora.mlp:
        targets.append((hidden, shape["inner"], layers * shape["mlp_matrices"]))
    if lora.output and shape["vocab"]:
        targets.append((hidden, shape["vocab"], 1))
    return targets


def _base_parameters(folder: Path, shape: dict[str, int]) -> int:
    """The base model's parameter count: from its safetensors headers, else estimated from config.json."""
    counted = _safetensors_parameters(folder)
    if counted:
        return counted
    hidden, per_layer = shape["hidden"], 2 * shape["hidden"] * (shape["q"] + shape["kv"])
    per_layer += shape["mlp_matrices"] * hidden * shape["inner"]
    return shape["layers"] * per_layer + shape["vocab"] * hidden


def _safetensors_parameters(folder: Path) -> int | None:
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        total = 0
        for path in files:
            with path.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(_header_size(size)))
            for key, tensor in header.items():
                if key != "__metadata__":
                    count = 1
                    for dim in tensor["shape"]:
                        count *= int(dim)
                    total += count
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total or None


def check_adapter_size(folder: Path, lora: LoRA | None, *, field: str) -> None:
    """Refuse at submit a LoRA adapter that cannot make sense on this model: a rank above the
    smallest dimension of a layer it targets (a rank-r update of an m x n matrix has rank at most
    min(m, n), so the excess only costs memory), or an adapter with more parameters than the base
    model itself. The refusal says the estimate, rank * (in + out) summed over the targeted
    layers, in parameters and bytes. A model whose config.json does not give its sizes is left
    to the recipe's static bound and the trainer."""
    if lora is None:
        return
    try:
        shape = _shapes(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return
    if shape is None:
        return
    targets = _lora_targets(lora, shape)
    if not targets:
        return
    estimate = sum(lora.rank * (fan_in + fan_out) * count for fan_in, fan_out, count in targets)
    size = f"about {estimate:,} parameters ({estimate * _ADAPTER_BYTES_PER_PARAMETER:,} bytes as fp32 weights)"
    largest_rank = min(min(fan_in, fan_out) for fan_in, fan_out, _ in targets)
    if lora.rank > largest_rank:
        raise InvalidRequest(
            f"{field}: LoRA rank {lora.rank} is larger than this model's targeted layers allow ({largest_rank}, "
            f"their smallest dimension; hidden size {shape['hidden']}); the adapter would hold {size}. "
            f"Use a rank of at most {largest_rank} (8 to 64 is usual)")
    base = _base_parameters(folder, shape)
    if estimate > base:
        raise InvalidRequest(
            f"{field}: a LoRA adapter of rank {lora.rank} on this model would hold {size}, more than the base "
            f"model's {base:,} parameters; use a smaller rank or fewer target modules")
