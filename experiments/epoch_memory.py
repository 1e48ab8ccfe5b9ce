"""Where a training epoch's memory goes: one epoch of the registered recipe from a prepared store,
with the process's RSS, glibc's heap and the peak printed at each stage (issue 36).

    python experiments/epoch_memory.py --data zsre --n 2000 --touch             # epoch peak RSS
    python experiments/epoch_memory.py --data zsre --n 2000 --steps 3           # one step on the largest batch
    python experiments/epoch_memory.py --data zsre --n 2000 --lks /tmp/base     # another checkout's lks

The first run prepares the first N edits that ``fit`` accepts (sequences, gate examples, layer-L
cache; :meth:`lks.training.Trainer.prepare`) into ``--store`` (default ``runs/epoch-memory/DATA-N``),
so that every variant, and every checkout given by ``--lks``, trains on the same cache; later runs
read it. ``--touch`` reads every weight of the model first, as a real preparation leaves them
resident. ``--steps K`` runs K steps on the batch with the most sequences instead of the epoch and
prints each step's RSS high-water mark above its start (the kernel's ``VmHWM``, reset before the
step through ``/proc/self/clear_refs``, after the freed heap is given back, so that each step
counts the pages it touches). Linux with glibc only. Seconds are printed but are not
timings unless the machine is quiet.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="zsre", choices=("counterfact", "zsre"))
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
p.add_argument("--n", type=int, default=2000, help="the first N edits that fit accepts")
p.add_argument("--store", help="the prepared store (default runs/epoch-memory/DATA-N)")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--touch", action="store_true", help="read every weight before the epoch")
p.add_argument("--steps", type=int, default=0, help="K steps on the largest batch instead of the epoch")
p.add_argument("--lks", help="import lks from this checkout instead of this one")
a = p.parse_args()
sys.path[:0] = [a.lks or str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
from bench_memory import MIB, first_without_conflicts, peak_rss  # noqa: E402

import lks  # noqa: E402
from lks.config import model_spec  # noqa: E402
from lks.editor import LKSEditor  # noqa: E402
from lks.training import Trainer  # noqa: E402
from lks.training.sequences import edit_batches  # noqa: E402
from lks.utils import release_memory, set_seed  # noqa: E402


class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (all size_t)
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2


def status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def show(stage: str) -> None:
    m = libc.mallinfo2()
    print(f"{stage}: RSS {status('VmRSS') / MIB:,.0f} MiB, heap arena {m.arena / MIB:,.0f} (in use {m.uordblks / MIB:,.0f}), "
          f"mmapped {m.hblkhd / MIB:,.0f}, peak {peak_rss() / MIB:,.0f} MiB",
          flush=True)


torch.set_num_threads(a.threads)
print(f"lks from {Path(lks.__file__).parent}, {a.threads} thread(s)")
model, tok = lks.load_model("smollm2-135m", device="cpu")
edits, _ = first_without_conflicts(lks.load_edits(a.data, data_dir=a.data_dir), a.n, a.data)
spec = model_spec("smollm2-135m")
cfg = dataclasses.replace(spec.train, epochs=1)
set_seed(cfg.seed)  # the generator's initial weights, as fit() draws them: the same epoch in every run
editor = LKSEditor(model, tok, spec.editor)
store = Path(a.store or REPO / "runs" / "epoch-memory" / f"{a.data}-{a.n}")
store.mkdir(parents=True, exist_ok=True)
show("model loaded")
trainer = Trainer(editor, cfg).prepare(edits, progress=False, store=store)
show("prepared")
if a.touch:
    print(f"read every weight: sum {sum(float(w.float().sum()) for w in model.parameters()):.4g}")
    show("weights read")
if a.steps:
    batch = max(edit_batches(trainer.per_edit, trainer.seqs, cfg.batch_size), key=len)
    print(f"largest batch: {len(batch)} sequences")
    with trainer.fast.upper_pass(cfg.precision, page_out_idle=True):
        for step in range(a.steps):
            editor.generator.zero_grad(set_to_none=True)
            release_memory()  # the previous step's freed heap back to the OS: each step pays for its own pages
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            start = status("VmRSS")
            loss = trainer.batch_loss(batch, backward=True)
            print(f"step {step + 1}: loss {float(loss['total']):.4f}, RSS high-water {(status('VmHWM') - start) / MIB:,.0f} MiB "
                  "above the step's start", flush=True)
else:
    history = trainer.train(progress=False)
    print(f"epoch loss {history[-1]['loss']:.4f}, {history[-1]['seconds']:.0f} s")
show("after the epoch" if not a.steps else "after the steps")
