"""Findings: one per root cause, with severity, evidence, cause, fix and the rule's source.

Every check in the doctor reports through :class:`Finding`. The catalogue :data:`RULES` holds what
does not depend on the measurement (title, likely cause, fix, where the rule comes from); a check
adds the evidence: the measured value against its threshold, and the step and module where it was
seen.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RULES", "Finding", "Report", "Rule", "Severity", "tier_of"]

IVANOV = "Ivanov, '37 Reasons why your Neural Network is not working' (2017)"
KARPATHY = "Karpathy, 'A Recipe for Training Neural Networks' (2019)"
SMITH = "Smith, 'Cyclical Learning Rates for Training Neural Networks' (2017), LR range test"
CS231N = "CS231n notes, 'Babysitting the learning process' (update/weight ratio about 1e-3)"
BARZ = "Barz & Denzler, 'Do We Train on Test Data?' (ciFAIR, 2020)"
DEEPDIAG = "Wardat et al., 'DeepDiagnosis' (ICSE 2022), symptom catalogue"
NORTHCUTT = "Northcutt et al., 'Confident Learning' (JAIR 2021): label noise from held-out predictions"
SCHEDULERS = "PyTorch docs, 'How to adjust learning rate' (epoch-based schedulers step once an epoch)"


class Severity(enum.IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2
    CRITICAL = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    cause: str
    fix: str
    source: str


def _r(id: str, title: str, cause: str, fix: str, source: str) -> Rule:
    return Rule(id, title, cause, fix, source)


RULES: dict[str, Rule] = {r.id: r for r in [
    # ------------------------------------------------------------------------------ data
    _r("labels-range", "Labels outside 0..C-1",
       "Labels are 1-based, or the class list is shorter than the labels.",
       "Map labels to 0..C-1 (for 1-based labels subtract 1) and check the class list.", IVANOV),
    _r("class-missing", "A class has no training images",
       "A class folder is empty or was filtered out; the model can never predict it.",
       "Add images for the class or drop it from the class list.", IVANOV),
    _r("class-imbalance", "Classes are imbalanced beyond 3:1",
       "Some classes have many more images than others; accuracy will favour them.",
       "Resample or weight the loss by class, and report per-class accuracy.", IVANOV),
    _r("input-unnormalized", "Inputs are not normalized (0-255 range fed as floats)",
       "Pixels reach the model as 0..255 instead of being scaled and standardized.",
       "Divide by 255 and standardize with the training split's mean and std.", IVANOV),
    _r("input-scaled-twice", "Inputs are scaled twice",
       "The /255 (or the standardization) is applied twice, so inputs are nearly constant.",
       "Scale once: check the loader and the transform for a second /255 or normalization.",
       IVANOV),
    _r("input-std", "Per-channel std after normalization is outside [0.5, 2]",
       "Normalization statistics do not fit the data the model sees.",
       "Compute mean and std on the training split, after any resizing, and apply them once.",
       IVANOV),
    _r("norm-stats-not-train", "Normalization statistics do not come from the training split",
       "Mean/std were computed on other data (ImageNet constants, the test split, or all data).",
       "Compute per-channel mean and std on the training split only.", KARPATHY),
    _r("channel-order", "Images look like HWC memory read as CHW",
       "An H×W×C array was reshaped (not permuted) to C×H×W, scrambling pixels and channels.",
       "Use permute(0, 3, 1, 2) (or numpy transpose) instead of reshape/view.", IVANOV),
    _r("input-nonfinite", "Inputs contain NaN or Inf",
       "A corrupt file, a division by zero in preprocessing, or a bad normalization constant.",
       "Find the images with non-finite values and fix or drop them; check std for zeros.",
       IVANOV),
    _r("blank-images", "Constant or blank images",
       "Some images have a single value everywhere (failed decodes, padding, or augmentation "
       "that blanks images).", "Drop the blank files, or fix the augmentation that blanks them.",
       IVANOV),
    _r("duplicates-within", "Exact duplicates within a split",
       "The same image appears more than once (by SHA-256 of its decoded pixels).",
       "Deduplicate, keeping one copy; conflicting labels need a decision.", BARZ),
    _r("train-test-leak", "Test images also appear in training",
       "Exact copies of test images are in the training split (by SHA-256 of decoded pixels), "
       "so test accuracy overstates generalization.",
       "Remove the copies from training (`cifarlab data dupes` lists them).", BARZ),
    _r("near-duplicates", "Test images are transformed copies of training images",
       "Test images match training images once mirrored, brightness-shifted or re-encoded; the "
       "exact-hash check cannot see them. Copies (correlation at least 0.999) are leaks; "
       "close matches below that are suspects, as in ciFAIR.",
       "Remove the copies from training; look at the suspects (ciFAIR replaced such test "
       "images with new ones).", BARZ),
    _r("split-mismatch", "Validation inputs are preprocessed differently from training",
       "The splits' per-channel statistics differ far beyond sampling noise: a different "
       "normalization (or none) for validation or test, or training data that passes through "
       "a transform the others skip.",
       "Preprocess every split with the same transform and the training split's statistics.",
       IVANOV),
    _r("data-order", "Training batches are not shuffled",
       "The loader yields the data in stored order (often sorted by label), so each batch "
       "holds only a few classes and the model chases the latest class.",
       "Shuffle the training data every epoch (DataLoader(..., shuffle=True)).", IVANOV),
    # ----------------------------------------------------------------------------- model
    _r("params-not-in-optimizer", "Trainable parameters are missing from the optimizer",
       "The optimizer was built before a layer was added, or from a subset of the parameters.",
       "Build the optimizer from model.parameters() after the model is complete.", IVANOV),
    _r("frozen-layer", "Layers are frozen (requires_grad=False)",
       "A layer's weights were frozen, so it never learns.",
       "Set requires_grad=True, or declare the layer as intentionally frozen.", IVANOV),
    _r("softmax-before-ce", "Softmax or log-softmax in front of CrossEntropyLoss",
       "CrossEntropyLoss applies log-softmax itself; a second one squashes the gradients.",
       "Return raw logits from the model; apply softmax only for reporting.", IVANOV),
    _r("log-softmax-before-ce", "Log-softmax in front of CrossEntropyLoss (harmless)",
       "CrossEntropyLoss applies log-softmax itself; log-softmax is idempotent, so the loss and "
       "its gradients are exactly those of the raw logits.",
       "Nothing to fix; returning raw logits saves one operation.", IVANOV),
    _r("nll-input", "NLLLoss is not fed log-probabilities",
       "NLLLoss expects log-probabilities (log_softmax output). Fed raw scores it is unbounded "
       "below (the loss falls forever by inflating one logit); fed probabilities (softmax) its "
       "gradients are squashed and it is never below -1.",
       "Apply log_softmax before NLLLoss, or return raw logits and use CrossEntropyLoss.",
       IVANOV),
    _r("label-conflict", "Identical images with different labels",
       "The same image (by SHA-256 of its decoded pixels, or a mirrored or brightness-shifted "
       "copy) carries different labels: a folder copied into another class, or label noise.",
       "Decide each image's label and remove the other copies (`cifarlab data dupes`).", BARZ),
    _r("stacked-linear", "Stacked linear layers with no nonlinearity between them",
       "Two linear maps in a row collapse into one; the extra layer adds nothing.",
       "Put an activation (ReLU/GELU) between the layers, or merge them.", IVANOV),
    _r("wrong-mode", "BatchNorm or dropout in the wrong mode",
       "model.eval() during training (or model.train() during evaluation).",
       "Call model.train() before the training loop and model.eval() before evaluating.",
       IVANOV),
    # ------------------------------------------------------------------------- behaviour
    _r("initial-loss", "Initial loss is far from ln C",
       "At initialization a classifier should predict about uniformly: loss ≈ ln C. A much "
       "larger loss means saturated logits (unnormalized inputs, a large init or output scale).",
       "Check input scaling and the last layer's init (small weights, zero bias).", KARPATHY),
    _r("cannot-overfit", "Cannot overfit one batch",
       "The model cannot memorize 32 examples: the learning rate is far too low or too high, "
       "weight decay dominates, gradients do not flow, or the architecture is broken.",
       "Fix this first: overfitting one batch is the smallest test that training works.",
       KARPATHY),
    _r("label-leak", "Shuffled labels beat chance on validation",
       "With random labels the model should not generalize; if it does, labels leak into the "
       "inputs or the validation split overlaps training.",
       "Look for label information in the inputs and for train/val overlap.", KARPATHY),
    _r("no-label-signal", "The real labels carry no more signal than shuffled ones",
       "Labels are shuffled or misaligned with their images, so nothing can be learned.",
       "Check that images and labels are loaded and shuffled together.", IVANOV),
    _r("ignores-input", "Training on real inputs is no better than on zero inputs",
       "The model does not use its input: inputs are blanked, detached or overwritten.",
       "Check augmentation and preprocessing for an operation that erases the image.",
       KARPATHY),
    _r("batch-dependence", "Samples in a batch depend on each other in eval mode",
       "A reshape/view or a reduction mixes the batch dimension.",
       "Check view/reshape calls: keep the batch dimension first and separate.", KARPATHY),
    _r("nondeterministic-eval", "Two evaluation passes give different outputs",
       "Dropout (or another stochastic layer) is active at evaluation.",
       "Call model.eval() before evaluation.", IVANOV),
    _r("lr-too-high", "The configured learning rate is above the LR range test's loss minimum",
       "The learning rate is in the region where the loss rises: training will diverge or "
       "oscillate.", "Use a learning rate near the suggestion (steepest descent).", SMITH),
    _r("lr-too-low", "The configured learning rate is far below the LR range test's suggestion",
       "Training will be very slow or stall.", "Raise the learning rate towards the suggestion.",
       SMITH),
    _r("lr-suggestion", "LR range test", "", "", SMITH),
    _r("momentum-high", "Momentum is too high",
       "With momentum (or Adam's beta1) above 0.99 the step averages over more than 100 past "
       "gradients: training overshoots and oscillates unless the learning rate is tiny.",
       "Use momentum 0.9 (beta1 0.9), or lower the learning rate with it.", IVANOV),
    _r("output-range", "The model's outputs pass through a bounded activation before the loss",
       "A ReLU, sigmoid or tanh after the last layer bounds the logits that cross-entropy "
       "expects unbounded: the loss has a floor (sigmoid, tanh) or classes stop receiving "
       "gradient (ReLU).", "Return the last Linear layer's output as it is; the loss applies "
       "the softmax.", DEEPDIAG),
    _r("loss-weights", "Class weights of the loss silence some classes",
       "The loss's class weights are zero, or differ by more than 100×, for some classes: "
       "those classes contribute (almost) nothing to the gradient.",
       "Recompute the weights from the training set's class counts (inverse frequency), "
       "over every class.", IVANOV),
    _r("dropout-high", "Dropout drops most of the activations",
       "A dropout probability of 0.75 or more, often a keep probability passed where the "
       "drop rate is expected (TensorFlow 1's keep_prob): the model cannot fit even one "
       "batch with it, and can without it.",
       "Pass the drop rate (p = 1 - keep_prob), typically 0.1 to 0.5.", IVANOV),
    _r("weight-decay-high", "Weight decay is so strong that the model cannot fit",
       "With the configured weight decay the model cannot memorize one batch; with weight "
       "decay off it can: the decay pulls the weights to zero faster than the gradients move "
       "them.", "Lower weight decay (typical: 5e-4 for SGD, 0.01-0.1 for AdamW's decoupled "
       "decay).", IVANOV),
    _r("label-noise", "Many training labels disagree with their images",
       "A model trained on part of the training set agrees with the held-out training labels "
       "much less often than with the validation labels: a large share of training labels "
       "is wrong (noisy annotation, a labelling bug).",
       "Inspect the training images the model confidently disagrees with; relabel or drop "
       "them (confident learning).", NORTHCUTT),
    _r("step-without-grad", "optimizer.step() runs without gradients",
       "When the optimizer steps, no parameter holds a gradient: the loop calls step() before "
       "loss.backward(), clears the gradients between backward() and step(), or never calls "
       "backward().", "Order each step as zero_grad(), forward, loss.backward(), step().",
       IVANOV),
    _r("step-fn", "Your training step breaks training",
       "One batch cannot be memorized with the training step you gave, but can with a plain "
       "step (zero_grad, forward, backward, step) and the same model, optimizer and loss: the "
       "step changes the inputs or labels (an augmentation, labels shuffled apart from their "
       "images), the mode, the gradients (clipping, scaling) or the update.",
       "Compare your step with the plain one line by line; check what it does to x, y and "
       "the gradients.", KARPATHY),
    _r("lr-schedule", "The learning-rate schedule collapses at the start of training",
       "The scheduler drives the learning rate to (almost) zero within the first steps: an "
       "epoch-based scheduler (StepLR, ExponentialLR, CosineAnnealingLR with T_max in "
       "epochs) stepped every batch, or a warm-up counted in steps but stepped per epoch.",
       "Step epoch-based schedulers once per epoch, or give their horizon in batches.",
       SCHEDULERS),
    # -------------------------------------------------------------------------- runtime
    _r("nonfinite-loss", "The loss became NaN or Inf",
       "A module produced NaN/Inf: too high a learning rate, a log or division of zero, or "
       "NaN in the inputs.", "Start from the module named; lower the lr or fix the inputs.",
       IVANOV),
    _r("exploding-gradients", "Exploding gradients",
       "Gradient norms spike far above their running median or the ratio between first and "
       "last layer explodes.", "Lower the learning rate, clip gradients, check init.", DEEPDIAG),
    _r("vanishing-gradients", "Vanishing gradients",
       "The first layers get gradients orders of magnitude smaller than the last.",
       "Use normalization, residual paths or better init; avoid saturating activations.",
       DEEPDIAG),
    _r("update-ratio", "Update-to-weight ratio outside [1e-4, 1e-2]",
       "Each step changes the weights too much (lr too high) or too little (lr too low).",
       "Adjust the learning rate so that updates are about 1e-3 of the weights.", CS231N),
    _r("dead-channels", "Dead activation channels",
       "Many channels never activate: dead ReLUs from a large lr or bad init.",
       "Lower the lr, use a leaky activation or better init.", DEEPDIAG),
    _r("plateau", "The loss stays above 0.9·ln C",
       "The network is not learning: lr far too low (or so high that it bounces), weights "
       "decayed to zero, or labels that are noise.",
       "Run the preflight checks; try the LR range test's suggestion; check weight decay and "
       "labels.", DEEPDIAG),
    _r("params-never-change", "Parameters never change during training",
       "Their gradient is always zero or None, or they are not in the optimizer.",
       "Check the optimizer's parameter groups and that the layer is on the loss's path.",
       IVANOV),
    _r("grad-accumulation", "Gradients accumulate across optimizer steps",
       "optimizer.zero_grad() is not called, so each step adds all previous gradients.",
       "Call optimizer.zero_grad() once per step (or on purpose after an accumulation window).",
       IVANOV),
]}


# Root causes outrank the symptoms they produce: one finding per root cause. Tier 0 are bugs in
# data, model or training code; tier 1 are diagnoses of hyperparameters or initialization; tier
# 2 are symptoms. When a lower tier holds an alarm, alarms of higher tiers become notes that say
# which finding they are probably a consequence of. A finding may carry its own tier in its
# evidence ("tier"): evidence decides, so an initial loss thousands of times ln C (direct
# evidence of a broken scale or init) ranks as a diagnosis, not a symptom, and a learning-rate
# verdict from a range test that did not behave ranks as a symptom.
TIERS: dict[str, int] = {
    **dict.fromkeys(["labels-range", "class-missing", "input-nonfinite", "input-unnormalized",
                     "input-scaled-twice", "channel-order", "train-test-leak", "blank-images",
                     "softmax-before-ce", "nll-input", "label-conflict",
                     "log-softmax-before-ce", "stacked-linear", "params-not-in-optimizer",
                     "split-mismatch", "data-order", "output-range", "loss-weights",
                     "label-noise", "lr-schedule", "step-without-grad", "step-fn",
                     "frozen-layer", "wrong-mode", "grad-accumulation", "nondeterministic-eval",
                     "batch-dependence", "label-leak", "class-imbalance", "input-std",
                     "norm-stats-not-train", "duplicates-within", "near-duplicates"], 0),
    **dict.fromkeys(["lr-too-high", "lr-too-low", "no-label-signal", "ignores-input",
                     "vanishing-gradients",
                     "momentum-high", "dropout-high", "weight-decay-high",
                     "params-never-change", "lr-suggestion"], 1),
    **dict.fromkeys(["cannot-overfit", "plateau", "update-ratio", "exploding-gradients",
                     "dead-channels", "initial-loss", "nonfinite-loss"], 2),
}


def tier_of(f: Finding) -> int:
    """The finding's rank: its own evidence's tier if it carries one, else its rule's."""
    tier = f.evidence.get("tier")
    return int(tier) if isinstance(tier, int) else TIERS[f.rule]


@dataclass
class Finding:
    """One root cause, with the evidence that shows it."""

    rule: str
    severity: Severity
    message: str  # the measurement in words: value against threshold
    evidence: dict[str, Any] = field(default_factory=dict)  # value, threshold, step, module...

    @property
    def title(self) -> str:
        return RULES[self.rule].title

    def to_dict(self) -> dict[str, Any]:
        r = RULES[self.rule]
        return {"rule": self.rule, "severity": str(self.severity), "title": r.title,
                "message": self.message, "evidence": _jsonable(self.evidence),
                "cause": r.cause, "fix": r.fix, "source": r.source}

    def one_line(self) -> str:
        return f"{self.severity!s:8s} {self.rule}: {self.message}"


@dataclass
class Report:
    """What the doctor found, plus the series its HTML page plots."""

    findings: list[Finding] = field(default_factory=list)
    checks_run: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)  # step -> loss, grad norms, ratios...
    context: dict[str, Any] = field(default_factory=dict)  # model, data, seconds per phase

    def add(self, rule: str, severity: Severity, message: str, **evidence: Any) -> Finding:
        """Add a finding, keeping one per rule: a repeat with higher severity replaces it."""
        if rule not in RULES:
            raise KeyError(f"unknown doctor rule {rule!r}")
        new = Finding(rule, severity, message, evidence)
        for i, f in enumerate(self.findings):
            if f.rule == rule:
                if severity > f.severity:
                    self.findings[i] = new
                return self.findings[i]
        self.findings.append(new)
        return new

    def extend(self, other: Report) -> None:
        for f in other.findings:
            self.add(f.rule, f.severity, f.message, **f.evidence)
        self.checks_run += [c for c in other.checks_run if c not in self.checks_run]
        self.series.update(other.series)
        self.context.update(other.context)

    def consolidate(self) -> Report:
        """Keep alarms for the most basic root causes found; later-tier alarms become notes."""
        alarms = [f for f in self.findings if f.severity >= Severity.WARNING]
        if not alarms:
            return self
        root_tier = min(tier_of(f) for f in alarms)
        roots = [f.rule for f in alarms if tier_of(f) == root_tier]
        for f in alarms:
            if tier_of(f) > root_tier:
                f.evidence["was"] = str(f.severity)
                f.evidence["consequence_of"] = roots
                f.severity = Severity.INFO
                f.message += f" (probably a consequence of: {', '.join(roots)})"
        return self

    def alarms(self, at_least: Severity = Severity.WARNING) -> list[Finding]:
        return [f for f in self.findings if f.severity >= at_least]

    @property
    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def exit_code(self) -> int:
        """0 when nothing is an error, 1 otherwise (for CI use)."""
        return 1 if self.worst is not None and self.worst >= Severity.ERROR else 0

    def ranked(self) -> list[Finding]:
        """Most severe first; among equals, the most basic cause (lowest tier) first."""
        return sorted(self.findings, key=lambda f: (-f.severity, tier_of(f)))

    def to_dict(self) -> dict[str, Any]:
        ordered = self.ranked()
        return {"findings": [f.to_dict() for f in ordered], "checks_run": self.checks_run,
                "context": _jsonable(self.context), "series": _jsonable(self.series)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = []
        for f in self.ranked():
            r = RULES[f.rule]
            lines.append(f"[{f.severity!s:>8}] {r.title}  ({f.rule})")
            lines.append(f"           evidence: {f.message}")
            if r.cause:
                lines.append(f"           cause:    {r.cause}")
            if r.fix:
                lines.append(f"           fix:      {r.fix}")
            lines.append(f"           source:   {r.source}")
        n_err = sum(f.severity >= Severity.ERROR for f in self.findings)
        n_warn = sum(f.severity == Severity.WARNING for f in self.findings)
        lines.append(f"{len(self.checks_run)} checks run: {n_err} error(s), {n_warn} warning(s), "
                     f"{len(self.findings) - n_err - n_warn} note(s).")
        return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
