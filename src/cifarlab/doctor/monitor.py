"""Runtime monitors: a trainer callback that watches training and stops it when it diverges.

Cheap every step: the logits' finiteness (one reduction, read back). Every ``every`` steps (a
"sample"): gradient norms per layer, update-to-weight ratios, activation statistics, the loss.
Those are the expensive ones, so sampling keeps the cost within a few percent of training time
(bench/doctor.py measures it). Findings come out at the end (or at the divergence that stops
training), one per root cause, in :attr:`DoctorMonitor.report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.callbacks import Callback, StopReason, TrainResult, TrainState
from cifarlab.doctor.findings import Report, Severity

__all__ = ["DoctorMonitor"]

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.ReLU6)
_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
# positively homogeneous: f(c·x) = c·f(x) for c > 0, so a norm after them still sees scale-free
_HOMOGENEOUS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU,
                nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d)


class DoctorMonitor(Callback):
    """Watches a training run through :class:`cifarlab.train.Callback`.

    Args:
        every: sample every this many steps (``None``: about 4 samples per epoch, at most 25
            steps apart).
        num_classes: for the plateau rule (loss above 0.9·ln C); read from the model's output
            when not given.
        stop_on_divergence: set ``state.should_stop`` when the loss becomes non-finite or blows
            up, with the finding as the stop reason.
        intentionally_frozen: parameter names that are frozen on purpose.
        lr_window: the first steps in which a learning rate that collapses is a schedule bug
            (default: the first quarter of the run, where no sane schedule has decayed yet).
    """

    def __init__(self, every: int | None = None, num_classes: int | None = None,
                 stop_on_divergence: bool = True, intentionally_frozen: Sequence[str] = (),
                 lr_window: int | None = None):
        self.every_arg = every
        self.every = every or 25
        self.num_classes = num_classes
        self.stop_on_divergence = stop_on_divergence
        self.frozen = set(intentionally_frozen)
        self.report = Report()
        self.series: dict[str, list[Any]] = {"step": [], "loss": [], "grad_norm": [],
                                              "update_ratio": [], "active_fraction": []}
        self._hooks: list[Any] = []
        self._sample_hooks: list[Any] = []
        self._on_cpu = True
        self._order: list[tuple[str, nn.Module]] | None = None
        self.scale_invariant: set[str] = set()
        self._armed = False
        self._acts: dict[str, torch.Tensor] = {}
        self._dead_seen: dict[str, torch.Tensor] = {}
        self._ratios: dict[str, list[tuple[int, float]]] = {}
        self._first_last: list[float] = []
        self._norms: list[float] = []
        self._prev: dict[str, torch.Tensor] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._input: torch.Tensor | None = None
        self._logits_bad = False
        self._bad_flag: torch.Tensor | None = None  # accelerators: NaN seen since last sample
        self._replayed = False
        self._steps_since_backward = 0
        self._high_loss = 0
        self._model: nn.Module | None = None
        self.seconds = 0.0  # time spent in the monitor's own work (sampling, activation stats)
        self.lr_window = lr_window
        self._probes: list[nn.Parameter] = []
        self._steps_checked = 0
        self._gradless_steps = 0
        self._lrs: list[float] = []

    # ------------------------------------------------------------------------ wiring

    def on_train_start(self, state: TrainState) -> None:
        model = self._model = state.model
        if self.every_arg is None:
            self.every = max(1, min(25, state.steps_per_epoch // 4))
        if self.lr_window is None:
            self.lr_window = max(1, state.total_steps // 4)
        if not self.frozen:
            self.frozen = set(getattr(model, "frozen_by_design", ()))
        self._start = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad}
        # On the CPU the logits are checked every step (a read-back costs nothing there); on an
        # accelerator the root hooks, like the per-module ones, are attached only for the
        # sampled steps, so that unsampled steps run with no extra work or sync at all.
        self._on_cpu = next(model.parameters()).device.type == "cpu"
        if self._on_cpu:
            self._hooks += self._root_hooks(model)
        self._hooks.append(state.optimizer.register_step_pre_hook(self._before_step))
        self._hooks.append(state.optimizer.register_step_post_hook(self._after_step))
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._probes = trainable[:1] + trainable[-1:]  # first and last: cheap to look at
        probe = next((p for n, p in model.named_parameters() if p.requires_grad), None)
        if probe is not None:
            self._hooks.append(probe.register_hook(lambda g: self._grad_arrives(probe)))
        self.report.checks_run += ["nonfinite-loss", "exploding-gradients",
                                   "vanishing-gradients", "update-ratio", "dead-channels",
                                   "plateau", "params-never-change", "grad-accumulation",
                                   "wrong-mode", "blank-images", "lr-schedule",
                                   "step-without-grad"]

    def _root_hooks(self, model: nn.Module) -> list[Any]:
        return [model.register_forward_pre_hook(self._root_pre),
                model.register_forward_hook(self._root_post)]

    def _arm(self, model: nn.Module) -> None:
        """Attach the sampling hooks for the next step's forward pass."""
        self._armed = True
        hooks = [] if self._on_cpu else self._root_hooks(model)
        if self._order is None:  # once: the order leaf modules run in (for scale invariance)
            self._order = []
            for name, m in model.named_modules():
                if name and not list(m.children()):
                    hooks.append(m.register_forward_hook(
                        lambda mod, inp, out, name=name: self._order.append((name, mod))
                        if self._order is not None else None))
        for name, m in model.named_modules():
            if isinstance(m, _ACTIVATIONS):
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, name=name: self._activation(name, out)))
            if isinstance(m, _MODE_SENSITIVE):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, inp, name=name: self._mode(name, mod)))
        self._sample_hooks = hooks

    def _disarm(self) -> None:
        self._armed = False
        for h in self._sample_hooks:
            h.remove()
        self._sample_hooks = []

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled() and args:
            self._input = args[0]  # a reference, no copy: for the NaN replay and blank check

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(out, torch.Tensor):
            bad = ~torch.isfinite(out.detach()).all()
            if out.device.type == "cpu":  # reading it back is free: check every step
                self._logits_bad = self._logits_bad or bool(bad)
            else:  # on an accelerator a read-back is a sync: keep a flag, read it when sampling
                self._bad_flag = bad if self._bad_flag is None else self._bad_flag | bad
            if self.num_classes is None and out.ndim == 2:
                self.num_classes = int(out.shape[1])

    def _activation(self, name: str, out: Any) -> None:
        if self._armed and isinstance(out, torch.Tensor) and out.ndim >= 2:
            t0 = time.perf_counter()
            with torch.no_grad():
                o = out.detach()
                dims = [0, *range(2, o.ndim)]
                self._acts[name] = (o.amax(dim=dims) > 0).float()  # one pass, per channel
            self.seconds += time.perf_counter() - t0

    def _mode(self, name: str, module: nn.Module) -> None:
        if self._armed and torch.is_grad_enabled() and not module.training:
            self.report.add("wrong-mode", Severity.ERROR,
                            f"{name} ({type(module).__name__}) ran in eval mode during a "
                            "training step", module=name)

    def _grad_arrives(self, p: torch.Tensor) -> None:
        if self._steps_since_backward >= 1 and p.grad is not None and bool(p.grad.any()):
            self.report.add("grad-accumulation", Severity.ERROR,
                            "a gradient arrived while the previous step's gradient was still "
                            "in .grad after optimizer.step()", step=self._step)
        self._steps_since_backward = 0

    def _before_step(self, opt: torch.optim.Optimizer, *args: Any) -> None:
        if self._on_cpu or self._armed:  # on accelerators only when sampling (a read-back)
            self._steps_checked += 1
            # None, not zero: a confidently fitted batch has exactly zero gradients too
            if self._probes and all(p.grad is None for p in self._probes):
                self._gradless_steps += 1
        if self._logits_bad and not self._replayed:
            self._replayed = True
            self._replay(self._step + 1)  # the step now running (steps count from 1)

    def _after_step(self, opt: torch.optim.Optimizer, *args: Any) -> None:
        self._steps_since_backward += 1

    _step = 0

    # ------------------------------------------------------------------------- per step

    def on_step_end(self, state: TrainState, loss: torch.Tensor, inputs: torch.Tensor,
                    labels: torch.Tensor) -> None:
        self._step = state.step
        if len(self._lrs) < (self.lr_window or 0) and state.optimizer.param_groups:
            lr = state.optimizer.param_groups[0]["lr"]
            self._lrs.append(float(lr))
        sampling = self._armed or (state.step + 1) % self.every == 0
        if self._bad_flag is not None and (sampling or state.step >= state.total_steps):
            self._logits_bad = self._logits_bad or bool(self._bad_flag)
            self._bad_flag = None
        if self._logits_bad:
            if not self._replayed:
                self._replayed = True
                self._replay(state.step)
            if self.stop_on_divergence:
                f = next((f for f in self.report.findings
                          if f.rule in ("nonfinite-loss", "input-nonfinite")), None)
                state.stop(StopReason("doctor", "nonfinite", f.message if f else "non-finite loss"))
            return
        t0 = time.perf_counter()
        if self._armed:
            self._disarm()
            value = float(loss)
            if not math.isfinite(value) and not self._logits_bad:  # accelerators: seen here
                self._logits_bad = self._replayed = True
                self._replay(state.step)
                if self.stop_on_divergence:
                    state.stop(StopReason("doctor", "nonfinite",
                                          self.report.findings[-1].message))
                return
            self._sample(state, value)
        if (state.step + 1) % self.every == 0 or state.step == 0:
            self._arm(state.model)
            if not isinstance(state.optimizer, torch.optim.SGD):  # SGD's ratio needs no copy
                self._prev = {n: p.detach().clone() for n, p in state.model.named_parameters()
                              if p.requires_grad and p.ndim >= 2}
            else:
                self._prev = {n: p.detach() for n, p in state.model.named_parameters()
                              if p.requires_grad and p.ndim >= 2}
        self.seconds += time.perf_counter() - t0

    def _find_scale_invariant(self) -> None:
        """Weights whose output reaches a normalization layer through homogeneous operations
        only: the loss does not depend on their scale, so their update/weight ratio settles
        where learning rate and weight decay balance (van Laarhoven 2017; Wan et al. 2021) and
        CS231n's 1e-3 rule of thumb does not apply to them."""
        order = self._order or []
        for i, (name, mod) in enumerate(order):
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            for _, nxt in order[i + 1 :]:
                if isinstance(nxt, _NORMS):
                    self.scale_invariant.add(f"{name}.weight")
                    break
                if not isinstance(nxt, _HOMOGENEOUS):
                    break
        self._order = []  # done; later samples record nothing

    def _sample(self, state: TrainState, loss: float) -> None:
        if self._order:
            self._find_scale_invariant()
        model = state.model
        s = self.series
        s["step"].append(state.step)
        s["loss"].append(loss)
        # gradient norms, per layer (weights only)
        grads = [(n, p.grad) for n, p in model.named_parameters()
                 if p.grad is not None and p.ndim >= 2]
        # every norm of this sample in one read-back: on a GPU each read-back is a sync
        prev_names = [n for n, _ in model.named_parameters() if n in self._prev]
        stacked = [torch.linalg.vector_norm(g).float() for _, g in grads] + \
            [torch.linalg.vector_norm(self._prev[n]).float() for n in prev_names]
        values = torch.stack(stacked).tolist() if stacked else []
        norms = values[: len(grads)]
        prev_norm = dict(zip(prev_names, values[len(grads):], strict=True))
        grad_norm = {n: v for (n, _), v in zip(grads, norms, strict=True)}
        total = math.sqrt(sum(v * v for v in norms))
        s["grad_norm"].append(total)
        if len(grads) >= 2:
            rms = [v / math.sqrt(g.numel()) for v, (_, g) in zip(norms, grads, strict=True)]
            if rms[-1] > 0:
                self._first_last.append(rms[0] / rms[-1])
        median = float(np.median(self._norms)) if self._norms else 0.0
        if len(self._norms) >= 5 and median > 0 and total > 20 * median:
            self.report.add("exploding-gradients", Severity.WARNING,
                            f"gradient norm {total:.3g} at step {state.step} is "
                            f"{total / median:.0f}× its running median",
                            value=total, threshold=20 * median,
                            step=state.step)
        self._norms.append(total)
        # update-to-weight ratios. For SGD the update is lr·grad, CS231n's definition (momentum
        # and weight decay left out); for other optimizers (Adam rescales the gradient) it is the
        # change the step actually made.
        ratios = {}
        sgd_lr = {id(p): g["lr"] for g in state.optimizer.param_groups for p in g["params"]} \
            if isinstance(state.optimizer, torch.optim.SGD) else None
        for n, p in model.named_parameters():
            prev = self._prev.get(n)
            if prev is None:
                continue
            den = prev_norm[n]
            if den <= 0:
                continue
            if sgd_lr is not None:
                if n not in grad_norm or id(p) not in sgd_lr:
                    continue
                ratios[n] = sgd_lr[id(p)] * grad_norm[n] / den
            else:
                ratios[n] = float((p.detach().float() - prev.float()).norm()) / den
            if loss > 0.1 * math.log(self.num_classes or 10):  # a fitted model has tiny grads
                self._ratios.setdefault(n, []).append((state.step, ratios[n]))
        s["update_ratio"].append(ratios)
        # activations
        frac = {}
        acts = {k: v.cpu() for k, v in self._acts.items()}  # device tensors until now
        for name, ever_pos in acts.items():
            frac[name] = float(ever_pos.mean())
            seen = self._dead_seen.get(name)
            self._dead_seen[name] = ever_pos if seen is None else torch.maximum(seen, ever_pos)
        s["active_fraction"].append(frac)
        self._acts = {}
        if self._input is not None and self._input.ndim >= 2:
            x = self._input.detach().flatten(1)
            blank = (x.amax(1) - x.amin(1)).float() < 1e-6
            if float(blank.float().mean()) > 0.5:
                self.report.add("blank-images", Severity.WARNING,
                                f"{int(blank.sum())} of {len(blank)} images the model received "
                                f"at step {state.step} are constant (augmentation or "
                                "preprocessing blanks them)", step=state.step,
                                count=int(blank.sum()))
        # divergence: a loss far above chance level for three samples in a row
        c = self.num_classes or 10
        if math.isfinite(loss) and loss > 5 * math.log(c):
            self._high_loss += 1
            if self._high_loss >= 3:
                self.report.add("exploding-gradients", Severity.ERROR,
                                f"the loss diverged: {loss:.3g} at step {state.step} (above "
                                f"5·ln C = {5 * math.log(c):.2f} for 3 samples)", value=loss,
                                threshold=5 * math.log(c), step=state.step)
                if self.stop_on_divergence:
                    state.stop(StopReason("doctor", "diverged", f"loss diverged ({loss:.3g})"))
        else:
            self._high_loss = 0

    def _replay(self, step: int) -> None:
        """Find the first module whose output is NaN/Inf by replaying the batch with hooks.
        Runs before the optimizer step when it can, so the weights are still the ones that
        produced the non-finite logits."""
        model, x = self._model, self._input
        if model is None or x is None:
            self.report.add("nonfinite-loss", Severity.CRITICAL,
                            f"non-finite logits at step {step}", step=step)
            return
        if not bool(torch.isfinite(x).all()):
            n = int((~torch.isfinite(x.detach()).flatten(1).all(1)).sum())
            self.report.add("input-nonfinite", Severity.CRITICAL,
                            f"{n} of {len(x)} inputs at step {step} contain NaN/Inf; "
                            "the loss became non-finite", step=step, count=n)
            return
        bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        first: list[str] = []
        hooks = []
        for name, m in model.named_modules():
            if name and not list(m.children()):
                def hook(mod: nn.Module, inp: Any, out: Any, name: str = name) -> None:
                    if not first and isinstance(out, torch.Tensor) and \
                            not bool(torch.isfinite(out).all()):
                        first.append(name)
                hooks.append(m.register_forward_hook(hook))
        was = model.training
        try:
            with torch.no_grad():
                model.train(was)
                model(x.detach())
        finally:
            for h in hooks:
                h.remove()
        where = first[0] if first else "the loss (the logits were finite)"
        extra = f"; parameters already non-finite: {', '.join(bad_params[:3])}" \
            if bad_params else ""
        self.report.add("nonfinite-loss", Severity.CRITICAL,
                        f"non-finite values first appear in {where} at step {step}{extra}",
                        module=where, step=step, nonfinite_params=bad_params[:10])

    # --------------------------------------------------------------------------- the end

    def on_train_end(self, state: TrainState, result: TrainResult) -> None:
        report = self.finish(state)
        result.extras["doctor"] = [f.to_dict() for f in report.findings]

    def finish(self, state: TrainState) -> Report:
        self._disarm()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model = state.model
        c = self.num_classes or 10
        ln_c = math.log(c)
        losses = [v for v in self.series["loss"] if math.isfinite(v)]
        if len(losses) >= 4 and state.step >= 0.3 * max(1, state.total_steps) and \
                not self._logits_bad:
            tail = float(np.median(losses[-max(2, len(losses) // 4):]))
            if tail > 0.9 * ln_c:
                self.report.add("plateau", Severity.WARNING,
                                f"the loss is {tail:.3f} after {state.step} steps, above 0.9·ln C "
                                f"= {0.9 * ln_c:.3f}", value=tail, threshold=0.9 * ln_c,
                                step=state.step)
        if len(self._first_last) >= 3 and not self._logits_bad:
            r = float(np.median(self._first_last))
            if r < 1e-3:
                self.report.add("vanishing-gradients", Severity.WARNING,
                                f"first/last layer gradient RMS ratio is {r:.2g} (< 1e-3)",
                                value=r, threshold=1e-3)
            elif r > 1e3:
                self.report.add("exploding-gradients", Severity.WARNING,
                                f"first/last layer gradient RMS ratio is {r:.2g} (> 1e3)",
                                value=r, threshold=1e3)
        self._schedule_findings(state)
        if self._steps_checked >= 5 and self._gradless_steps > self._steps_checked / 2:
            self.report.add("step-without-grad", Severity.ERROR,
                            f"in {self._gradless_steps} of {self._steps_checked} steps the "
                            "optimizer stepped while neither the first nor the last "
                            "trainable tensor had a gradient (.grad was None)", value=self._gradless_steps,
                            steps=self._steps_checked)
        if not self._logits_bad:
            self._ratio_findings(state.total_steps)
            self._dead_findings()
            unchanged = [n for n, p in model.named_parameters()
                         if n in self._start and n not in self.frozen
                         and torch.equal(p.detach(), self._start[n])]
            if unchanged and state.step > 0:
                self.report.add("params-never-change", Severity.ERROR,
                                f"{len(unchanged)} trainable tensors never changed in "
                                f"{state.step} steps: {', '.join(unchanged[:5])}",
                                modules=unchanged)
        self.report.series["monitor"] = self.series
        return self.report

    def _schedule_findings(self, state: TrainState) -> None:
        """The learning rate, as the optimizer held it after each of the first ``lr_window``
        steps: falling below 1% of an earlier value there, or staying below 1% of the base lr a
        scheduler recorded (``initial_lr``), is a schedule that ends training before it
        starts. Warm-up (a rise) never counts."""
        lrs = self._lrs
        if len(lrs) < 10:
            return
        # the base lr a scheduler attached to the optimizer records (at any time in the run)
        base = state.optimizer.param_groups[0].get("initial_lr") \
            if state.optimizer.param_groups else None
        initial = float(base) if isinstance(base, (int, float)) else None
        peak, fell_at = 0.0, None
        for i, lr in enumerate(lrs):
            if peak > 0 and lr <= 0.01 * peak * (1 + 1e-6):
                fell_at = i
                break
            peak = max(peak, lr)
        if fell_at is not None:
            self.report.add("lr-schedule", Severity.ERROR,
                            f"the learning rate fell from {peak:.3g} to {lrs[fell_at]:.3g} "
                            f"by step {fell_at + 1} (below 1% of its peak; "
                            f"{lrs[-1]:.3g} at step {len(lrs)})", value=lrs[fell_at],
                            peak=peak, step=fell_at + 1)
        elif initial and max(lrs) < 0.01 * initial:
            self.report.add("lr-schedule", Severity.ERROR,
                            f"a scheduler holds the learning rate at {max(lrs):.3g} or below "
                            f"for the first {len(lrs)} steps, under 1% of its base lr "
                            f"{initial:.3g}", value=max(lrs), base=initial)

    def _ratio_findings(self, total_steps: int) -> None:
        """Error when a layer's median ratio is outside [1e-5, 1e-1]; warning when most layers
        are outside [1e-4, 1e-2] (one small layer, such as a head, may sit a little outside).
        The medians are over the second half of the run when it has samples there: warm-up
        and the peak of a one-cycle schedule are meant to take large steps."""
        meds = {}
        for n, pts in self._ratios.items():
            if n in self.scale_invariant:
                continue
            late = [r for st, r in pts if st > total_steps / 2]
            vals = late if len(late) >= 2 else [r for _, r in pts]
            if len(vals) >= 2 and float(np.median(vals)) > 0:
                meds[n] = float(np.median(vals))
        if not meds:
            return
        self.report.context["update_ratio_median"] = meds
        # One layer stepping by a tenth of its size or more is unstable on its own; far too
        # small steps matter when they are the rule (a slow layer among learning ones is not
        # broken: small biases-like tensors and heads often sit there).
        far = {n: m for n, m in meds.items() if m > 1e-1}
        low = {n: m for n, m in meds.items() if m < 1e-5}
        if len(low) > len(meds) / 2:
            far.update(low)
        out = {n: m for n, m in meds.items() if m > 1e-2 or m < 1e-4}
        if far:
            n, m = max(far.items(), key=lambda kv: abs(math.log10(kv[1]) + 3))
            self.report.add("update-ratio", Severity.ERROR,
                            f"median update/weight ratio of {n} is {m:.2g} (outside [1e-5, "
                            f"1e-1]); {len(far)} of {len(meds)} layers that far out",
                            value=m, threshold=[1e-5, 1e-1], module=n)
        elif len(meds) < 3:
            # In a normalized network most weights feed a normalization layer and are not
            # judged; one or two judged layers (often just the head) are not a majority, so
            # they warn only well outside the band (3× beyond it).
            wide = {n: m for n, m in meds.items() if m > 3e-2 or m < 3e-5}
            if wide:
                n, m = max(wide.items(), key=lambda kv: abs(math.log10(kv[1]) + 3))
                self.report.add("update-ratio", Severity.WARNING,
                                f"median update/weight ratio of {n} is {m:.2g}, outside "
                                f"[3e-5, 3e-2] (only {len(meds)} layer(s) judged: the others "
                                "feed normalization layers)", value=m, threshold=[3e-5, 3e-2],
                                module=n)
        elif len(out) > len(meds) / 2:
            n, m = max(out.items(), key=lambda kv: abs(math.log10(kv[1]) + 3))
            self.report.add("update-ratio", Severity.WARNING,
                            f"{len(out)} of {len(meds)} layers have a median update/weight "
                            f"ratio outside [1e-4, 1e-2], e.g. {n} at {m:.2g}",
                            value=m, threshold=[1e-4, 1e-2], module=n)

    def _dead_findings(self) -> None:
        for name, ever in self._dead_seen.items():
            dead = float((ever == 0).float().mean())
            if dead > 0.5 and len(ever) >= 4:
                self.report.add("dead-channels", Severity.WARNING,
                                f"{dead:.0%} of {name}'s {len(ever)} channels never activated "
                                "in any sampled batch", value=dead, threshold=0.5, module=name)
                return
