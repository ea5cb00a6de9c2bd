"""runtime.precision / channels_last / compile: what each does to a step, a resumed fp16 run,
a compiled run against an eager one, and a loop that does not wait on the device per step."""

import json

import pytest
import torch

from volttl.config import ConfigError, config_from_dict
from volttl.data import WindowDataset
from volttl.errors import VolttlError
from volttl.inference import model_from_config
from volttl.numerics import Numerics
from volttl.train import loop
from volttl.train.step import train_run

from .test_train import run_cfg, store  # noqa: F401  (the module's preprocessed store)


@pytest.mark.parametrize("precision, dtype", [("tf32", torch.float32), ("fp32", torch.float32),
                                              ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_sets_the_forward_dtype_and_loss_scaling(precision, dtype):
    cpu = torch.device("cpu")
    numerics = Numerics.of(config_from_dict({"runtime": {"precision": precision}}).runtime)
    conv = torch.nn.Conv3d(1, 2, 3)
    with numerics.autocast(cpu):
        assert conv(torch.randn(1, 1, 4, 4, 4)).dtype == dtype
    assert numerics.grad_scaler(cpu).is_enabled() == (precision == "fp16")


def test_autocast_on_a_cpu_is_warned_of(caplog):
    cpu = torch.device("cpu")
    Numerics("tf32").configure(cpu)
    assert not caplog.records
    Numerics("fp16").configure(cpu)
    assert "runtime.precision fp16 on a cpu: autocast there is slow" in caplog.text


def test_bf16_on_a_cpu_is_warned_of_only_without_bf16_instructions(caplog, monkeypatch):
    from volttl import numerics

    cpu = torch.device("cpu")
    for has_bf16 in (True, False):
        caplog.clear()
        monkeypatch.setattr(numerics, "cpu_has_bf16", lambda device, answer=has_bf16: answer)
        Numerics("bf16").configure(cpu)
        assert ("autocast there is slow" in caplog.text) is not has_bf16
    assert not numerics.cpu_has_bf16(torch.device("meta"))  # not a CPU


def test_memory_format_follows_channels_last():
    x = torch.randn(2, 1, 4, 6, 6)
    assert Numerics(channels_last=True).prepare(x).is_contiguous(memory_format=torch.channels_last_3d)
    assert Numerics(channels_last=False).prepare(x.to(memory_format=torch.channels_last_3d)).is_contiguous()


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="runtime.precision"):
        config_from_dict({"train": {"precision": "fp8"}})


def _weights(run):
    return torch.load(run / "last.pt", weights_only=True)["model_state"]


@pytest.mark.slow
def test_fp16_run_resumes_with_its_loss_scale(store, tmp_path):  # noqa: F811
    """The GradScaler state is in last.pt and restored: a resumed fp16 run ends with the
    weights and the scaler state of an uninterrupted one."""
    cfg = run_cfg(store, tmp_path)
    cfg.runtime.precision = "fp16"
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_run(cfg, straight, progress=False)
    train_run(cfg, broken, progress=False, stop_after_epoch=0)
    saved = torch.load(broken / "last.pt", weights_only=True)["grad_scaler"]
    assert saved["scale"] > 0 and saved["_growth_tracker"] > 0
    train_run(cfg, broken, resume=True, progress=False)
    a, b = _weights(straight), _weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ends = [torch.load(r / "last.pt", weights_only=True)["grad_scaler"] for r in (straight, broken)]
    assert ends[0] == ends[1]  # without the restore the growth tracker would restart at 0
    losses = [json.loads(x)["train_loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < v < 10 for v in losses)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_the_plain_model(store, tmp_path):  # noqa: F811
    """An epoch of compiled training moves the weights as eager training does (up to
    floating-point reordering, which SGD amplifies a little), and the checkpoint holds the
    plain model's keys."""
    cfg = run_cfg(store, tmp_path)
    cfg.train.epochs, cfg.transfer.head.dropout = 1, 0.0  # compiled dropout draws other masks
    train_run(cfg, tmp_path / "eager", progress=False)
    cfg.runtime.compile = True
    train_run(cfg, tmp_path / "compiled", progress=False)
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()  # no "_orig_mod." prefix: evaluate and predict load it
    torch.manual_seed(cfg.train.seed)
    init = model_from_config(cfg).model.state_dict()
    assert any(not torch.equal(init[k], eager[k]) for k in eager if k.endswith("weight"))  # it trained
    ratios = {k: float((eager[k] - compiled[k]).norm() / (eager[k] - init[k]).norm())
              for k in eager if eager[k].is_floating_point() and not torch.equal(eager[k], init[k])}
    # measured: at most 0.65% of the epoch's update on this cohort (7e-5 before PENet's slice
    # jitter changed the training windows: the update is smaller, the reordering noise is
    # not); one wrong step of the epoch's five would be about 20%
    assert max(ratios.values()) < 2e-2, ratios
    steps = [json.loads((tmp_path / run / "metrics.jsonl").read_text())["optimizer_steps"]
             for run in ("eager", "compiled")]
    assert steps[0] == steps[1] > 0


def test_the_training_step_does_not_read_back_from_the_device(store, tmp_path, monkeypatch):  # noqa: F811
    """Every .item() made by the training loop itself is counted: one per epoch (the mean
    loss), not one per step, so a GPU never idles while the host waits for it."""
    calls = []
    item = torch.Tensor.item

    def counted(self):
        import inspect

        if inspect.currentframe().f_back.f_code.co_filename == loop.__file__:
            calls.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    cfg = run_cfg(store, tmp_path)
    cfg.train.epochs = 2
    train_run(cfg, tmp_path / "run", progress=False)
    batches = len(WindowDataset.from_config(cfg, "train", train=True)) // cfg.train.batch_size
    assert batches >= 3  # several steps per epoch, so a per-step read-back would show
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(calls) == 2


def test_out_of_memory_names_the_batch_and_the_way_out(store, tmp_path, monkeypatch):  # noqa: F811
    def no_memory(logits, y):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "make_loss", lambda *a: no_memory)
    cfg = run_cfg(store, tmp_path)
    with pytest.raises(VolttlError, match=r"out of cpu memory at train.batch_size 4 in tf32: start a new "
                                          r"run with a smaller train.batch_size .* --resume it with "
                                          r"runtime.precision=bf16"):
        train_run(cfg, tmp_path / "run", progress=False)
