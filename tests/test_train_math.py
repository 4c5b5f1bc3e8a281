"""The training loop's own math against independent hand computations.

- ``Trainer.train_step``: clipping, Nesterov SGD with weight decay, the OneCycle LR and
  momentum, Lookahead and the EMA, replayed step by step in float64 by hand (autograd is
  used only for the gradient of a plain soft-target cross-entropy).
- ``train_epoch``'s "train_acc_mixed" and "train_loss": recomputed from lambda and the two
  label sets of every MixUp batch, obtained by replaying the epoch's random draws.
- ``epoch_batches``: one permutation, the train transform over chunks of it, x/255, then
  MixUp per batch, rebuilt with cloned generators and compared bit for bit.
Nothing here compares against captured output of the code itself.
"""
import contextlib
import copy
import math
import sys

import numpy as np
import pytest
import torch

from samlib.augment import mixup, sample_lambda
from samlib.config import resolve
from samlib.data import synthetic_cifar10
from samlib.train import Trainer

try:
    from samlib.data import split_data
except ImportError:   # older layout
    from samlib.train import split_data

CPU = torch.device("cpu")
TINY = dict(widths=(4, 8, 8), blocks=(1, 1, 1), train_subset=None, test_subset=None,
            val_size=32, train_eval_size=32, amp="off")


@pytest.fixture(scope="module")
def dataset():
    # 128 train images - 32 validation = 96 for training.
    return synthetic_cifar10(n_train=128, n_test=32, seed=3)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_trainer(dataset, dtype=torch.float32, **overrides):
    cfg = resolve("final", "smoke", **dict(TINY, **overrides))
    with default_dtype(dtype):     # float64 model, optimizer state, Lookahead copies and EMA
        trainer = Trainer(cfg, split_data(cfg, dataset), CPU)
    return trainer


def clone_generator(g):
    return torch.Generator(g.device).set_state(g.get_state())


# ---------------------------------------------------------------- hand-written optimisation

def one_cycle(step, total, max_lr, pct_start):
    """torch OneCycleLR's defaults written out: (lr, momentum) used by optimizer step `step`
    (0-based): cos from max_lr/25 up to max_lr at step pct_start*total - 1, then down to
    max_lr/25/1e4 at step total - 1; momentum 0.95 -> 0.85 -> 0.95 in counter-phase."""
    initial, peak = max_lr / 25, pct_start * total - 1
    final = initial / 1e4

    def cos(start, end, pct):
        return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))

    if step <= peak:
        pct = step / peak
        return cos(initial, max_lr, pct), cos(0.95, 0.85, pct)
    pct = (step - peak) / (total - 1 - peak)
    return cos(max_lr, final, pct), cos(0.85, 0.95, pct)


class HandTraining:
    """The training step by hand on a float64 copy of the initial model."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.model = copy.deepcopy(model).train()
        self.params = list(self.model.parameters())
        self.buf = [None] * len(self.params)           # momentum buffers
        self.slow = [p.detach().clone() for p in self.params]   # Lookahead's slow weights
        self.steps = 0
        self.ema = None
        self.grad_norms = []

    def state(self):
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def step(self, x, y, lr, momentum):
        cfg = self.cfg
        logits = self.model(x)   # train mode: BN normalises by batch stats, updates its buffers
        # Soft-target cross-entropy by hand.  In float32, as train_step computes its loss
        # (logits.float(), for AMP); everything else stays float64.  With a float64 loss the
        # two differ by ~1e-8 (float32 rounding of dL/dlogits); like this by ~1e-15.
        loss = -(y.float() * torch.log_softmax(logits.float(), 1)).sum(1).mean()
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))   # global L2 norm
            self.grad_norms.append(norm)
            coef = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip else 1.0
            for i, (p, g) in enumerate(zip(self.params, grads)):
                d = g * coef + cfg.weight_decay * p              # decay on every parameter
                self.buf[i] = d.clone() if self.buf[i] is None else momentum * self.buf[i] + d
                p -= lr * (d + momentum * self.buf[i])           # Nesterov
            self.steps += 1
            if cfg.lookahead_k and self.steps % cfg.lookahead_k == 0:
                for p, s in zip(self.params, self.slow):
                    s += cfg.lookahead_alpha * (p - s)
                    p.copy_(s)
            if cfg.ema:
                now = {k: v.detach().clone() for k, v in self.state().items()}
                if self.ema is None:
                    self.ema = now                               # the first update copies
                else:
                    d = cfg.ema_decay
                    for k, v in now.items():
                        e = d * self.ema[k].double() + (1 - d) * v.double()
                        self.ema[k] = e.to(v.dtype) if v.is_floating_point() else e.trunc().to(v.dtype)


def assert_close(actual: dict, expected: dict, what, rtol=1e-9, atol=1e-11):
    assert actual.keys() == expected.keys()
    for k, a in actual.items():
        e = expected[k]
        assert a.dtype == e.dtype, (what, k)
        if a.is_floating_point():
            assert torch.allclose(a, e, rtol=rtol, atol=atol), \
                (what, k, float((a - e).abs().max().detach()))
        else:
            assert torch.equal(a, e), (what, k, a, e)


def soft_batch(trainer, step, bs):
    """A fixed float64 batch with genuinely soft targets (0.7 / 0.3 on two classes)."""
    n = len(trainer.train_y)
    idx = torch.arange(step * bs, (step + 1) * bs) % n
    x = trainer.train_x[idx].double() / 255
    labels = trainer.train_y[idx]
    eye = torch.eye(10)
    return x, 0.7 * eye[labels] + 0.3 * eye[labels.roll(1)]


def replay_train_steps(dataset, n_steps, **overrides):
    # lr / weight decay large enough that a wrong LR, momentum or decay shows; 96 train
    # images in batches of 32, 2 epochs: a 6-step OneCycle whose LR and momentum move a lot.
    trainer = make_trainer(dataset, torch.float64, epochs=2, batch_size=32, lr=0.4,
                           weight_decay=0.05, grad_clip=0.6, ema=True, ema_decay=0.8, **overrides)
    cfg = trainer.cfg
    assert next(trainer.model.parameters()).dtype == torch.float64
    total = cfg.epochs * trainer.steps_per_epoch
    assert total == 6
    trainer.net.train()
    hand = HandTraining(trainer.model, cfg)
    for step in range(n_steps):
        lr, momentum = one_cycle(step, total, cfg.lr, cfg.pct_start)
        group = trainer.optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(lr, rel=1e-12)
        assert group["momentum"] == pytest.approx(momentum, rel=1e-12)
        x, y = soft_batch(trainer, step, cfg.batch_size)
        loss, logits, _ = trainer.train_step(x, y)
        hand.step(x, y, lr, momentum)
        assert_close(dict(trainer.model.named_parameters()), dict(hand.model.named_parameters()),
                     f"params after step {step + 1}")
        assert_close(dict(trainer.model.named_buffers()), dict(hand.model.named_buffers()),
                     f"buffers after step {step + 1}")
        ema = trainer.ema.module
        assert_close({**dict(ema.named_parameters()), **dict(ema.named_buffers())}, hand.ema,
                     f"EMA after step {step + 1}")
    # the test only means something if clipping was active at least once, and not always 1
    assert min(hand.grad_norms) < cfg.grad_clip < max(hand.grad_norms), hand.grad_norms
    return trainer, hand


def test_train_step_is_clipped_nesterov_sgd_with_decay_onecycle_and_ema(dataset):
    """Plain SGD (lookahead_k=0): 3 steps equal the hand-written clip + SGD + EMA in float64."""
    trainer, hand = replay_train_steps(dataset, 3, lookahead_k=0)
    assert isinstance(trainer.optimizer, torch.optim.SGD)


def test_train_step_with_lookahead_matches_hand_lookahead(dataset):
    """Lookahead k=2: 5 steps (syncs after steps 2 and 4, step 5 unsynced).  alpha=0.6, not
    the paper's 0.5, so that alpha and 1 - alpha cannot be confused unnoticed."""
    trainer, hand = replay_train_steps(dataset, 5, lookahead_k=2, lookahead_alpha=0.6)
    assert hand.steps == 5


# ---------------------------------------------------------------- replaying an epoch's draws

def replay_mixup_epoch(trainer, alpha, chunk):
    """The epoch's MixUp draws replayed on cloned generators: for each step the labels y_a,
    lam and the partner permutation (so y_b = y_a[perm])."""
    g, h = clone_generator(trainer.gen_aug), clone_generator(trainer.gen_host)
    bs, steps = trainer.cfg.batch_size, trainer.steps_per_epoch
    order = torch.randperm(len(trainer.train_y), generator=g)[:steps * bs]
    for c in order.split(chunk):                      # the augmentation's draws, to advance g
        trainer.transform(c, g)
    y_epoch = trainer.train_y[order]
    out = []
    for step in range(steps):
        lam = sample_lambda(alpha, h)                 # one lambda per batch, host generator
        perm = torch.randperm(bs, generator=g)        # one partner permutation per batch
        out.append(dict(y_a=y_epoch[step * bs:(step + 1) * bs], lam=lam, perm=perm))
    return out


def augment_chunk():
    """The chunk size of the module that holds Trainer (where epoch_batches reads it)."""
    return sys.modules[Trainer.__module__].AUGMENT_CHUNK


def test_train_acc_mixed_and_loss_are_the_lambda_weighted_hand_formulas(dataset, monkeypatch):
    """Two MixUp epochs: train_acc_mixed = mean of lam*[pred == y_a] + (1-lam)*[pred == y_b] and
    train_loss = mean of lam*CE(y_a) + (1-lam)*CE(y_b), with lam, y_a, y_b from a replay of the
    epoch's draws and pred / logits recorded from each train_step."""
    # alpha 1 without the ramp: lambda ~ U(0, 1), far from 0/1, so the weighting shows.
    trainer = make_trainer(dataset, mix="mixup", mix_alpha=1.0, alpha_ramp=False, epochs=3,
                           batch_size=16, lr=0.2, lookahead_k=0)
    steps = []
    step = trainer.train_step

    def recording_step(x, y):
        loss, logits, skipped = step(x, y)
        steps.append((y.clone(), loss.clone(), logits.clone()))
        return loss, logits, skipped

    monkeypatch.setattr(trainer, "train_step", recording_step)
    checked = []
    for epoch in range(2):
        trainer.epoch = epoch
        steps.clear()
        replay = replay_mixup_epoch(trainer, 1.0, augment_chunk())
        row = trainer.train_epoch()
        assert len(steps) == len(replay) == trainer.steps_per_epoch == 6
        weighted, plain_a, losses = [], [], []
        for (y, loss, logits), r in zip(steps, replay):
            y_a, y_b, lam = r["y_a"], r["y_a"][r["perm"]], r["lam"]
            eye = torch.eye(10)
            assert torch.allclose(y, lam * eye[y_a] + (1 - lam) * eye[y_b], atol=1e-6)  # aligned
            pred = logits.argmax(1)
            for i in range(len(pred)):   # per image, in Python floats
                weighted.append(lam * (pred[i] == y_a[i]).item() + (1 - lam) * (pred[i] == y_b[i]).item())
                plain_a.append(float((pred[i] == y_a[i]).item()))
            # the loss of the step: lam * CE(y_a) + (1 - lam) * CE(y_b), by hand
            logp = torch.log_softmax(logits.double(), 1)
            ar = torch.arange(len(y_a))
            losses.append(float(-(lam * logp[ar, y_a] + (1 - lam) * logp[ar, y_b]).mean()))
            assert float(loss) == pytest.approx(losses[-1], rel=1e-5)
        assert row["train_acc_mixed"] == pytest.approx(np.mean(weighted), abs=1e-6)
        assert row["train_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
        assert row["nonfinite_steps"] == 0 and row["mix_alpha"] == 1.0
        checked.append((np.mean(weighted), np.mean(plain_a)))
    # the check can tell lambda-weighting from plain accuracy against y_a
    assert any(abs(w - p) > 1e-3 for w, p in checked), checked


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_epoch_batches_are_mixup_of_the_transformed_permutation(dataset, monkeypatch, alpha):
    """Every batch equals: permutation -> train transform per chunk -> x/255 -> MixUp (out of
    place, cloned generators); with alpha 0 the plain transformed batch and one-hot labels."""
    trainer = make_trainer(dataset, mix="mixup", batch_size=20, epochs=2, cutout=8)
    # several chunks, one ragged, so the chunk boundaries are exercised
    monkeypatch.setattr(sys.modules[Trainer.__module__], "AUGMENT_CHUNK", 35)
    n, bs = len(trainer.train_y), trainer.cfg.batch_size
    assert n == 96 and trainer.steps_per_epoch == 4       # 80 of 96 used, 16 dropped
    g, h = clone_generator(trainer.gen_aug), clone_generator(trainer.gen_host)
    order = torch.randperm(n, generator=g)[:4 * bs]
    assert len(order.unique()) == 4 * bs
    x_epoch = torch.cat([trainer.transform(c, g) for c in order.split(35)])
    assert x_epoch.dtype == torch.uint8
    eye = torch.eye(10)
    batches = list(trainer.epoch_batches(alpha))
    assert len(batches) == 4
    for step, (x, y) in enumerate(batches):
        sl = slice(step * bs, (step + 1) * bs)
        x_ref = x_epoch[sl].float() / 255
        y_ref = eye[trainer.train_y[order[sl]]]
        if alpha:
            x_ref, y_ref = mixup(x_ref, y_ref, alpha, generator=g, host_generator=h)
        assert x.dtype == x_ref.dtype == torch.float32 and y.dtype == y_ref.dtype
        assert torch.equal(x, x_ref), step
        assert torch.equal(y, y_ref), step
    # no hidden draws: both streams end where the replay ends
    assert torch.equal(trainer.gen_aug.get_state(), g.get_state())
    assert torch.equal(trainer.gen_host.get_state(), h.get_state())
    if alpha:   # mixing happened: some targets are soft
        assert any(((y > 0) & (y < 1)).any() for _, y in batches)
    else:
        assert all(torch.equal(y.sum(1), torch.ones(bs)) and set(y.unique().tolist()) == {0.0, 1.0}
                   for _, y in batches)


# ---------------------------------------------------------------- the authors' EMA reset

class AuthorsModelEMA:
    """apply()/restore() as the authors' ModelEMA wrote them (SAMResNet.py): the backup is
    `model.state_dict()` itself - tensors sharing storage with the model - so loading the
    EMA into the model also overwrites the backup, and restore() loads the EMA back.  The
    shadow holds the floating-point state_dict entries only."""

    def __init__(self, shadow: dict):
        self.shadow = {k: v.clone() for k, v in shadow.items() if v.is_floating_point()}

    def apply(self, model):
        self.backup = model.state_dict()                 # not a copy: the bug
        model.load_state_dict(self.shadow, strict=False)

    def restore(self, model):
        model.load_state_dict(self.backup)


def _momentum_buffers(trainer):
    return [trainer.optimizer.state[p]["momentum_buffer"] for p in trainer.model.parameters()]


@pytest.mark.parametrize("reset", ["epoch", "never"])
def test_ema_reset_epoch_is_the_authors_apply_restore(dataset, monkeypatch, reset):
    """Two epochs of 3 steps through the real train_epoch (its batches replaced by fixed soft
    ones): with ema_reset="epoch" the trained model equals a hand replay in which the
    authors' apply()/restore() runs after each epoch - the model continues from the EMA -
    while the momentum buffers and Lookahead's slow weights are never touched by it.  With
    "never" the hand replay without apply/restore is matched, and the two differ."""
    trainer = make_trainer(dataset, torch.float64, epochs=2, batch_size=32, lr=0.4, weight_decay=0.05,
                           grad_clip=0.6, ema=True, ema_decay=0.8, lookahead_k=2, lookahead_alpha=0.6,
                           ema_reset=reset)
    cfg, bs = trainer.cfg, trainer.cfg.batch_size
    total = cfg.epochs * trainer.steps_per_epoch
    hand = HandTraining(trainer.model, cfg)
    step = 0
    for epoch in range(cfg.epochs):
        batches = [soft_batch(trainer, step + i, bs) for i in range(trainer.steps_per_epoch)]
        monkeypatch.setattr(trainer, "epoch_batches", lambda alpha, b=batches: iter(b))
        trainer.train_epoch()
        trainer.epoch += 1
        for x, y in batches:
            hand.step(x, y, *one_cycle(step, total, cfg.lr, cfg.pct_start))
            step += 1
        before = {k: v.clone() for k, v in hand.state().items()}
        if reset == "epoch":
            authors = AuthorsModelEMA(hand.ema)
            authors.apply(hand.model)
            authors.restore(hand.model)
            changed = [k for k, v in hand.state().items() if not torch.equal(v, before[k])]
            assert changed, "apply/restore left the model as it was: the replay tests nothing"
        assert_close(dict(trainer.model.named_parameters()), dict(hand.model.named_parameters()),
                     f"params after epoch {epoch + 1}")
        assert_close(dict(trainer.model.named_buffers()), dict(hand.model.named_buffers()),
                     f"buffers after epoch {epoch + 1}")
        # (floating-point entries: the EMA of num_batches_tracked is a truncated float whose
        # last step here, trunc(0.8 * 1 + 0.2 * 6), rounds to 1 or 2 by float precision)
        ema = trainer.ema.module
        floats = lambda d: {k: v for k, v in d.items() if v.is_floating_point()}  # noqa: E731
        assert_close(floats({**dict(ema.named_parameters()), **dict(ema.named_buffers())}), floats(hand.ema),
                     f"EMA after epoch {epoch + 1}")
        for ours, theirs in zip(_momentum_buffers(trainer), hand.buf):
            assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-11)
        for ours, theirs in zip(trainer.optimizer.slow, hand.slow):
            assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-11)
    params = dict(trainer.model.named_parameters())
    same_as_ema = all(torch.equal(p, dict(trainer.ema.module.named_parameters())[k]) for k, p in params.items())
    assert same_as_ema == (reset == "epoch")
