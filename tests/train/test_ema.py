"""The EMA of the adapter (issue 17 item 3): ``train.ema_decay``. Its values are torch's own EMA
(``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``) over the same weights; it is saved beside the
plain adapter and in every checkpoint, survives resume bit for bit, and previews made with it leave the training
weights as they were."""

from __future__ import annotations

import pytest
import torch
from kern.core.io import load_file
from kern.errors import UsageError
from kern.train import checkpoints, runs
from kern.train.ema import EMA, METADATA_KEY
from kern.train.state import load_state
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tests.train import test_continue
from tests.train.test_continue import assert_same_tensors, cont, metrics, train

dataset = test_continue.dataset  # the fixture, shared

DECAY = 0.75  # a short memory, so a few toy steps move the average visibly


def torch_ema(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """torch's EMA over a sequence of weight sets (the first one is where it starts)."""
    names = sorted(weights[0])
    holder = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(weights[0][n].clone()) for n in names})
    averaged = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    for w in weights:
        with torch.no_grad():
            for n in names:
                holder[n.replace(".", "_")].copy_(w[n])
        averaged.update_parameters(holder)
    return {n: averaged.module[n.replace(".", "_")].detach() for n in names}


def test_the_average_is_torchs_ema_and_the_swap_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    net[1].bias.requires_grad_(False)  # not trainable: not averaged
    ema = EMA(net, 0.9)
    seen = [{n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    for _ in range(6):
        net(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        seen.append({n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad})
    expected = torch_ema(seen, 0.9)
    assert ema.state_dict().keys() == expected.keys() and "1.bias" not in expected
    for n, t in expected.items():
        torch.testing.assert_close(ema.state_dict()[n], t, rtol=0, atol=0, msg=n)

    trained = {n: p.detach().clone() for n, p in net.state_dict().items()}
    with ema.swapped():
        for n, p in net.named_parameters():
            assert torch.equal(p, expected[n] if n in expected else trained[n]), n
    for n, p in net.state_dict().items():
        assert torch.equal(p, trained[n]), n

    other = EMA(nn.Linear(5, 4), 0.9)
    with pytest.raises(UsageError, match="EMA in .* does not fit this network"):
        other.load_state_dict(ema.state_dict())


def test_ema_adapter_is_torchs_ema_of_the_steps_weights(tmp_path, dataset, kern_main):
    out = tmp_path / "run"
    every = ("--set", f"train.ema_decay={DECAY}", "--set", "save.every_n_steps=1", "--set", "save.keep_last=0")
    train(kern_main, dataset, out, 5, *every)
    steps = checkpoints.checkpoint_dirs(out)
    assert [p.name for p in steps] == [f"step-{s:06d}" for s in range(1, 6)]
    for step in steps:
        assert {"adapter.safetensors", "adapter_ema.safetensors"} <= {p.name for p in step.iterdir()}
    # The saved plain adapters are the weights after each step (float32); the first EMA is where it started from.
    plain = [load_file(p / "adapter.safetensors")[0] for p in steps]
    ema = [load_file(p / "adapter_ema.safetensors")[0] for p in steps]
    for k, t in ema[0].items():
        if "lora_up" in k:  # a LoRA's up projection starts at zero: its first average is (1 - decay) * w1
            torch.testing.assert_close(t, (1 - DECAY) * plain[0][k], rtol=1e-7, atol=0)
    weights = [{k: v for k, v in ema[0].items() if not k.endswith("alpha")}] + plain[1:]
    expected = torch_ema(weights, DECAY)
    final, meta = load_file(out / "adapter_ema.safetensors")
    for k, t in expected.items():
        torch.testing.assert_close(final[k], t, rtol=1e-6, atol=1e-9, msg=k)
    assert any(not torch.equal(final[k], plain[-1][k]) for k in expected)  # an average, not the last weights
    assert_same_tensors(out / "adapter_ema.safetensors", steps[-1] / "adapter_ema.safetensors")
    _, plain_meta = load_file(out / "adapter.safetensors")
    assert meta[METADATA_KEY] == str(DECAY) and METADATA_KEY not in plain_meta
    assert {k: v for k, v in meta.items() if not k.startswith(("sshs_", "ss_training_finished"))} == {
        k: v for k, v in plain_meta.items() if not k.startswith(("sshs_", "ss_training_finished"))
    } | {METADATA_KEY: str(DECAY)}
    state = load_state(steps[-1])  # the EMA tensors are in the checkpoint's state, under the parameters' names
    assert set(state["ema"]) == {n for n in state["network"] if "alpha" not in n}


def test_ema_survives_resume_and_continuing_exactly(tmp_path, dataset, kern_main):
    full, part = tmp_path / "full", tmp_path / "part"
    on = ("--set", f"train.ema_decay={DECAY}", "--set", "train.gradient_accumulation=2")
    train(kern_main, dataset, full, 5, *on)
    train(kern_main, dataset, part, 2, *on)
    code, err = cont(kern_main, part, 5)
    assert code == 0, err
    assert_same_tensors(full / "adapter_ema.safetensors", part / "adapter_ema.safetensors")
    assert_same_tensors(full / "adapter.safetensors", part / "adapter.safetensors")
    assert metrics(part) == metrics(full)


def test_previews_use_the_ema_and_leave_the_training_weights_alone(tmp_path, dataset, kern_main, monkeypatch):
    from kern.train import ema as ema_module
    from kern.train.previews import Previews

    made, seen = [], []
    real_maybe, real_run = EMA.maybe, Previews.run

    def maybe(network, decay):
        made.append(real_maybe(network, decay))
        return made[-1]

    def run(self, transformer, vae, folder, step, save=True):
        (ema,) = made
        seen.append(step)
        for name, p in ema.params.items():  # during the preview the network holds the EMA weights
            assert torch.equal(p, ema.shadow[name]), name
        return real_run(self, transformer, vae, folder, step, save)

    on = ("--set", f"train.ema_decay={DECAY}")
    train(kern_main, dataset, tmp_path / "plain", 4, *on)
    monkeypatch.setattr(ema_module.EMA, "maybe", staticmethod(maybe))
    monkeypatch.setattr(Previews, "run", run)
    previews = (
        "--set",
        'sample.prompts=["a red square"]',
        "--set",
        "sample.steps=2",
        "--set",
        "sample.every_n_steps=2",
    )
    train(kern_main, dataset, tmp_path / "previews", 4, *on, *previews)
    assert seen == [2, 4]
    assert sorted(p.name for p in (tmp_path / "previews" / "samples").iterdir()) == [
        "step-000002_00.png",
        "step-000004_00.png",
    ]
    for name in ("adapter.safetensors", "adapter_ema.safetensors"):
        assert_same_tensors(tmp_path / "plain" / name, tmp_path / "previews" / name)


def test_overwrite_clears_the_ema_adapter_and_a_fresh_run_refuses_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_ema.safetensors").write_bytes(b"x")
    assert runs.earlier_outputs(out, "adapter") == ["adapter_ema.safetensors"]
    runs.clear_outputs(out, "adapter")
    assert not (out / "adapter_ema.safetensors").exists()
