"""LoRA self-distillation: teach a pruned model to match its dense teacher on the teacher's text.

Pruning removes FFN rows and (optionally) refits each layer in isolation; what no layer-wise
refit can repair is the error that compounds through the layers up to the logits. This module
fits low-rank adapters (peft LoRA) on every attention and FFN projection of the pruned model so
that its next-token distributions match the dense model's, and merges them back into plain
weights. No dataset is read: the text is the one the teacher writes itself from its start token
(`prunenet.analysis.selfgen.own_text`, cached per teacher, so it is generated once per teacher).

Defaults, measured on SmolLM2-135M pruned at 30% by the `prunenet prune` default
(docs/recovery.md), rank 8, 1 CPU thread on a shared 2-core machine: the text is
the one `prunenet prune` writes (256 x 256 tokens, seed 0, cached under the dense model's
weights), so after a prune it costs nothing; 60 steps of 2 x 256 tokens (about 30k tokens,
less than one pass over the 240 training sequences) at a peak learning rate of 3e-3 took
7-9 minutes and lowered the held-out KL 0.448 -> 0.388 and perplexity (8 x 512-token windows
of BoolQ / LAMBADA / code) by 12% / 6% / 4.5%. A peak of 8e-3 made the held-out KL worse for
40 steps (0.448 -> 0.507 -> 0.447 at the end); the hidden-state term (`hidden_weight` 1) gave
the same KL and perplexity within 0.4%. An earlier default (160 x 128 tokens written by
recover itself, lr 1e-3) memorised a smaller text: with 64 x 128 tokens the held-out KL
stopped improving after 25 steps while the training KL kept falling.

Loss, per position t of every sequence: KL(p_teacher(. | x_<=t) || p_student(. | x_<=t)), summed
over the vocabulary and averaged over positions. The forward KL is the teacher-weighted one: it
asks the student to cover everything the teacher finds likely, which is what perplexity
measures, and it is the same quantity `prunenet eval --reference` reports.

A quarter of the sequences, at most 16, is held out (never trained on). The held-out KL is
measured before training and every `eval_every` steps; the adapter state with the lowest
held-out KL is kept (including "no change" when no step improved it), so recovery can never
make the held-out KL worse than the pruned model's.

Why this module is long: the teacher's text, the KL and hidden-state losses, the held-out
early stopping and the resumable training loop share the same batches and adapter state; split
up, each part would pass all of them around.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.devices import model_device
from prunenet.errors import PruneNetError
from prunenet.evaluation.divergence import per_token_kl

if TYPE_CHECKING:  # peft is imported when adapters are attached: `prunenet --help` stays fast
    from peft import PeftModel

# The text `prunenet prune` writes by default (256 x 256 tokens, seed 0) and caches under the
# dense model's weights: after a default prune, recovering from the same dense model costs no
# generation at all (module docstring).
DEFAULT_TEXT = ANALYSIS_SELFGEN
METHODS = ("lora", "full")
# Peak learning rates by method. LoRA's was measured (docs/recovery.md: 8e-3 undid its first
# steps' damage for 40 steps); a full update moves every weight, so it needs a far smaller one.
DEFAULT_LR = {"lora": 3e-3, "full": 1e-4}
# Steps timed before a time budget's step count is fitted: the first one also pays for
# allocating the optimiser's state.
CALIBRATION_STEPS = 3


@dataclass(frozen=True)
class RecoveryConfig:
    """How a pruned model is distilled from its teacher.

    :param steps: optimiser steps (each on `batch_sequences` training sequences).
    :param method: `lora` (low-rank adapters on every projection, merged at the end) or `full`
        (every weight trained directly but the input and output embeddings, tied in SmolLM2 and
        Gemma 3, which stay as they are; `train_full`).
    :param rank: LoRA rank r of every adapted projection (`lora` only).
    :param alpha: LoRA scaling numerator (the update is B @ A * alpha / r); None means 2 x rank,
        the common choice that keeps the update's scale independent of r.
    :param lr: peak AdamW learning rate of the trained weights (after a short linear warm-up it
        decays along a cosine to zero at `steps`); None: the method's `DEFAULT_LR`.
    :param batch_sequences: training sequences per step (and per held-out forward pass).
    :param eval_every: measure the held-out KL every this many steps (and after the last one).
    :param held_out_fraction: fraction of the teacher's sequences never trained on (at least 1,
        at most `held_out_max`).
    :param held_out_max: the most sequences held out: every evaluation runs the model on all of
        them, so with the default 256 sequences a quarter (64 x 256 tokens) would cost as much
        as 16 training steps per evaluation.
    :param hidden_weight: weight of a hidden-state term added to the KL: the mean over decoder
        layers and positions of |h_model - h_teacher|^2 / |h_teacher|^2 (each layer's output,
        each position normalised by the teacher's norm there). 0 turns it off; it needs a
        teacher of the model's depth and width (otherwise only the KL is used, and the report
        says so).
    :param seed: seeds the LoRA initialisation and the order of training sequences; the text
        itself comes from `text.seed`, so changing this never regenerates it.
    :param text: how much text the teacher writes for itself (sequences x length tokens).
    :param budget_minutes: train for about this many minutes instead of a fixed step count:
        the steps and held-out evaluations after the teacher's text and logits (which come
        first and are not counted). The step count is fitted after `CALIBRATION_STEPS` steps
        so the learning rate's cosine ends with the budget; `steps` is then the most steps.
        None: exactly `steps`.
    """

    steps: int = 60
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None
    lr: float | None = None
    batch_sequences: int = 2
    eval_every: int = 20
    held_out_fraction: float = 0.25
    held_out_max: int = 16
    hidden_weight: float = 0.0
    seed: int = 0
    text: SelfGenConfig = DEFAULT_TEXT
    budget_minutes: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch_sequences", "eval_every", "held_out_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruneNetError(f"{name} must be a whole number of at least 1, got {value!r}.")
        if self.method not in METHODS:
            raise PruneNetError(
                f"Unknown recovery method {self.method!r}; choose {' or '.join(METHODS)}."
            )
        budget = self.budget_minutes
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise PruneNetError(
                f"The time budget must be a positive number of minutes, got {budget!r}."
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise PruneNetError(f"The learning rate must be a positive number, got {self.lr!r}.")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PruneNetError(f"LoRA alpha must be a positive number, got {self.alpha!r}.")
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            raise PruneNetError(
                f"The hidden-state weight must be a number of at least 0, got "
                f"{self.hidden_weight!r}."
            )
        if not 0.0 < self.held_out_fraction < 1.0:
            raise PruneNetError(
                f"held_out_fraction must be in (0, 1), got {self.held_out_fraction!r}."
            )
        if self.text.sequences < 2:
            raise PruneNetError(
                f"Recovery needs at least 2 self-generated sequences (one to train on, one held "
                f"out), got {self.text.sequences}; ask for more sequences or tokens."
            )

    @property
    def peak_lr(self) -> float:
        """`lr`, or the method's default peak when it is None."""
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def held_out_sequences(self) -> int:
        """How many of the teacher's sequences are held out (the last ones)."""
        share = round(self.text.sequences * self.held_out_fraction)
        return max(1, min(self.held_out_max, share, self.text.sequences - 1))


@dataclass
class RecoveryReport:
    """What a recovery run did: enough to reproduce it and to judge it.

    :param steps: optimiser steps run (the best state is kept): `RecoveryConfig.steps`, or
        with a time budget the count fitted to it.
    :param budget_minutes: the time budget (None: a fixed step count).
    :param best_step: the step whose adapter state was kept (0: none improved on the input).
    :param train_losses: training KL (nats/token) of every step, on that step's batch.
    :param held_out: `[step, held-out KL]` at every evaluation, step 0 included.
    :param held_out_kl_before: mean KL(teacher || pruned) on the held-out text, nats/token.
    :param held_out_kl_after: the same for the kept state (the recovered model).
    :param seconds: wall time of the recovery (text, evaluations and training).
    :param seed: `RecoveryConfig.seed`.
    :param method: `lora` or `full`.
    :param rank: LoRA rank (as configured; unused by `full`).
    :param alpha: LoRA alpha.
    :param lr: peak learning rate.
    :param batch_sequences: sequences per step.
    :param eval_every: steps between held-out evaluations.
    :param hidden_weight: the hidden-state term's weight actually used (0 when the teacher's
        depth or width differs from the model's, whatever was asked).
    :param train_tokens: tokens in the training sequences.
    :param held_out_tokens: tokens in the held-out sequences.
    :param text: the self-generation settings of the teacher's text.
    :param target_modules: the projections that got adapters (full module names); `full`: the
        names of the trained parameters.
    :param trainable_parameters: parameters trained (LoRA: adapters, folded in by the merge).
    """

    steps: int
    budget_minutes: float | None
    best_step: int
    train_losses: list[float]
    held_out: list[list[float]]
    held_out_kl_before: float
    held_out_kl_after: float
    seconds: float
    seed: int
    method: str
    rank: int
    alpha: float
    lr: float
    batch_sequences: int
    eval_every: int
    hidden_weight: float
    train_tokens: int
    held_out_tokens: int
    text: dict
    target_modules: list[str]
    trainable_parameters: int

    def to_dict(self) -> dict:
        return asdict(self)


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every decoder layer's attention (q/k/v or fused qkv, output) and FFN
    projections (gate/up or fc1, down or fc2), from the architecture adapter.

    Full names, not suffixes like `q_proj`, so a multimodal model's vision tower (which uses
    the same suffixes) gets no adapter.

    :param model: a model of a supported architecture (`prunenet.core.arch`).
    """
    adapter = adapter_for(model.config)
    paths = list(adapter.inputs) + [adapter.output]
    if adapter.attention is not None:
        paths = [*adapter.attention.projections, adapter.attention.output, *paths]
    layers = len(decoder_layers(model))
    return [f"{adapter.layers}.{index}.{path}" for index in range(layers) for path in paths]


def attach_lora(model: PreTrainedModel, config: RecoveryConfig) -> PeftModel:
    """Wrap `model` (in place) with zero-initialised LoRA adapters; only they are trainable.

    peft initialises A at random and B at zero, so the wrapped model computes exactly what
    `model` did until the first step. A is drawn from torch's RNG seeded with `config.seed`
    inside a forked RNG, so the same seed gives the same adapters and the caller's RNG state is
    left alone.

    :param model: the pruned model.
    :param config: rank, alpha and seed.
    """
    from peft import LoraConfig, get_peft_model

    adapter = adapter_for(model.config)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=lora_target_modules(model),
        lora_dropout=0.0,  # dropout would make the held-out KL noisy and runs less comparable
        bias="none",  # biases (refit intercepts) stay as they are; only the LoRA matrices train
        fan_in_fan_out=adapter.layout == "conv1d",  # GPT-2's Conv1D stores weights in x out
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers' deprecated `is_gradient_checkpointing`; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora)


def train_full(model: PreTrainedModel) -> PreTrainedModel:
    """Make every parameter trainable but the input and output embeddings: they are tied in
    SmolLM2 and Gemma 3, so training them would also move the input side, and they are a
    fifth of a small model's weights (a fifth more gradient and optimiser memory if trained).

    :param model: the pruned model (changed in place and returned).
    """
    frozen = set()
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        if embedding is not None:
            frozen.update(id(parameter) for parameter in embedding.parameters())
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return model


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    config: RecoveryConfig | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[PeftModel | PreTrainedModel, RecoveryReport]:
    """Fit `student` so its next-token distributions match `teacher`'s on text the teacher
    writes itself (LoRA adapters, or every decoder weight with `method="full"`); keep the
    state with the lowest held-out KL.

    :param student: the pruned model (wrapped in place: use the returned model from now on).
    :param teacher: the dense model; same vocabulary
        (`prunenet.recovery.compatibility.check_same_vocabulary`), any depth or
        width. Left unchanged.
    :param config: the recovery settings (defaults: `RecoveryConfig()`).
    :param progress: show a tqdm bar with the training and held-out KL.
    :param clock: seconds, for the time budget (tests pass a simulated one).
    :return: the student holding the best state (LoRA: adapter-wrapped, merge it with
        `merge_adapters`, which returns a `full` student as it is), and the report.
    """
    config = config or RecoveryConfig()
    start = time.perf_counter()
    tokens = own_text(teacher, config.text).cpu()
    held_count = config.held_out_sequences
    train_tokens, held_tokens = tokens[:-held_count], tokens[-held_count:]
    device = model_device(student)
    # Teacher logits of the held-out text, computed once: every evaluation compares with them.
    # Memory: held-out tokens x vocabulary x 4 bytes (16 x 128 x 49k = 0.4 GB for SmolLM2).
    held_teacher = _logits(teacher, held_tokens, config.batch_sequences)
    hidden_weight = config.hidden_weight if _same_shape(student, teacher) else 0.0
    if config.hidden_weight > 0 and hidden_weight == 0:
        print(
            "prunenet recover: the teacher's depth or width differs from the model's; the "
            "hidden-state term is off, only the KL is fitted",
            file=sys.stderr,
        )
    model = attach_lora(student, config) if config.method == "lora" else train_full(student)
    # Eval mode throughout: no dropout anywhere, so a step's loss depends only on the weights
    # and the batch (gradients flow in eval mode all the same).
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.peak_lr, weight_decay=0.0)
    schedule = _WarmupCosine(config.steps)
    stepper = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = _batches(train_tokens.shape[0], config)

    started = clock()
    deadline = None if config.budget_minutes is None else started + 60 * config.budget_minutes
    best_kl = held_kl = _held_out_kl(model, held_tokens, held_teacher, config.batch_sequences)
    eval_seconds = clock() - started
    best_state, best_step = _adapter_state(model), 0
    held_out = [[0, held_kl]]
    losses: list[float] = []
    # With a time budget the count is known after the calibration steps (`steps` is a cap).
    total = config.steps if deadline is None else None
    bar = tqdm(total=total, desc="recover", disable=not progress, file=sys.stderr)
    step, loop_started = 0, clock()
    while step < schedule.steps:
        step += 1
        batch = train_tokens[next(batches)].to(device)
        hidden = hidden_weight > 0
        with torch.no_grad():  # not inference_mode: the loss's backward saves these logits
            target = teacher(input_ids=batch.to(model_device(teacher)), output_hidden_states=hidden)
        output = model(input_ids=batch, output_hidden_states=hidden)
        loss = kl_loss(target.logits.to(device).float(), output.logits.float())
        if hidden:
            loss = loss + hidden_weight * hidden_loss(target.hidden_states, output.hidden_states)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stepper.step()
        losses.append(loss.item())
        if deadline is not None and step == CALIBRATION_STEPS:
            schedule.steps = _steps_in_budget(
                config, step, (clock() - loop_started) / step, eval_seconds, deadline - clock()
            )
            bar.total = schedule.steps
            bar.refresh()
        out_of_time = deadline is not None and clock() >= deadline
        if step % config.eval_every == 0 or step >= schedule.steps or out_of_time:
            held_kl = _held_out_kl(model, held_tokens, held_teacher, config.batch_sequences)
            held_out.append([step, held_kl])
            if held_kl < best_kl:
                best_kl, best_state, best_step = held_kl, _adapter_state(model), step
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", held_out=f"{held_kl:.4f}", best=f"{best_kl:.4f}")
        if out_of_time:  # the machine got slower than the first steps said
            break
    bar.close()
    _load_adapter_state(model, best_state)
    report = RecoveryReport(
        steps=step,
        budget_minutes=config.budget_minutes,
        best_step=best_step,
        train_losses=losses,
        held_out=held_out,
        held_out_kl_before=held_out[0][1],
        held_out_kl_after=best_kl,
        seconds=time.perf_counter() - start,
        seed=config.seed,
        method=config.method,
        rank=config.rank,
        alpha=config.lora_alpha,
        lr=config.peak_lr,
        batch_sequences=config.batch_sequences,
        eval_every=config.eval_every,
        hidden_weight=hidden_weight,
        train_tokens=train_tokens.numel(),
        held_out_tokens=held_tokens.numel(),
        text=asdict(config.text),
        target_modules=(
            lora_target_modules(model.get_base_model())
            if config.method == "lora"
            else [n for n, p in model.named_parameters() if p.requires_grad]
        ),
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    return model, report


def merge_adapters(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """Fold every adapter into its projection's weight and return the plain model (a model
    trained with `method="full"` has none: it is returned as it is).

    The result has exactly the input's modules, shapes and config (per-layer widths, FFN
    biases), so it saves to a folder that loads the same way the pruned input did.

    :param model: the adapter-wrapped model `distill` returned.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if not hasattr(model, "merge_and_unload"):
        return model.eval()
    return model.merge_and_unload().eval()


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), in nats.

    :param teacher_logits: `batch x positions x vocab` (no gradient needed).
    :param student_logits: the same shape, from the model being trained.
    """
    vocab = teacher_logits.shape[-1]
    log_p = torch.log_softmax(teacher_logits.reshape(-1, vocab), dim=-1)
    log_q = torch.log_softmax(student_logits.reshape(-1, vocab), dim=-1)
    kl = nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return kl / log_p.shape[0]


def hidden_loss(teacher_states, student_states) -> torch.Tensor:
    """Mean over decoder layers and positions of |h_student - h_teacher|^2 / |h_teacher|^2.

    Each position is normalised by the teacher's own norm there, so the few positions with
    huge hidden states (the start token's) weigh as much as any other.

    :param teacher_states: the teacher's `hidden_states` (embeddings, then every layer's output).
    :param student_states: the student's, of the same depth and width.
    """
    terms = []
    for target, state in zip(teacher_states[1:], student_states[1:], strict=True):
        target = target.to(state.device).float()
        error = (state.float() - target).pow(2).sum(-1)
        terms.append((error / target.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


def _same_shape(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the two models' hidden states can be compared layer by layer."""
    configs = [model.config.get_text_config() for model in (student, teacher)]
    return len(decoder_layers(student)) == len(decoder_layers(teacher)) and (
        getattr(configs[0], "hidden_size", None) == getattr(configs[1], "hidden_size", None)
    )


class _WarmupCosine:
    """The learning rate's factor at each step: a linear warm-up, then a cosine to zero at
    `steps` (which a time budget sets after its first steps).

    A few warm-up steps keep Adam's first, poorly normalised updates small; the cosine ends
    near zero so the last states change slowly and the best one is not a lucky spike.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        warmup = max(1, min(10, self.steps // 10))
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, self.steps - warmup)))


def _steps_in_budget(
    config: RecoveryConfig, done: int, step_seconds: float, eval_seconds: float, left: float
) -> int:
    """How many steps in all fit the budget, `done` of them taken and `left` seconds of it
    left: each further step costs `step_seconds` plus its share of the held-out evaluations,
    and the last one ends with an evaluation. At least `done`, at most `config.steps`."""
    left = left - eval_seconds
    per_step = step_seconds + eval_seconds / config.eval_every
    more = math.floor(left / per_step) if per_step > 0 else config.steps
    return max(done, min(config.steps, done + more))


def _batches(count: int, config: RecoveryConfig) -> Iterator[torch.Tensor]:
    """Sequence indices of each step in turn: seeded shuffles of the training set, one after
    another (every sequence is seen once before any is seen twice), as many as are asked for."""
    generator = torch.Generator().manual_seed(config.seed)
    size = min(config.batch_sequences, count)
    stream: list[int] = []
    while True:
        while len(stream) < size:
            stream.extend(torch.randperm(count, generator=generator).tolist())
        yield torch.tensor(stream[:size])
        del stream[:size]


@torch.inference_mode()
def _logits(model: nn.Module, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    device = model_device(model)
    pieces = [model(input_ids=b.to(device)).logits.float().cpu() for b in tokens.split(batch)]
    return torch.cat(pieces)


def _held_out_kl(
    model: nn.Module, tokens: torch.Tensor, teacher_logits: torch.Tensor, batch: int
) -> float:
    """Mean KL(teacher || model) per held-out token (float64, as `prunenet eval` computes it)."""
    total, count = 0.0, 0
    for first in range(0, tokens.shape[0], batch):
        logits = _logits(model, tokens[first : first + batch], batch)
        per_token = per_token_kl(teacher_logits[first : first + batch], logits)
        total += per_token.sum().item()
        count += per_token.numel()
    return total / count


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in state:
                parameter.copy_(state[name])
