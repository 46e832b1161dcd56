"""Training of SR models (paper Sec. 5.1), the library layer under ``faig train`` and the filter re-training
of :mod:`faig_fast.analyses.retrain`.

* :mod:`~faig_fast.training.config`: :class:`TrainConfig` (one run) and its learning-rate schedule;
* :mod:`~faig_fast.training.data`: training images held in memory and seeded batch sampling;
* :mod:`~faig_fast.training.state`: model, EMA, optimiser and sampler of one run, resume from ``state.pt``;
* :mod:`~faig_fast.training.loop`: :func:`train`, the resumable loop.

Recipe (the authors' BasicSR configs): Adam(β=(0.9, 0.99)), L1 loss, random ``patch_size``² GT crops
with random horizontal/vertical flips and 90° rotations (transposes), per-sample blur → bilinear ↓ →
noise → 8-bit quantisation (Eq. 1 order, from :mod:`faig_fast.data.degradations`), a cosine learning-rate
schedule to :data:`MIN_LR` over the run (BasicSR's CosineAnnealingRestartLR with one period), and an EMA
of the weights, which is what gets saved.  The EMA decay is warmed up as ``min(ema_decay, (1 + t) /
(10 + t))`` at update ``t`` (as TensorFlow's ``ExponentialMovingAverage(num_updates=t)``), otherwise a
0.999 EMA of a few hundred iterations is mostly the initial weights; at 100K iterations this is the
plain 0.999 EMA.  The named recipes (presets) and the baseline/target pair live in
:mod:`faig_fast.apps.train`.

Runs are deterministic for a seed (model init from ``create_model(..., seed=seed)``, crops,
augmentations and degradations from one ``torch.Generator(seed)``; the caller's global RNG is left
alone) and resumable: ``state.pt`` holds model, EMA, optimiser, iteration and generator state, written
atomically every ``ckpt_every`` iterations, and a restarted run ends bit-identical to an uninterrupted one.
"""
from faig_fast.training.config import MIN_LR, TrainConfig, lr_at
from faig_fast.training.data import load_training_images, sample_batch
from faig_fast.training.loop import train
from faig_fast.training.state import build_model

__all__ = ["TrainConfig", "MIN_LR", "lr_at", "load_training_images", "sample_batch", "build_model", "train"]
