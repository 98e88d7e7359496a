"""Read, validate and save DBRX checkpoints in HF format (config.json + safetensors shards + index), streaming.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards
`model-00001-of-0000N.safetensors` listed in `model.safetensors.index.json`. Every file header is checked
against the model's expected names and shapes before any weight is read (`checkpoint_tensors`,
`validate_checkpoint`); `read_weights` then copies tensors one at a time into a model allocated once (peak
RAM ~ model + one tensor + one mapped shard). Pickle files are never read.

Building a model from a preset or a folder (and accelerate dispatch) is `dbrx_lab.loading.load_model`; this
module imports only `config`, so that the model classes may import it (DbrxLM.save_pretrained).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import DbrxConfig, read_json

__all__ = ["save_pretrained", "checkpoint_tensors", "checkpoint_files", "read_config", "validate_checkpoint",
           "read_weights", "resolve_dtype", "dtype_name", "current_umask", "temp_path", "sweep_temps", "write_safetensors"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0         # absolute byte offset of the data in the file (the expert-offload runtime reads ranges)


def read_config(folder: Path) -> DbrxConfig:
    """config.json of a checkpoint folder; eos ids from generation_config.json win (as in HF generate)."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: a checkpoint folder needs config.json and "
                                f"{SINGLE_FILE} (or shards listed in {INDEX_FILE})")
    cfg = DbrxConfig.from_pretrained(folder)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        if not isinstance(gen, dict):
            raise ValueError(f"{gen_path} must hold a JSON object, got {type(gen).__name__}")
        eos = gen.get("eos_token_id")
        if eos is not None:
            ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
            if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) and
                                                    e >= 0 for e in ids):
                raise ValueError(f"{gen_path}: eos_token_id must be a token id >= 0 or a list of them, got {eos!r}")
            cfg.eos_token_id = list(ids)
    return cfg


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, in order, and the index's weight_map (None: single file)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        try:
            weight_map = dict(index["weight_map"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{index_path} is not a valid safetensors index ({err!r})") from None
        for name, file in weight_map.items():
            if not isinstance(name, str) or not isinstance(file, str) or not _plain_file_name(file):
                raise ValueError(f"{index_path}: weight_map[{name!r}] = {file!r} is not a file name inside the "
                                 f"checkpoint folder (no folders, '..' or absolute paths)")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shard(s) that are not in {folder}: {', '.join(missing)}")
        return files, weight_map
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded; convert them to safetensors)" \
        if pickles else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")


def _plain_file_name(name: str) -> bool:
    """A bare file name (what HF indexes hold): no separator, not '.', '..' or empty, no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name \
        and not os.path.isabs(name)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo from a safetensors header; ValueError naming the file if it is truncated or corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file (unreadable header)")
    header.pop("__metadata__", None)
    infos, end, name = {}, 0, None
    try:
        for name, entry in header.items():
            dtype = _ST_DTYPES[entry["dtype"]]
            if not isinstance(entry["shape"], list) or not all(type(s) is int and s >= 0 for s in entry["shape"]):
                raise ValueError
            shape = tuple(entry["shape"])
            begin, stop = entry["data_offsets"]
            if type(begin) is not int or type(stop) is not int or not 0 <= begin <= stop or \
                    stop - begin != dtype.itemsize * math.prod(shape):
                raise ValueError
            infos[name] = TensorInfo(shape, dtype, path, 8 + n + begin)
            end = max(end, stop)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is not a valid safetensors file (bad header entry for {name!r})") from None
    if 8 + n + end != size:
        raise ValueError(f"{path} is {size} bytes but its header describes {8 + n + end} bytes: the file is "
                         f"truncated or corrupt")
    return infos


def checkpoint_tensors(folder: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of a checkpoint folder; reads headers only."""
    folder = Path(folder)
    found: dict[str, TensorInfo] = {}
    files, weight_map = checkpoint_files(folder)
    for path in files:
        for name, info in read_header(path).items():
            if name in found:
                raise ValueError(f"tensor {name!r} is in both {found[name].file.name} and {path.name}")
            found[name] = info
    if weight_map is not None:
        wrong = [f"{name} (index: {file}, found: {found[name].file.name if name in found else 'nowhere'})"
                 for name, file in weight_map.items() if name not in found or found[name].file.name != file]
        if wrong:
            raise ValueError(f"{folder / INDEX_FILE} does not match its shards: {'; '.join(wrong)}")
    return found


def validate_checkpoint(model: torch.nn.Module, found: dict[str, TensorInfo], folder: Path) -> None:
    """Raise one ValueError naming every missing, unexpected and misshapen tensor (expected vs found shape)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    problems = []
    missing = [n for n in expected if n not in found and n not in optional]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    unexpected = [f"{n} (in {info.file.name})" for n, info in found.items() if n not in expected]
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    misshapen = [f"{n}: expected {list(expected[n])}, found {list(info.shape)} in {info.file.name}"
                 for n, info in found.items() if n in expected and info.shape != expected[n]]
    if misshapen:
        problems.append(f"misshapen tensors: {'; '.join(misshapen)}")
    not_float = [f"{n} ({info.dtype})" for n, info in found.items() if n in expected and
                 not info.dtype.is_floating_point]
    if not_float:
        problems.append(f"non-float tensors: {', '.join(not_float)}")
    if problems:
        raise ValueError(f"checkpoint {folder} does not fit its config.json (d_model={model.config.d_model}, "
                         f"n_layers={model.config.n_layers}, vocab_size={model.config.vocab_size}):\n  "
                         + "\n  ".join(problems))


def read_weights(model: torch.nn.Module, found: dict[str, TensorInfo]) -> None:
    """Copy every tensor of a validated checkpoint (`checkpoint_tensors`) into the model's allocated
    parameters, one safetensors file open at a time and one tensor at a time."""
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for path in dict.fromkeys(info.file for info in found.values()):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in (n for n, info in found.items() if info.file == path):
                    params[name].copy_(f.get_tensor(name))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype from a dtype, its name ("bfloat16", "torch.float32") or None / "auto" (None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------
# saving
def parse_size(size: int | str) -> int:
    """Bytes from an int or "5GB" / "500MB" / "2GiB" / "100KB" (HF convention: GB = 1e9, GiB = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or like '5GB', '500MB', '2GiB'; got {size!r}")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return max(1, int(float(m.group(1)) * base ** power))


def plan_shards(nbytes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most max_bytes (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in nbytes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write config.json, generation_config.json and safetensors weights (sharded + index above max_shard_size).

    The files are written to a temporary folder next to `folder` and moved in place with atomic renames;
    weight files of an earlier save that the new one does not use are removed. An existing folder must be
    empty, a DBRX checkpoint, or hold none of the files a save writes (nothing else is overwritten). Files
    and a new folder get the permissions the umask allows (0666 / 0777 & ~umask). Returns the folder.
    """
    folder = Path(folder)
    if getattr(model, "expert_runtime", None) is not None:
        raise ValueError("save_pretrained: this model's experts are offloaded (load_model(..., experts='offload')) "
                         "and only read from their checkpoint; copy that checkpoint folder, or load the model with "
                         "experts='resident' to save it")
    dtype = resolve_dtype(dtype) or model.dtype
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    on_meta = [n for n, t in state.items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"cannot save: {len(on_meta)} tensors are on the meta device (offloaded or never loaded), "
                         f"e.g. {on_meta[0]}; load the model without disk offload to save it")
    sizes = {n: t.numel() * dtype.itemsize for n, t in state.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    _check_target_folder(folder)

    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(folder)
    tmp = temp_path(folder)
    os.mkdir(tmp, 0o777)                                    # the umask applies (mkdtemp would make it 0700)
    try:
        for file, shard in zip(names, shards):
            tensors = {n: state[n].detach().to(device="cpu", dtype=dtype).contiguous() for n in shard}
            _write_file(tmp / file, lambda f: write_safetensors(f, tensors, {"format": "pt"}))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
            _write_text(tmp / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        cfg = dataclasses.replace(model.config, torch_dtype=dtype_name(dtype))
        _write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.eos_token_id:
            gen = {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
            _write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        _fsync_dir(tmp)
        _move_into(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _written_names(folder: Path) -> list[Path]:
    """Files in `folder` that a save writes or replaces."""
    return [p for p in [folder / "config.json", folder / "generation_config.json", folder / INDEX_FILE,
                        *folder.glob("model*.safetensors")] if p.exists()]


def _check_target_folder(folder: Path) -> None:
    """Refuse a target whose files a save would overwrite unless it is a DBRX checkpoint (never clobber a
    file dbrx-lab did not write: another model's config.json, a file where the folder should be)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save to {folder}: it exists and is not a folder")
    if not folder.is_dir():
        return
    ours = _written_names(folder)
    if not ours:
        return
    config = folder / "config.json"
    try:
        is_dbrx = isinstance(data := read_json(config), dict) and data.get("model_type") == "dbrx"
    except (ValueError, OSError):
        is_dbrx = False
    if not is_dbrx:
        raise ValueError(f"cannot save to {folder}: it holds {', '.join(p.name for p in ours)} but is not a DBRX "
                         f"checkpoint (no config.json with model_type 'dbrx'); save to a new or empty folder")


def _move_into(tmp: Path, folder: Path) -> None:
    """Move tmp's files into folder (one rename when folder is new), weights first and config.json last;
    then drop weight files of an earlier save that the new one does not use."""
    if not folder.exists():
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
        return
    new = {p.name for p in tmp.iterdir()}
    for name in sorted(new, key=lambda n: (not n.endswith(".safetensors"), n == "config.json")):
        os.replace(tmp / name, folder / name)
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        if stale.name not in new and stale.is_file():
            stale.unlink()
    _fsync_dir(folder)


# ------------------------------------------------------------------------------------------------
# atomic files: temporary names next to the target, swept when their writer is gone
def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_HOST = socket.gethostname().replace("-", "_") or "host"


def temp_path(target: Path) -> Path:
    """A hidden temporary name beside `target` (same file system, so os.replace is atomic) that names its writer:
    `.{target}.tmp-{host}-{pid}-{random}`; `sweep_temps` removes the ones whose writer died."""
    return target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def sweep_temps(target: Path) -> list[Path]:
    """Remove temporaries of `target` (see temp_path) left by a killed writer of this host; -> removed paths.
    Only names this module makes are touched; ones of a live process or another host are left alone."""
    removed = []
    prefix = f".{target.name}.tmp-"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        parts = entry.name[len(prefix):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _write_file(path: Path, write) -> None:
    """Create `path` (new, mode 0666 & ~umask) and fill it with write(file); flushed to disk before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    _write_file(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the safetensors format to an open binary file, one tensor at a time from its own memory
    (safetensors' save_file first copies every tensor into bytes). Larger items first, so each tensor's data
    is aligned to its item size (the header is padded to 8 bytes, as safetensors does)."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name in order:
        t = tensors[name].detach()
        if t.numel():
            t = t.cpu().contiguous()                     # a copy only for a non-contiguous or device tensor
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
