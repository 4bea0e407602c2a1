# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.models.checkpoint. Do not edit.
"""Draft checkpoint folders, read and written as if every file in them were hostile.

Saving (`SpeculatorModel.save_pretrained`, and `convert`'s output)
    `replacing_folder(target)` yields a new folder beside `target` named `.NAME.saving-HOST-PID-RANDOM`
    (created by a plain mkdir, so its mode follows the umask) and, when the block succeeds, puts it in
    place of `target` in ONE atomic step: Linux `renameat2(RENAME_EXCHANGE)` (macOS `renamex_np(RENAME_SWAP)`)
    swaps the two folders, then the previous checkpoint is deleted. A save killed at any moment therefore
    leaves the old or the new checkpoint at NAME, complete. (A kill loses nothing the process wrote; like
    transformers' own save, nothing is fsynced, so a power loss may still lose recent writes.) Where the
    file system cannot swap, NAME is moved aside to `.NAME.previous-HOST-PID-RANDOM` and the new folder moved
    in: a death between those two renames leaves no NAME, and the next save of NAME, or loading it with
    `from_pretrained` / `load_draft`, moves the backup back (`recover_interrupted_save`). Every save first
    removes what saves of the same NAME killed on this machine left behind (their process is gone).
    `carry_over` keeps the files of the old folder that a save does not write (a tokenizer, a person's
    README.md): never weights, indexes, config or remote code (the new save defines them: a stale
    model.safetensors beside new shards would be loaded instead of them), never a symlink (copying one
    would turn a link to a secret into a real file of the checkpoint) and never a special file.

Loading (`SpeculatorModel.from_pretrained`, `convert`)
    `checkpoint_weight_files` finds the safetensors files a load reads, the way transformers does
    (`model.safetensors`, else the shards of `model.safetensors.index.json`), and refuses an index entry
    that is absolute, contains `..` or resolves (symlinks included) outside the folder (`check_inside`:
    a Hub cache snapshot may link into its repo's `blobs/`). `safetensors_header` reads names, dtypes and
    shapes without reading data; `meta_model` builds the model on the meta device (no memory) to
    learn the tensors a config implies, and `weight_problems` compares the two, so a config that claims
    far more than the file holds is refused before anything is allocated. After loading,
    `non_finite_tensors` names NaN/inf weights.

Uploading (`speculators_hf.hub.push_to_hub`) takes `CHECKPOINT_FILES` only.

Part of the remote-code bundle: imports third-party packages and sibling modules only.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Files a save writes. The new save defines them, so they are never carried over from the folder saved
# into; weights of any format are included (the new safetensors replace them).
WRITTEN_BY_SAVE = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "speculators_*.py",  # remote code (remote_code.py)
)
# The files of a published checkpoint: what `push_to_hub` uploads. Written by save_pretrained (config,
# weights, remote code, model card), write_custom_generate, the trainer (training_summary.json) and a
# tokenizer's save_pretrained; a license may be added by hand. Anything else is skipped and listed.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "speculators_*.py",
    "README.md",
    "training_summary.json",
    "custom_generate/generate.py",
    "custom_generate/requirements.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "LICENSE",
    "LICENSE.md",
    "LICENSE.txt",
    "NOTICE",
)
# A path part that is plain to read: no leading dot, no spaces or control characters, nothing a terminal,
# a Hub URL or another file system would show differently.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def matches(relative: str, patterns: Iterable[str]) -> bool:
    """True when the relative POSIX path `relative` matches one of `patterns` part by part (a `*` never
    spans a `/`), and every part is a plain name."""
    parts = PurePosixPath(relative).parts
    if not parts or not all(_PLAIN_NAME.fullmatch(part) for part in parts):
        return False
    for pattern in patterns:
        wanted = PurePosixPath(pattern).parts
        if len(wanted) == len(parts) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted)):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# saving: a new folder replaces the old one in one step
# --------------------------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _temp_name(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftovers(target: Path) -> list[tuple[Path, str]]:
    """(path, kind) of the temporary folders that saves of `target` by processes of this machine that are
    gone left beside it: `.NAME.KIND-HOST-PID-RANDOM`, and the nested `..NAME.saving-....saving-...` of a save
    into such a folder (`convert` saves into its own temporary folder), whose every PID must be gone."""
    step = rf"\.(saving|previous)-{_host()}-(\d+)-[0-9a-f]{{8}}"
    pattern = re.compile(rf"(\.+){re.escape(target.name)}((?:{step})+)")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = pattern.fullmatch(entry.name)
            if not match or not entry.is_dir(follow_symlinks=False):
                continue
            steps = re.findall(step, match[2])
            if len(match[1]) == len(steps) and not any(_process_alive(int(pid)) for _, pid in steps):
                found.append((Path(entry.path), steps[0][0] if len(steps) == 1 else "nested"))
    return found


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell: keep its folder
    return True


def recover_interrupted_save(target: str | os.PathLike) -> bool:
    """Put back the checkpoint a save moved aside and died before replacing (only possible where the file
    system cannot swap folders atomically): when `target` is missing and a killed save of it left its
    backup `.NAME.previous-...`, the backup becomes `target` again. Returns True when it did."""
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return False
    backups = [path for path, kind in _leftovers(target) if kind == "previous"]
    if not backups:
        return False
    newest = max(backups, key=lambda p: p.stat().st_mtime)
    newest.rename(target)
    warnings.warn(
        f"{target} was missing: a save of it was killed while replacing it; the previous checkpoint was restored "
        f"from {newest.name}",
        stacklevel=2,
    )
    return True


def remove_leftovers(target: Path) -> None:
    """Restore a checkpoint lost between two renames, then delete every temporary folder that killed saves
    of `target` left beside it."""
    recover_interrupted_save(target)
    for path, _ in _leftovers(target):
        shutil.rmtree(path, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2
_SWAP: Any = None


def _swap_function() -> Any:
    """libc's atomic folder exchange as (call(a, b) -> 0 on success, its name), or None where there is none."""
    global _SWAP
    if _SWAP is None:
        _SWAP = False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if sys.platform.startswith("linux"):
                renameat2 = libc.renameat2  # glibc >= 2.28
                renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _SWAP = (lambda a, b: renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE), "renameat2")
            elif sys.platform == "darwin":
                renamex_np = libc.renamex_np
                renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
                _SWAP = (lambda a, b: renamex_np(a, b, _RENAME_SWAP), "renamex_np")
        except (OSError, AttributeError):
            _SWAP = False
    return _SWAP or None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically. False (nothing done) where the OS or file system cannot."""
    swap = _swap_function()
    if swap is None:
        return False
    if swap[0](os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"{swap[1]} failed: {os.strerror(code)}", str(a), None, str(b))


def save_target(save_directory: str | os.PathLike) -> Path:
    """The folder a save replaces, resolved before anything is written (`sub/..` is its parent folder, a
    symlink is its target), so the temporary folder beside it never lies inside it."""
    target = Path(save_directory).expanduser().resolve()
    if target.parent == target:
        raise ValueError(f"cannot save a checkpoint as {target}: give a folder below it")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    return target


@contextlib.contextmanager
def replacing_folder(target: Path) -> Iterator[Path]:
    """Yield a new, empty folder beside `target` (a resolved path, see `save_target`); when the block
    succeeds it replaces `target` atomically (see the module docstring), otherwise it is deleted and
    `target` is left as it was. The new folder gets the mode of the folder it replaces, else the umask's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    while True:
        work = target.with_name(_temp_name(target, "saving"))
        try:
            work.mkdir()
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        if target.is_dir():
            work.chmod(target.stat().st_mode & 0o7777)
        yield work
        if not target.is_dir():
            work.rename(target)
        elif not exchange(work, target):
            backup = target.with_name(_temp_name(target, "previous"))
            target.rename(backup)
            # a death here leaves no `target`: recover_interrupted_save puts the backup back
            work.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the failed new folder, or after a swap the previous checkpoint


def carry_over(source: Path, destination: Path) -> list[str]:
    """Copy the files of the checkpoint folder `source` that a save does not write into `destination`:
    regular files and folders only, never `WRITTEN_BY_SAVE` at the top level, never a symlink or a special
    file (warned about by name). Returns the relative paths not carried over."""
    skipped: list[str] = []

    def walk(src: Path, dst: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_symlink():
                skipped.append(rel)
            elif entry.is_dir(follow_symlinks=False):
                (dst / entry.name).mkdir()
                walk(Path(entry.path), dst / entry.name, rel + "/")
                shutil.copystat(entry.path, dst / entry.name, follow_symlinks=False)
            elif entry.is_file(follow_symlinks=False):
                if not (prefix == "" and any(fnmatch.fnmatchcase(entry.name, p) for p in WRITTEN_BY_SAVE)):
                    shutil.copy2(entry.path, dst / entry.name, follow_symlinks=False)
            else:
                skipped.append(rel)

    walk(source, destination, "")
    if skipped:
        warnings.warn(
            f"not carried over into the new save of {source}: {skipped}. Symbolic links and special files are never "
            "copied by save_pretrained (a link would become a real file holding its target); put a real copy of any "
            "you need into the folder after saving.",
            stacklevel=3,
        )
    return skipped


# --------------------------------------------------------------------------------------------------
# loading: which files, and what they hold, before anything is allocated
# --------------------------------------------------------------------------------------------------
class UnsafeCheckpointError(ValueError):
    """A checkpoint names a file outside its folder."""


def allowed_roots(root: Path) -> list[Path]:
    """Where the files of the checkpoint folder `root` may really lie: inside it, and for a Hub cache
    snapshot (`<repo>/snapshots/<revision>/...`, whose files are links) in that repo's `blobs/`."""
    roots = [root.resolve()]
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            blobs = folder.parent.parent / "blobs"
            if blobs.is_dir() and not blobs.is_symlink():
                roots.append(blobs.resolve())
            break
    return roots


def check_inside(path: Path, root: Path, what: str) -> Path:
    """`path` itself, after checking that it resolves (symlinks included) inside `root` (`allowed_roots`)."""
    real = path.resolve()
    if not any(real == r or r in real.parents for r in allowed_roots(root)):
        raise UnsafeCheckpointError(
            f"{what} {path} resolves to {real}, outside the checkpoint folder {root}: a checkpoint may only read its own "
            "files. Copy the file into the folder (replacing the link) if it is really part of this checkpoint."
        )
    return path


def shard_names(index_path: Path) -> list[str]:
    """The shard file names of a `*.index.json`, refusing absolute names, `..` and unusual names."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnsafeCheckpointError(f"{index_path} is not a valid weight index ({type(err).__name__}: {err})") from err
    names = sorted(set(weight_map.values()))
    for name in names:
        path = PurePosixPath(name)
        if path.is_absolute() or "\\" in name or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
            raise UnsafeCheckpointError(
                f"{index_path.name} names the shard {name!r}, which points outside the checkpoint folder (an absolute path "
                "or '..'); an index may only name files inside its folder. The checkpoint is corrupt or crafted."
            )
    return names


def folder_weight_files(
    root: Path, index_names: Sequence[str], single_names: Sequence[str], what: str = "checkpoint"
) -> list[Path]:
    """The weight files of the local folder `root`: the shards of the first index of `index_names` that
    exists, else the first of `single_names` that exists; each checked to lie inside `root`."""
    for index in index_names:
        if (root / index).is_file():
            check_inside(root / index, root, f"{what} index")
            return [check_inside(root / name, root, f"{what} shard") for name in shard_names(root / index)]
    for name in single_names:
        if (root / name).is_file():
            return [check_inside(root / name, root, f"{what} weight file")]
    return []


def checkpoint_weight_files(name_or_path: Any, variant: str | None = None, **download: Any) -> list[Path]:
    """The safetensors files `from_pretrained(name_or_path)` reads (downloaded if needed): `model.safetensors`,
    else the shards named by `model.safetensors.index.json`; [] when there is neither (transformers then
    reports the missing file itself)."""
    from transformers.utils import cached_file

    single, index = SAFETENSORS_FILE, SAFETENSORS_INDEX
    if variant:
        single, index = f"model.{variant}.safetensors", f"model.safetensors.index.{variant}.json"
    local = Path(str(name_or_path), download.get("subfolder") or "")
    if local.is_dir():
        return folder_weight_files(local, [index], [single])
    quiet = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    found = cached_file(str(name_or_path), single, **quiet, **download)
    if found is not None:
        return [check_inside(Path(found), Path(found).parent, "weight file")]
    index_file = cached_file(str(name_or_path), index, **quiet, **download)
    if index_file is None:
        return []
    files = []
    for name in shard_names(Path(index_file)):
        shard = cached_file(str(name_or_path), name, **download)
        if shard is None:  # pragma: no cover - cached_file raises for a missing entry without the quiet flags
            raise OSError(f"{name_or_path}: {name}, named by {index}, is missing")
        files.append(check_inside(Path(shard), Path(index_file).parent, "checkpoint shard"))
    return files


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint holds (or a model expects) under one name: shape and dtype class."""

    shape: tuple[int, ...]
    kind: str  # "float", "integer", "bool" or "other"
    dtype: str = ""
    aliases: tuple[str, ...] = ()  # names of the same tensor (tied weights): any one of them is enough


def dtype_kind(dtype: torch.dtype | str) -> str:
    """The class of a torch dtype or a safetensors dtype name ("F32", "BF16", "I64", "BOOL", ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "bool"
        if dtype.is_floating_point:
            return "float"
        return "other" if dtype.is_complex else "integer"
    name = dtype.upper()
    if name == "BOOL":
        return "bool"
    if name.startswith(("F", "BF")):
        return "float"
    if name.startswith(("I", "U")):
        return "integer"
    return "other"


def safetensors_header(files: Sequence[Path]) -> dict[str, TensorInfo]:
    """Name -> shape and dtype of every tensor in `files`, read from their headers (no tensor data is read)."""
    from safetensors import safe_open

    found: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                names = f.keys()  # a safe_open handle is not iterable
                for name in names:
                    if name in found:
                        raise UnsafeCheckpointError(f"tensor {name!r} is in both {where[name].name} and {path.name}")
                    piece = f.get_slice(name)
                    dtype = piece.get_dtype()
                    found[name] = TensorInfo(tuple(int(n) for n in piece.get_shape()), dtype_kind(dtype), dtype)
                    where[name] = path
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            raise UnsafeCheckpointError(f"{path} is not a valid safetensors file: {err}") from err
    return found


def meta_model(model_class: Any, config: Any) -> Any:
    """`model_class(config)` built on the meta device: its tensors have shapes and dtypes but no memory, so a
    config claiming terabytes costs nothing here (counts of layers and heads are bounded by the config's
    schema, so building is quick too)."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = model_class(copy.deepcopy(config))
        model.tie_weights()  # as loading does: a tied tensor is saved once (e.g. an LM head tied to its embedding)
    return model


def tensor_infos(model: torch.nn.Module) -> dict[str, TensorInfo]:
    """Name -> shape and dtype class of every tensor of `model`'s state dict, with the names it shares a
    tensor with (tied weights)."""
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    return {
        name: TensorInfo(
            tuple(tensor.shape),
            dtype_kind(tensor.dtype),
            str(tensor.dtype).removeprefix("torch."),
            tuple(n for n in groups[id(tensor)] if n != name),
        )
        for name, tensor in state.items()
    }


def weight_problems(
    expected: Mapping[str, TensorInfo],
    found: Mapping[str, TensorInfo],
    owner: str = "config",
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per tensor that is missing, unexpected, of another shape or of another dtype class than
    the model expects (the lines `SpeculatorLoadError` and `convert` print). `names` shows a tensor under
    another name (the source format's); tied tensors (`aliases`) need only one of their names."""
    show = names or {}
    lines = []
    for name, want in expected.items():
        got = found.get(name)
        if got is None:
            if not any(alias in found for alias in want.aliases):
                lines.append(f"  missing {name}: expected shape {want.shape}")
        elif got.shape != want.shape:
            lines.append(f"  {show.get(name, name)}: checkpoint has shape {got.shape}, config expects {want.shape}")
        elif got.kind != want.kind:
            lines.append(
                f"  {show.get(name, name)}: checkpoint has dtype {got.dtype} ({got.kind}), config expects "
                f"{'an' if want.kind == 'integer' else 'a'} {want.kind} tensor (it would be cast silently)"
            )
    lines += [f"  unexpected {show.get(n, n)}: this {owner} has no such tensor" for n in found if n not in expected]
    return lines


def non_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (two reductions each, no full-size copy)."""
    broken = []
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        try:
            finite = bool(torch.isfinite(tensor.amax())) and bool(torch.isfinite(tensor.amin()))
        except RuntimeError:  # dtypes without min/max kernels (e.g. float8 on some devices)
            finite = bool(torch.isfinite(tensor.float()).all())
        if not finite:
            broken.append(name)
    return broken
