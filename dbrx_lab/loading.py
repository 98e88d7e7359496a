"""`load_model`: a DbrxLM from a preset or an HF-format checkpoint folder, whole on one device or dispatched
by accelerate (big-model inference: GPUs, CPU, disk).

Reading and validating the files is `checkpoint.py`; this module builds the model and places it.

Dispatch (`device_map=`): blocks are never split; the weights come from exactly the safetensors files that
`checkpoint.checkpoint_tensors` validated (a `pytorch_model.bin` or other pickle beside them is never read).
The model gets `hf_device_map` (module name -> device) and `execution_device`, accelerate's main device: the
first GPU of the map in module order, else the CPU. Modules mapped to "cpu" while the main device is a GPU,
and modules on "disk", are offloaded: their parameters are on meta and accelerate's hooks bring the weights
to the execution device for each call.

Automatic maps ("auto", "balanced", "sequential") keep room on each device for what a run allocates besides
the weights (`runtime_bytes`): the KV cache of the blocks that execute there and the temporaries of a prefill
of `max_batch_size` x `max_seq_len` tokens.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from .checkpoint import (INDEX_FILE, checkpoint_files, checkpoint_tensors, dtype_name, read_config, read_weights,
                         resolve_dtype, validate_checkpoint)
from .config import PRESETS, DbrxConfig
from .kernels import ATTENTION, EXPERTS
from .tokenizer import VOCAB_SIZE, load_tokenizer
from .model import Block
from .lm import DbrxLM

__all__ = ["load_model", "auto_device_map", "runtime_bytes", "main_device", "DEMO_DIR"]

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
NO_SPLIT = ["Block"]                  # accelerate must keep a block (attention + its 16 experts) whole
MAX_RANDOM_PARAMS = 2_000_000_000     # random-init presets above this are refused (dbrx-instruct: 131.6B)
DEFAULT_RESERVE_LEN = 4096            # default max_seq_len of the memory reservation (capped by the config's)
_STRATEGIES = ("auto", "balanced", "sequential")


def load_model(source: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
               seed: int = 0, max_batch_size: int = 1, max_seq_len: int | None = None,
               experts_impl: str = "auto", attn_impl: str = "auto", experts: str = "resident",
               expert_cache: int | str | None = None, expert_prefetch: bool | str = True, expert_compute: str = "auto",
               expert_host_cache: int | str = 0) -> DbrxLM:
    """A DbrxLM in eval mode from a preset name or an HF-format checkpoint folder.

    source: "demo" (the bundled trained tiny model), a config preset ("tiny", "tiny-vocab", "bench":
        random weights drawn with `seed`), or a folder with config.json + safetensors.
    dtype: torch dtype or its name; None keeps the checkpoint's stored dtype (presets: config.torch_dtype),
        except for "demo", stored in bfloat16 and loaded in float32 (CPUs without bf16 units run bf16 slowly).
    device: where to allocate the whole model (default CPU). Exclusive with device_map.
    device_map: "auto" | "balanced" | "sequential" | {module name: device} for accelerate's big-model
        inference (blocks are never split; `max_memory` caps each device, e.g. {0: "70GiB", "cpu": "200GiB"};
        modules that do not fit go to "disk" in `offload_folder`). Only the validated safetensors are read.
    max_batch_size, max_seq_len: the largest run the automatic device maps keep memory for (KV cache and
        temporaries, see `runtime_bytes`); max_seq_len defaults to min(config.max_seq_len, 4096). Ignored
        without device_map or with a dict device_map.
    experts_impl, attn_impl: kernel names (dbrx_lab.kernels; "auto" picks per call), as `model.set_kernels`.
    experts: "resident" (every weight in memory) or "offload" (dbrx_lab.offload: the dense part on `device`,
        the experts read from the checkpoint's safetensors files as routed, into a cache of whole experts):
      expert_cache: the cache's size on `device` (bytes or "8GiB"); at least one expert.
      expert_prefetch: speculatively read the next layer's experts (its routing applied to this layer's
          input): True ("adaptive": a layer's guess is read while at least half of its recent guesses were
          needed, else only scored), "always", or False.
      expert_compute: with a GPU and a host cache, "auto" computes a miss on the CPU when the cost model
          says that is sooner than copying it (rounding may differ from the GPU's); "fetch" always copies
          (the resident model's exact results); "cpu" always computes misses on the CPU.
      expert_host_cache: with a GPU, bytes of pinned host memory caching experts between the file and the GPU.
    The model gets `.tokenizer` when its vocabulary is DBRX's (100352 rows). Dispatched models get
    `.hf_device_map` and `.execution_device` (see the module doc).
    """
    if device is not None and device_map is not None:
        raise ValueError("give either device (one device) or device_map (accelerate dispatch), not both")
    if experts not in ("resident", "offload"):
        raise ValueError(f"experts must be 'resident' or 'offload', got {experts!r}")
    offload = None
    if experts == "offload":
        if device_map is not None:
            raise ValueError("experts='offload' and device_map are exclusive: the offload runtime keeps the dense part "
                             "on one device (device=) and streams the experts itself; drop device_map")
        if expert_cache is None:
            raise ValueError("experts='offload' needs expert_cache= (bytes or a size like '8GiB'): the memory on the "
                             "model's device for cached experts")
        from .offload import OffloadRuntime, parse_bytes
        OffloadRuntime.check_options(expert_prefetch, expert_compute)     # before any file is read
        offload = dict(cache=parse_bytes(expert_cache, "expert_cache"), prefetch=expert_prefetch,
                       compute=expert_compute, host=parse_bytes(expert_host_cache, "expert_host_cache"))
    elif expert_cache is not None:
        raise ValueError("expert_cache applies to experts='offload'")
    EXPERTS.check(experts_impl)
    ATTENTION.check(attn_impl)
    if isinstance(source, str) and source == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise FileNotFoundError(f"the bundled demo model is not in this install yet (expected config.json and "
                                    f"model.safetensors in {DEMO_DIR}); use load_model('tiny') for a random model")
        source = DEMO_DIR
        dtype = torch.float32 if dtype is None else dtype
    if isinstance(source, str) and source in PRESETS:
        if device_map is not None:
            raise ValueError("device_map applies to checkpoint folders; presets take device=")
        if offload is not None:
            raise ValueError(f"experts='offload' reads experts from a checkpoint folder; preset {source!r} has "
                             f"random weights in memory: save it first (model.save_pretrained(folder)) and load "
                             f"the folder")
        model = _random_model(source, resolve_dtype(dtype), device, seed)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"{str(source)!r} is neither a preset ({', '.join(['demo', *PRESETS])}) nor a "
                                    f"checkpoint folder")
        model = _load_folder(folder, dtype, device, device_map, max_memory, offload_folder, max_batch_size,
                             max_seq_len, offload)
    model.eval()
    model.set_kernels(experts=experts_impl, attention=attn_impl)
    if offload is not None:                       # the runtime wraps the chosen kernel; every layer runs "offload"
        model.expert_runtime.inner = experts_impl if experts_impl != "offload" else "auto"
        model.set_kernels(experts="offload")
    if model.config.vocab_size == VOCAB_SIZE:
        model.tokenizer = load_tokenizer()
    return model


def _random_model(name: str, dtype: torch.dtype | None, device, seed: int) -> DbrxLM:
    cfg = dataclasses.replace(PRESETS[name])
    if cfg.n_params > MAX_RANDOM_PARAMS:
        raise ValueError(f"preset {name!r} has {cfg.n_params / 1e9:.1f}B parameters: too big for random weights; "
                         f"load the released checkpoint folder, or build it empty with "
                         f"`with torch.device('meta'): DbrxLM(PRESETS[{name!r}])`")
    dtype = dtype or resolve_dtype(cfg.torch_dtype) or torch.float32
    cfg.torch_dtype = dtype_name(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DbrxLM(cfg)
    return model.to(device=device or "cpu", dtype=dtype)


def _load_folder(folder: Path, dtype, device, device_map, max_memory, offload_folder, max_batch_size,
                 max_seq_len, offload: dict | None = None) -> DbrxLM:
    cfg = read_config(folder)
    found = checkpoint_tensors(folder)
    dtype = resolve_dtype(dtype) or next(iter(found.values())).dtype
    cfg.torch_dtype = dtype_name(dtype)
    with torch.device("meta"):
        model = DbrxLM(cfg)
    if offload is not None:                         # its layout first: that error says what to do
        from .offload import ExpertStore
        offload["store"] = ExpertStore(found, cfg.n_layers, cfg.moe_num_experts, cfg.ffn_hidden_size, cfg.d_model)
    validate_checkpoint(model, found, folder)
    model.to(dtype)                                                  # meta: changes dtypes only
    if device_map is not None:
        return _dispatch(model, folder, dtype, device_map, max_memory, offload_folder, max_batch_size, max_seq_len)
    if offload is not None:
        return _load_offloaded(model, found, torch.device(device or "cpu"), dtype, offload)
    model.to_empty(device=device or "cpu")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    read_weights(model, found)
    return model


def _load_offloaded(model: DbrxLM, found: dict, device: torch.device, dtype: torch.dtype, offload: dict) -> DbrxLM:
    """The dense part on `device`; each layer's ExpertGLU swapped for an OffloadedExperts of one runtime."""
    from .offload import OffloadedExperts, OffloadRuntime

    cfg = model.config
    store = offload["store"]
    dense = {n: info for n, info in found.items() if ".ffn.experts.mlp." not in n}
    runtime = OffloadRuntime(model, store, offload["cache"], device, dtype, prefetch=offload["prefetch"],
                             compute=offload["compute"], host_cache_bytes=offload["host"])
    for i, block in enumerate(model.transformer.blocks):
        block.ffn.experts.mlp = OffloadedExperts(runtime, i, cfg.moe_num_experts, cfg.ffn_hidden_size)
    model.name_hook_points()
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    read_weights(model, dense)
    model.expert_runtime = runtime
    model.expert_cache = runtime.cache
    return model


# ------------------------------------------------------------------------------------------------
# accelerate dispatch
def _dispatch(model: DbrxLM, folder: Path, dtype, device_map, max_memory, offload_folder, max_batch_size,
              max_seq_len) -> DbrxLM:
    """accelerate big-model inference: blocks stay whole; offloaded blocks load all their weights at once."""
    from accelerate import dispatch_model, load_checkpoint_in_model

    if isinstance(device_map, str):
        device_map = auto_device_map(model, device_map, max_memory=max_memory, dtype=dtype,
                                     max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    elif not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got {device_map!r}")
    device_map = _blockwise(model, device_map)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError(f"device_map puts {[n for n, d in device_map.items() if d == 'disk']} on disk: "
                         f"give offload_folder= (a folder for the offloaded weights)")
    # Exactly the validated files: the index (sharded) or the single safetensors file. Given the folder,
    # accelerate would prefer a pytorch_model.bin lying beside them (and unpickle it).
    files, weight_map = checkpoint_files(folder)
    checkpoint = folder / INDEX_FILE if weight_map is not None else files[0]
    load_checkpoint_in_model(model, str(checkpoint), device_map=device_map, offload_folder=offload_folder,
                             dtype=dtype, offload_state_dict="disk" in device_map.values())
    main = main_device(device_map)
    if _torch_device(main).type == "cpu":
        # accelerate leaves CPU weights as views into the mapped safetensors file (8-byte aligned): CPU kernels
        # then round differently from the same weights in allocated memory (logits off by ~1e-6). Own copies
        # make the dispatched model compute exactly what the resident one does. (With a GPU main device the
        # CPU-mapped weights are only copied to the GPU for each call: they stay mapped.)
        with torch.no_grad():
            for p in model.parameters():
                if p.device.type == "cpu":
                    p.data = p.data.clone()
    dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_folder,
                   preload_module_classes=NO_SPLIT)
    model.execution_device = _torch_device(main)
    return model


def main_device(device_map: dict) -> int | str | torch.device:
    """accelerate's main (execution) device for a device map: the first device in the map's order that is not
    "cpu" or "disk" (a GPU), else "cpu"."""
    for dev in device_map.values():
        if dev not in ("cpu", "disk") and _torch_device(dev).type != "cpu":
            return dev
    return "cpu"


def _torch_device(dev) -> torch.device:
    if isinstance(dev, int):                       # accelerate: an int is an accelerator index
        accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        return torch.device(accel.type if accel is not None else "cuda", dev)
    return torch.device(dev)


def _blockwise(model: DbrxLM, device_map: dict) -> dict:
    """Split coarse entries ("", "transformer.blocks", ...) into blocks and top-level modules, more specific
    entries winning, in module order; the embedding, final norm and head are never put on disk ("disk" for
    them means "cpu": they run at every step, and are read faster from memory)."""
    out = {}

    def expand(name: str, dev) -> None:
        module = model.get_submodule(name)
        children = list(module.named_children())
        if isinstance(module, Block) or not children:
            out[name] = "cpu" if dev == "disk" and not isinstance(module, Block) else dev
        else:
            for child, _ in children:
                expand(f"{name}.{child}" if name else child, dev)

    for name in sorted(device_map, key=lambda n: len(n.split(".")) if n else 0):
        if re.match(r"transformer\.blocks\.\d+\.", name):
            raise ValueError(f"device_map entry {name!r} splits a block; map whole blocks "
                             f"('transformer.blocks.N') or larger modules")
        try:
            expand(name, device_map[name])
        except AttributeError:
            raise ValueError(f"device_map names {name!r}, which is not a module of DbrxLM") from None
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


# ------------------------------------------------------------------------------------------------
# memory reservation for automatic device maps
def runtime_bytes(cfg: DbrxConfig, dtype: torch.dtype, max_batch_size: int = 1,
                  max_seq_len: int | None = None) -> tuple[int, int]:
    """(KV cache bytes per block, temporaries bytes) of a run of max_batch_size x max_seq_len tokens.

    With B = max_batch_size, T = max_seq_len (default min(cfg.max_seq_len, 4096)), N = B * T, s the itemsize
    of `dtype`, d = d_model, H / K heads / KV heads of size D, E experts, top-k k, ffn hidden size f, V vocab:
      KV cache per block = 2 * B * T * K * D * s    (keys and values; the whole model: n_layers times that)
      temporaries = N * (4 * d + 2 * (H + 2K) * D) * s     residual stream, norms, attention output; q/k/v
                                                            and their rotated copies (one block's prefill)
                  + N * k * (3 * f + d) * s                 the routed rows of the experts: w1 and v1 outputs,
                                                            their GLU product, the expert outputs
                  + N * E * 4                               router logits (float32)
                  + B * V * 4                               next-token logits of the last position (float32)
    Not included: full [B, T, V] logits (a forward without last_only: N * V * s more) and materialized
    attention scores (recording patterns or hooks on scores/pattern: B * H * T^2 * 4 per layer).
    """
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    T = min(cfg.max_seq_len, DEFAULT_RESERVE_LEN) if max_seq_len is None else max_seq_len
    if not isinstance(T, int) or isinstance(T, bool) or not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"max_seq_len must be an integer in [1, {cfg.max_seq_len}] (the model's max_seq_len), "
                         f"got {max_seq_len!r}")
    B, s = max_batch_size, dtype.itemsize
    N, d, D = B * T, cfg.d_model, cfg.head_dim
    kv_per_block = 2 * B * T * cfg.kv_n_heads * D * s
    temporaries = (N * (4 * d + 2 * (cfg.n_heads + 2 * cfg.kv_n_heads) * D) * s
                   + N * cfg.moe_top_k * (3 * cfg.ffn_hidden_size + d) * s
                   + N * cfg.moe_num_experts * 4 + B * cfg.vocab_size * 4)
    return kv_per_block, temporaries


def auto_device_map(model: DbrxLM, strategy: str = "auto", max_memory: dict | None = None,
                    dtype: torch.dtype | None = None, max_batch_size: int = 1,
                    max_seq_len: int | None = None) -> dict:
    """accelerate's automatic device map ("auto" and "balanced": balanced over the GPUs; "sequential": fill
    them in order) for a (meta) model, leaving room on each device for the run (`runtime_bytes`).

    Every device that executes blocks keeps, besides its weights, the temporaries and the KV cache of the
    blocks it executes: a GPU those it holds, the main device (the first GPU, or the CPU when there is
    none) also those on "cpu" and "disk", which accelerate runs there. With GPUs, the CPU only stores
    weights and keeps no reserve. max_memory: {device: bytes or "20GiB"}; None: what accelerate finds free.
    Returns the map accelerate infers with max_memory minus these reserves (blocks whole).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if strategy not in _STRATEGIES:
        raise ValueError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got {strategy!r}")
    dtype = dtype or model.dtype
    kv, temporaries = runtime_bytes(model.config, dtype, max_batch_size, max_seq_len)
    memory = get_max_memory(dict(max_memory) if max_memory is not None else None)   # ints, accelerate's order
    executing = [d for d in memory if d not in ("cpu", "disk")] or (["cpu"] if "cpu" in memory else [])
    main = executing[0] if executing else None
    n_blocks = len(model.transformer.blocks)
    kv_blocks = {d: 0 for d in executing}         # KV caches reserved per device; only grows, so this ends
    while True:
        budget = dict(memory)
        for d in executing:
            budget[d] = max(0, memory[d] - temporaries - kv_blocks[d] * kv)
        if strategy != "sequential":
            budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype=dtype)
        placed = _blockwise(model, device_map)
        counts = {d: 0 for d in executing}
        for i in range(n_blocks):
            dev = placed[f"transformer.blocks.{i}"]
            dev = main if dev in ("cpu", "disk") or dev not in counts else dev
            if dev is not None:
                counts[dev] += 1
        if all(counts[d] <= kv_blocks[d] for d in executing):
            return device_map
        for d in executing:
            kv_blocks[d] = max(kv_blocks[d], counts[d])
