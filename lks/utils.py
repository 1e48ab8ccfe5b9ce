"""Small shared helpers: seeding, device resolution, atomic file writes, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA). Called explicitly, never at import."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0, with a backward that is the same bit for bit run after run.

    Autograd turns ``x[index]`` into ``index_put_(accumulate=True)``, which on a CPU with more than
    one thread adds the gradients of a repeated index in whatever order the threads reach them
    (float addition is not associative: two fits of one seed differed by up to 0.011 in a weight).
    ``index_select``'s backward (``index_add_``) adds them in index order. Use it wherever an index
    repeats and a gradient flows back (a subject's block read by each of its training rows).
    """
    return x.index_select(0, index)


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str,
            left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists right-padded (``left``: left-padded, for generation) to one batch:
    ``(input_ids [b, T], attention_mask [b, T])``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def length_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices into ``lengths``, shortest first, in batches of ``size``: padding a batch to its
    longest item then costs little. The sort is stable (equal lengths keep their order), so the
    batches, and every padded tensor built from them, are the same on every run."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[b:b + size] for b in range(0, len(order), size)]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def umasked(mode: int) -> int:
    """``mode`` less the process umask: the permissions ``open`` or ``mkdir`` would give a new file.
    ``tempfile`` (and safetensors) create files 0600 and directories 0700; the atomic writers
    below chmod their temporary to this, so a result, editor or download is as readable as any
    other new file."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mode & ~mask


def temp_sibling(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``path`` (same file system, so ``os.replace``
    is atomic), with the permissions a new file gets (:func:`umasked`), not tempfile's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, umasked(0o666))
    return fd, tmp


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling, then swap it into place.

    A crash inside the block leaves any previous ``final`` untouched (the temporary directory is
    removed). The swap is two renames (old -> backup, new -> final), so at every instant either
    the old or the new complete directory exists under ``final`` or its backup name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(umasked(0o777))
        yield tmp
        backup = final.parent / f".{final.name}.old"
        if backup.exists():
            _rmtree(backup)
        if final.exists():
            final.rename(backup)
        tmp.rename(final)
        if backup.exists():
            _rmtree(backup)
    except BaseException:
        _rmtree(tmp)
        raise


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) with stable formatting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_sibling(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically (temp file + rename): a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.chmod(umasked(0o666))  # safetensors creates its files 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``TrainConfig.precision`` to ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` picks bfloat16 where the hardware computes it natively - a CUDA GPU with bf16
    support, or a CPU with AMX or AVX-512-BF16 (measured ~1.9x faster training steps on such a
    CPU) - and float32 elsewhere (emulated bfloat16 would be slower than float32).
    """
    if precision in ("float32", "bfloat16"):
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be 'float32', 'bfloat16' or 'auto', got {precision!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if dev.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        native = any(bool(getattr(cpu, name, lambda: False)())
                     for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        return "bfloat16" if native else "float32"
    return "float32"


def release_memory(collect: bool = True) -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    The precompute of a large fit runs batches of growing length (they are sorted by length), so
    each batch's short-lived tensors are a little larger than the holes the previous ones left,
    and glibc's heap keeps growing although little of it is live. Measured at 1,000 CounterFact
    edits (caches 0.35 GiB): without trims the precompute peaked at 2.69 GiB RSS (2.55 GiB after
    it, 1.31 GiB after one trim); with a trim every 4 batches it peaks at 1.82 GiB, same speed.
    ``collect`` also runs the cyclic garbage collector first.
    """
    import ctypes
    import ctypes.util
    import gc
    import sys

    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        pass


MADV_PAGEOUT = 21  # Linux >= 5.4 (<sys/mman.h>)


def page_out(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the kernel to reclaim the memory pages of ``tensors`` now (Linux ``madvise(MADV_PAGEOUT)``;
    a no-op elsewhere); returns the bytes asked for. For tensors that a phase will not read.

    Their contents never change: a clean page of a file mapping (the model's weights, mmapped from
    a safetensors file) is read back from the file on the next access, a written one is only
    swapped out (or, without swap, kept). A page that another process maps too stays; so does the
    partial page at each end of a tensor."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return 0
    page, asked = os.sysconf("SC_PAGE_SIZE"), 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = -(-t.data_ptr() // page) * page  # whole pages inside the tensor only
        end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
        if end > start and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT) == 0:
            asked += end - start
    return asked


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit of the checkout ``root`` (default: the one holding ``lks``) and whether files (tracked, or untracked and
    not ignored) outside ``notebooks/``, ``results/`` and ``figures/`` (which a notebook run rewrites), ``runs/`` (a
    running grid's carried state) and ``benchmarks/results/`` (the records benchmarks write) differ from it."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    commit = _git(root, "rev-parse", "HEAD")
    changed = _git(root, "status", "--porcelain", "--", ".",
                   ":(exclude)notebooks", ":(exclude)results", ":(exclude)figures", ":(exclude)runs",
                   ":(exclude)benchmarks/results")
    return {"commit": commit, "dirty": None if changed is None else bool(changed)}


def machine() -> dict[str, Any]:
    """CPU, cores, torch threads, accelerator and library versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def starts(lengths: Iterable[int]) -> tuple[list[int], int]:
    """Start offsets of consecutive blocks of the given lengths in one packed tensor, and the total."""
    out, total = [], 0
    for n in lengths:
        out.append(total)
        total += n
    return out, total


class peak_rss:
    """Context manager: the peak resident memory (MiB) of the process within the block, as
    ``{"peak_rss_mb": ..., "peak_rss_scope": ...}``. Linux resets the high-water mark
    (``/proc/self/clear_refs``), so the peak is the block's own; elsewhere it is the process's."""

    def __enter__(self) -> dict[str, Any]:
        self.out: dict[str, Any] = {}
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "cell"
        except OSError:
            self.scope = "process"
        return self.out

    def __exit__(self, *exc: Any) -> None:
        mb = None
        if self.scope == "cell":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    mb = int(line.split()[1]) / 1024
        if mb is None:
            mb, self.scope = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process"
        self.out.update(peak_rss_mb=round(mb, 1), peak_rss_scope=self.scope)


def code_version() -> str | None:
    """The checkout's git commit, ``-dirty`` when its code differs from it (None outside git)."""
    state = git_state()
    return state["commit"] and state["commit"] + ("-dirty" if state["dirty"] else "")


def provenance(code: str | None) -> dict[str, Any]:
    """The code's version, the machine (CPU, cores, torch threads, GPU, versions) and the date."""
    return {"git_commit": code, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

