"""Training an editor's generator (the base model stays frozen).

* :mod:`lks.training.prompts` - the prompts generated for training: locality templates, extra paraphrases;
* :mod:`lks.training.sequences` - the training set: edit, paraphrase and locality sequences;
* :mod:`lks.training.fastpath` - the layer-L cache and the upper-layer pass (the fast path);
* :mod:`lks.training.losses` - one step's losses;
* :mod:`lks.training.gate` - the gated generator's gate examples, warm-up and loss;
* :mod:`lks.training.precision` - CPU tuning (padded shapes, the fit's dtype); the bfloat16 passes are
  :meth:`lks.training.fastpath.FastPath.lower_pass` / ``upper_pass``;
* :mod:`lks.training.trainer` - :class:`Trainer`: prepare, step, epochs, checkpoints.

:meth:`lks.LKSEditor.fit` is the entry point; the parts are public for tests and benchmarks.
"""

from lks.training.trainer import Trainer

__all__ = ["Trainer"]
