import copy

import pytest
import torch
from torch import nn

from prunenet.core import upcast
from prunenet.core.upcast import float32_compute, upcast_linear
from tests.conftest import ALL_MODEL_TYPES, logits_of, tiny_model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_upcast_linear_equals_a_float32_product_for_blocks_that_do_not_divide_the_rows(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, bias: bool
) -> None:
    monkeypatch.setattr(upcast, "BLOCK_ROWS", 3)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 7, generator=generator).to(dtype)
    b = torch.randn(10, generator=generator).to(dtype) if bias else None
    x = torch.randn(2, 5, 7, generator=generator)
    out = upcast_linear(x, weight, b, torch.empty(3 * 7))
    expected = nn.functional.linear(x, weight.float(), None if b is None else b.float())
    assert out.dtype == torch.float32 and out.shape == (2, 5, 10)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_a_half_model_computes_what_its_float32_copy_computes_and_is_put_back(
    model_type: str,
) -> None:
    half = tiny_model(model_type).half()
    reference = logits_of(copy.deepcopy(half).float())
    in_half = logits_of(half).float()
    before = {name: p.data.clone() for name, p in half.named_parameters()}
    with float32_compute(half) as model:
        logits = logits_of(model)
    # Closer to float32 than float16 arithmetic gets: the products really ran in float32.
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert (in_half - reference).abs().max() > 10 * (logits - reference).abs().max()
    for name, p in half.named_parameters():
        assert p.dtype == torch.float16 and torch.equal(p.data, before[name]), name
    assert not any("forward" in vars(m) for m in half.modules())


def test_a_float32_model_is_left_as_it_is() -> None:
    model = tiny_model("llama")
    with float32_compute(model):
        assert not any("forward" in vars(m) for m in model.modules())


def test_a_linear_with_its_own_forward_is_refused_rather_than_overwritten() -> None:
    model = tiny_model("llama").half()
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    linear.forward = lambda x: x
    with pytest.raises(ValueError, match="instance-level forward"), float32_compute(model):
        pass
