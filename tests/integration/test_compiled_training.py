"""``compile: on``: the same training as eager (within compiled-kernel rounding), same checkpoints,
for SFT and for DPO (whose reference pass runs the compiled layers with the adapter switched off)."""

from __future__ import annotations

import pytest

from tests.integration import test_dpo_trainer as dpo
from tests.integration.test_trainer_process import finish, kinds, make_spec, start, with_spec_keys

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _run(tmp_path, model, compile_mode: str, spec_for=make_spec) -> list[dict]:
    tmp_path.mkdir()
    path = with_spec_keys(spec_for(tmp_path, model, n_epochs=1, max_steps_per_epoch=4), compile=compile_mode)
    # A cold compile cache on a loaded 2-core machine takes minutes, not the 90 s of an eager run.
    events, code = finish(start(path, tmp_path), timeout=300)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    return events


def test_compiled_run_trains_like_the_eager_one(tiny_model_path, tmp_path):
    eager = _run(tmp_path / "eager", tiny_model_path, "off")
    compiled = _run(tmp_path / "compiled", tiny_model_path, "on")
    assert kinds(compiled) == kinds(eager)
    # Regional compilation: each decoder layer, not the body as a whole.
    assert any(e["event"] == "log" and "torch.compile" in e["message"] and "LlamaDecoderLayer layers" in e["message"]
               for e in compiled)
    assert not any(e["event"] == "log" and "torch.compile" in e["message"] for e in eager)
    losses = [[m["loss"] for m in events if m["event"] == "metric"] for events in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    from safetensors.torch import load_file

    names = [set(load_file(tmp_path / run / "out" / "epoch_1" / "adapter_model.safetensors")) for run in ("eager", "compiled")]
    assert names[0] == names[1], "compiling must not rename what a checkpoint holds"


def test_compiled_dpo_trains_like_the_eager_one(tiny_model_path, tmp_path):
    runs = {mode: _run(tmp_path / mode, tiny_model_path, mode, spec_for=dpo.make_spec) for mode in ("off", "on")}
    assert kinds(runs["on"]) == kinds(runs["off"])
    assert any(e["event"] == "log" and "LlamaDecoderLayer layers" in e["message"] for e in runs["on"])
    losses = {mode: [e["loss"] for e in events if e["event"] == "metric"] for mode, events in runs.items()}
    assert len(losses["on"]) == 4 and losses["on"] == pytest.approx(losses["off"], rel=2e-2)
