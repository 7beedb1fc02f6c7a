"""LoRA self-distillation: exact merges, a lower held-out KL, determinism, vocabulary checks."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.analysis.sequential import ANALYSIS_SELFGEN
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_widths
from prunenet.core.surgery import enable_output_biases, ffn_modules
from prunenet.errors import PruneNetError
from prunenet.io.loading import drop_remote_code, load_pruned
from prunenet.recovery.compatibility import check_same_vocabulary
from prunenet.recovery.distill import (
    RecoveryConfig,
    distill,
    hidden_loss,
    lora_target_modules,
    merge_adapters,
)
from prunenet.recovery.saving import RECOVER_REPORT_FILE, save_recovered
from tests.conftest import FFN_WIDTH, logits_of, tiny_model, tiny_tokenizer

# Small enough for a few seconds per test, large enough that 20 steps move the held-out KL.
TEXT = SelfGenConfig(sequences=32, length=16)
QUICK = RecoveryConfig(steps=20, eval_every=5, text=TEXT)


def pruned_pair(widths: tuple[int, int] = (12, 12), seed: int = 7):
    """(teacher, student): a tiny dense Llama and a copy with FFN rows removed at random."""
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.rand(FFN_WIDTH, generator=generator) for _ in widths]
    prune_model(student, scores, list(widths))
    return teacher, student


def parameters_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


# ----- the merged output ------------------------------------------------------------------------


def test_merged_model_reloads_with_the_adapter_models_logits(tmp_path: Path) -> None:
    teacher, student = pruned_pair()
    before = logits_of(student)
    adapted, report = distill(student, teacher, QUICK, progress=False)
    with_adapters = logits_of(adapted)
    assert report.best_step > 0
    assert not torch.allclose(with_adapters, before, atol=1e-5)  # the adapters did something

    save_recovered(merge_adapters(adapted), tiny_tokenizer(), tmp_path / "out", report.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits_of(reloaded), with_adapters, atol=1e-5, rtol=0)
    assert not any("lora" in name for name in reloaded.state_dict())


def test_per_layer_widths_and_ffn_biases_survive_recovery(tmp_path: Path) -> None:
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    enable_output_biases(student)  # Llama's mlp_bias: the lsq refit's intercepts live here
    with torch.no_grad():
        for layer in decoder_layers(student):
            ffn_modules(layer, adapter_for(student.config))[1].bias.normal_()
    prune_model(student, [torch.arange(FFN_WIDTH).float()] * 2, [14, 9])
    student.save_pretrained(tmp_path / "pruned")
    student = load_pruned(tmp_path / "pruned").eval()
    biases = [ffn_modules(layer, adapter_for(student.config))[1].bias.clone()
              for layer in decoder_layers(student)]  # fmt: skip

    adapted, report = distill(student, teacher, QUICK, progress=False)
    with_adapters = logits_of(adapted)
    save_recovered(merge_adapters(adapted), None, tmp_path / "out", report.to_dict())

    reloaded = load_pruned(tmp_path / "out").eval()
    assert ffn_widths(reloaded.config) == [14, 9]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((tmp_path / "pruned" / "config.json").read_text())
    # per_layer_config, mlp_bias and everything else (the folder also says how to load it
    # without prunenet, which a plain save_pretrained does not write)
    assert drop_remote_code(saved) == original
    for layer, bias in zip(decoder_layers(reloaded), biases, strict=True):
        torch.testing.assert_close(ffn_modules(layer, adapter_for(reloaded.config))[1].bias, bias)
    torch.testing.assert_close(logits_of(reloaded), with_adapters, atol=1e-5, rtol=0)


# ----- what the training does -------------------------------------------------------------------


def test_a_few_steps_lower_the_held_out_kl_to_the_teacher() -> None:
    teacher, student = pruned_pair()
    _, report = distill(student, teacher, QUICK, progress=False)
    assert report.held_out_kl_before > 0
    assert report.held_out_kl_after < 0.9 * report.held_out_kl_before
    assert report.held_out[0] == [0, report.held_out_kl_before]
    assert [step for step, _ in report.held_out] == [0, 5, 10, 15, 20]
    assert len(report.train_losses) == QUICK.steps


def test_no_improvement_keeps_the_pruned_weights_exactly() -> None:
    """A learning rate that only makes things worse: the best state is "no change"."""
    teacher, student = pruned_pair()
    expected = parameters_of(student)
    adapted, report = distill(
        student, teacher, RecoveryConfig(steps=5, lr=1e3, eval_every=1, text=TEXT), False
    )
    merged = merge_adapters(adapted)
    assert report.best_step == 0 and report.held_out_kl_after == report.held_out_kl_before
    for name, tensor in parameters_of(merged).items():
        assert torch.equal(tensor, expected[name]), name


def test_teacher_is_left_unchanged() -> None:
    teacher, student = pruned_pair()
    expected = parameters_of(teacher)
    distill(student, teacher, QUICK, progress=False)
    assert all(torch.equal(t, expected[n]) for n, t in parameters_of(teacher).items())


def test_same_seed_gives_identical_tensors_and_another_seed_different_ones() -> None:
    def recovered(seed: int, ambient: int) -> dict[str, torch.Tensor]:
        teacher, student = pruned_pair()
        torch.manual_seed(ambient)  # the global RNG's state must not matter, only the seed
        config = RecoveryConfig(steps=6, eval_every=3, seed=seed, text=TEXT)
        return parameters_of(merge_adapters(distill(student, teacher, config, False)[0]))

    first, again, other = recovered(0, ambient=1), recovered(0, ambient=2), recovered(1, 1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_a_student_with_fewer_layers_distils_from_a_deeper_teacher() -> None:
    """Depth may differ (pruning can drop layers): only the vocabulary must match."""
    teacher = tiny_model("llama")
    student = tiny_model("llama", seed=5, num_hidden_layers=1)
    _, report = distill(student, teacher, QUICK, progress=False)
    assert report.held_out_kl_after < report.held_out_kl_before


def test_the_default_text_is_the_one_prune_writes_and_caches() -> None:
    """Same settings, same cache key: after a default prune the teacher writes nothing."""
    assert RecoveryConfig().text == ANALYSIS_SELFGEN


def test_a_quarter_is_held_out_but_at_most_held_out_max_sequences() -> None:
    def held(sequences: int, **settings) -> int:
        text = SelfGenConfig(sequences=sequences, length=16)
        return RecoveryConfig(text=text, **settings).held_out_sequences

    assert held(256) == 16  # the default text: 16 held out, not 64
    assert held(32) == 8 and held(8) == 2 and held(2) == 1
    assert held(32, held_out_max=3) == 3
    teacher, student = pruned_pair()
    config = RecoveryConfig(steps=2, held_out_max=3, text=TEXT)
    _, report = distill(student, teacher, config, progress=False)
    assert report.held_out_tokens == 3 * 16 and report.train_tokens == 29 * 16


def test_hidden_loss_is_zero_for_equal_states_and_weighs_every_position_alike() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 8, generator=generator) for _ in range(3)]
    student = [state + 0.1 * torch.randn(state.shape, generator=generator) for state in teacher]
    assert hidden_loss(teacher, teacher).item() == 0.0
    loss = hidden_loss(teacher, student)
    assert loss.item() > 0
    # A position whose hidden states are 1000 times larger (the start token's) counts the same
    scaled = [state.clone() for state in teacher], [state.clone() for state in student]
    for states in scaled:
        for state in states:
            state[:, 0] *= 1000.0
    torch.testing.assert_close(hidden_loss(*scaled), loss)
    # The embeddings (first entry) are not compared: only the layers' outputs
    shifted = [teacher[0] + 1.0, *teacher[1:]]
    assert hidden_loss(teacher, shifted).item() == 0.0


def test_the_hidden_state_term_changes_the_fit_and_is_reported() -> None:
    def recovered(hidden_weight: float):
        teacher, student = pruned_pair()
        config = replace(QUICK, hidden_weight=hidden_weight)
        adapted, report = distill(student, teacher, config, progress=False)
        return parameters_of(merge_adapters(adapted)), report

    plain, plain_report = recovered(0.0)
    matched, report = recovered(1.0)
    assert plain_report.hidden_weight == 0.0 and report.hidden_weight == 1.0
    assert any(not torch.equal(plain[name], matched[name]) for name in plain)
    assert report.held_out_kl_after < 0.9 * report.held_out_kl_before


def test_the_hidden_state_term_is_off_for_a_teacher_of_another_depth() -> None:
    teacher = tiny_model("llama")
    student = tiny_model("llama", seed=5, num_hidden_layers=1)
    config = replace(QUICK, hidden_weight=1.0)
    _, report = distill(student, teacher, config, progress=False)
    assert report.hidden_weight == 0.0
    assert report.held_out_kl_after < report.held_out_kl_before


# ----- adapters ---------------------------------------------------------------------------------


def test_lora_targets_every_attention_and_ffn_projection_of_every_layer() -> None:
    names = lora_target_modules(tiny_model("llama"))
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in projections]


def test_lora_targets_only_the_language_model_of_a_multimodal_model() -> None:
    model = tiny_model("gemma3")
    names = lora_target_modules(model)
    assert names and all(name.startswith("model.language_model.layers.") for name in names)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], torch.nn.Linear) for name in names)


def test_gpt2_conv1d_projections_merge_exactly(tmp_path: Path) -> None:
    teacher = tiny_model("gpt2")
    student = copy.deepcopy(teacher)
    prune_model(student, [torch.arange(64).float()] * 2, [40, 40])
    adapted, report = distill(student, teacher, QUICK, progress=False)
    with_adapters = logits_of(adapted)
    save_recovered(merge_adapters(adapted), None, tmp_path / "out", report.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits_of(reloaded), with_adapters, atol=1e-5, rtol=0)


# ----- refusals ---------------------------------------------------------------------------------


def test_another_vocabulary_size_is_refused() -> None:
    with pytest.raises(PruneNetError, match="vocabulary has 80 tokens and the model's 64"):
        check_same_vocabulary(
            tiny_model("llama").config, tiny_model("llama", vocab_size=80).config, None, None
        )


def test_a_tokenizer_with_other_ids_is_refused() -> None:
    config = tiny_model("llama").config
    swapped = tiny_tokenizer()
    vocab = swapped.get_vocab()
    other = type(swapped)(
        tokenizer_object=_word_level({**vocab, "w10": vocab["w11"], "w11": vocab["w10"]}),
        unk_token="<unk>",
    )
    with pytest.raises(PruneNetError, match="other ids"):
        check_same_vocabulary(config, config, tiny_tokenizer(), other)
    check_same_vocabulary(config, config, tiny_tokenizer(), tiny_tokenizer())  # equal: accepted


def test_another_architecture_with_the_same_vocabulary_is_accepted() -> None:
    check_same_vocabulary(tiny_model("llama").config, tiny_model("qwen2").config, None, None)


def test_impossible_settings_are_refused() -> None:
    with pytest.raises(PruneNetError, match="at least 2 self-generated sequences"):
        RecoveryConfig(text=SelfGenConfig(sequences=1))
    with pytest.raises(PruneNetError, match="steps"):
        RecoveryConfig(steps=0)
    with pytest.raises(PruneNetError, match="learning rate"):
        RecoveryConfig(lr=float("nan"))
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(PruneNetError, match="hidden-state weight"):
            RecoveryConfig(hidden_weight=weight)
    with pytest.raises(PruneNetError, match="held_out_max"):
        RecoveryConfig(held_out_max=0)


def test_the_report_is_written_beside_the_model(tmp_path: Path) -> None:
    teacher, student = pruned_pair()
    adapted, report = distill(student, teacher, RecoveryConfig(steps=2, text=TEXT), False)
    save_recovered(merge_adapters(adapted), None, tmp_path / "out", report.to_dict())
    written = json.loads((tmp_path / "out" / RECOVER_REPORT_FILE).read_text())
    assert written["steps"] == 2 and written["rank"] == 8 and written["seed"] == 0
    assert written["train_tokens"] == 24 * 16 and written["held_out_tokens"] == 8 * 16
    assert len(written["train_losses"]) == 2


def _word_level(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


# ----- full-parameter recovery -----------------------------------------------------------------


def test_full_recovery_trains_every_weight_but_the_embeddings_and_lowers_the_held_out_kl(
    tmp_path: Path,
) -> None:
    teacher, student = pruned_pair()
    embeddings = student.get_input_embeddings().weight.detach().clone()
    before = parameters_of(student)
    config = replace(QUICK, method="full")
    assert config.peak_lr == 1e-4  # the method's own default peak, not LoRA's
    trained, report = distill(student, teacher, config, progress=False)
    assert report.method == "full" and report.best_step > 0
    assert report.held_out_kl_after < report.held_out_kl_before
    after = parameters_of(trained)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert torch.equal(trained.get_input_embeddings().weight, embeddings)
    assert any("mlp" in name for name in changed) and any("self_attn" in name for name in changed)
    assert not any("embed" in name or "lm_head" in name for name in changed)
    # No adapters to merge: the folder reloads with the trained model's logits.
    merged = merge_adapters(trained)
    save_recovered(merged, tiny_tokenizer(), tmp_path / "out", report.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(merged), atol=1e-5, rtol=0)


def test_an_unknown_recovery_method_is_refused() -> None:
    with pytest.raises(PruneNetError, match="Unknown recovery method 'adapters'"):
        RecoveryConfig(method="adapters")


# ----- a time budget ----------------------------------------------------------------------------


class StudentClock:
    """Seconds that pass only while the student runs: `seconds` per forward pass (training
    steps and held-out evaluations alike), so a test knows what every step costs."""

    def __init__(self, student, seconds: float) -> None:
        self.now = 0.0
        student.register_forward_pre_hook(lambda module, args: self.advance(seconds))

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_a_time_budget_fits_the_steps_to_it_and_ends_the_schedule_with_it() -> None:
    # One student forward = 1 s: a step is one (1 s), a held-out evaluation four (8 held-out
    # sequences in batches of 2: 4 s). After the first evaluation and 3 calibration steps
    # (7 s), 49 s are left for steps of 1 s + 4/5 s of evaluations, less the last evaluation:
    # 27 more steps, 30 in all, ending at 58 s.
    teacher, student = pruned_pair()
    clock = StudentClock(student, 1.0)
    config = RecoveryConfig(steps=1000, eval_every=5, text=TEXT, budget_minutes=1.0)
    _, report = distill(student, teacher, config, progress=False, clock=clock)
    assert report.steps == 30 and report.budget_minutes == 1.0
    assert len(report.train_losses) == 30
    assert [step for step, _ in report.held_out] == [0, 5, 10, 15, 20, 25, 30]
    assert clock() == 58.0


def test_a_slower_machine_stops_at_the_budget_with_the_last_state_evaluated() -> None:
    # Calibrated at 1 s per step (20 steps fitted to 30 s), then every forward takes 3 s: the
    # step that crosses 30 s (the 11th, at 31 s) is the last, and it is evaluated (12 s).
    teacher, student = pruned_pair()
    clock = StudentClock(student, 1.0)
    config = RecoveryConfig(steps=1000, eval_every=50, text=TEXT, budget_minutes=0.5)
    forwards = []

    def slower(module, args):
        forwards.append(1)
        if len(forwards) > 4 + 3:  # the first evaluation and the calibration steps ran at 1 s
            clock.advance(2.0)

    student.register_forward_pre_hook(slower)
    _, report = distill(student, teacher, config, progress=False, clock=clock)
    assert report.steps == 11
    assert [step for step, _ in report.held_out] == [0, 11]
    assert clock() == 43.0


def test_without_a_budget_the_step_count_is_exact() -> None:
    teacher, student = pruned_pair()
    clock = StudentClock(student, 100.0)  # slow steps do not matter without a budget
    _, report = distill(student, teacher, replace(QUICK, steps=7), progress=False, clock=clock)
    assert report.steps == 7 and report.budget_minutes is None


def test_a_budget_that_is_not_a_positive_number_of_minutes_is_refused() -> None:
    for budget in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PruneNetError, match="time budget"):
            RecoveryConfig(budget_minutes=budget)
