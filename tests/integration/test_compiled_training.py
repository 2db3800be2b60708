"""``compile: on``: the same training as eager (within compiled-kernel rounding), same checkpoints."""

from __future__ import annotations

import pytest

from tests.integration.test_trainer_process import kinds, make_spec, run, with_spec_keys

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _run(tmp_path, model, compile_mode: str) -> list[dict]:
    tmp_path.mkdir()
    path = with_spec_keys(make_spec(tmp_path, model, n_epochs=1, max_steps_per_epoch=4), compile=compile_mode)
    events, code = run(path, tmp_path)
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
