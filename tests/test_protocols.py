"""Named protocols: each resolves to the values of the source it cites; flags still override."""

from __future__ import annotations

import pytest

from spikegpt_ft.cli.train import build_parser, main, parse_args, spec_from_args
from spikegpt_ft.training import load_protocol, protocol_names


def spec(*argv: str):
    return spec_from_args(parse_args(list(argv)))


def test_the_shipped_protocols():
    assert protocol_names() == ["default", "spikegpt-nlu", "spikelora-paper", "spikelora-spikegpt"]
    for name in protocol_names():
        text = load_protocol(name).path.read_text()
        assert text.startswith("#")  # every file opens with the source it follows


def test_spikelora_spikegpt_is_the_authors_subj_experiment():
    """iwandejong/spikeloralib examples/SpikeGPT-NLU/finetune_subj.py and scripts/spikegpt_subj_benchmark.sh."""
    s = spec("--task", "subj", "--adapter", "spikelora", "--protocol", "spikelora-spikegpt")
    assert s.run.seed_list() == [0, 1, 2, 3, 4]
    a = s.adapter
    assert (a.rank, a.alpha, a.rslora, a.scaling, a.v_threshold, a.tau, a.lora_dropout, a.gate) == (
        16, 16.0, False, 1.0, 0.25, 2.0, 0.0, "pointwise",
    )  # fmt: skip
    assert a.targets == ("att.key", "att.value", "att.receptance", "ffn.key", "ffn.value", "ffn.receptance", "head")
    o = s.optimization  # torch.optim.AdamW(model.parameters(), lr=1e-4): its defaults on every parameter
    assert (o.lr, o.weight_decay, o.decay_vectors, o.betas, o.eps) == (1e-4, 0.01, True, (0.9, 0.999), 1e-8)
    assert (o.warmup_ratio, o.schedule) == (0.0, "constant")
    assert (s.trainer.epochs, s.trainer.grad_clip, s.trainer.precision) == (20, 1.0, "32-true")
    assert s.data["batch_size"] == 32 and s.data["max_length"] == 1024
    assert (s.data["val_fraction"], s.data["test_fraction"], s.data["test_every_epoch"]) == (0.0, 0.1, True)
    assert (s.run.select, s.run.head_bias, s.run.head_init_std) == ("last", False, 0.02)
    lora = spec("--task", "subj", "--adapter", "lora", "--protocol", "spikelora-spikegpt").adapter
    assert (lora.kind, lora.rank, lora.alpha, lora.rslora) == ("lora", 16, 16.0, False)


@pytest.mark.parametrize(
    "task, size, weight_decay, eps",
    [("subj", "nlu-12x512", 0.0, 1e-6), ("mr", "nlu-24x768", 0.0, 1e-6), ("sst2", "nlu-24x768", 0.0, 1e-6),
     ("sst5", "nlu-12x512", 0.01, 1e-8)],
)  # fmt: skip
def test_spikegpt_nlu_is_the_official_scratch_training(task, size, weight_decay, eps):
    """ridgerchu/SpikeGPT NLU/{subj,mr,sst-2,sst-5}.py: transformers' AdamW in three, torch's in sst-5."""
    s = spec("--task", task, "--adapter", "none", "--protocol", "spikegpt-nlu")
    assert (s.run.base, s.run.model, s.adapter) == ("scratch", size, None)
    o = s.optimization
    assert (o.lr, o.weight_decay, o.eps, o.warmup_ratio, o.schedule) == (1e-4, weight_decay, eps, 0.0, "constant")
    assert (s.trainer.epochs, s.trainer.grad_clip) == (20, 0.0)
    assert s.data["batch_size"] == 32 and s.data["max_length"] is None and s.run.select == "last"
    with pytest.raises(ValueError, match="covers the adapters"):
        spec("--task", task, "--adapter", "lora", "--protocol", "spikegpt-nlu")


def test_spikelora_paper_and_default():
    paper = spec("--task", "mr", "--adapter", "spikelora", "--protocol", "spikelora-paper")
    a, o = paper.adapter, paper.optimization
    assert (a.rank, a.rslora, a.alpha, a.v_threshold, a.lora_dropout, a.gate) == (
        8,
        True,
        8**0.5,
        0.1,
        0.0,
        "pointwise",
    )
    assert (o.warmup_ratio, o.weight_decay, paper.trainer.grad_clip) == (0.06, 0.01, 1.0)
    default = spec("--task", "subj", "--adapter", "spikelora")
    assert default.run.protocol == "default" and default.adapter.gate == "temporal"
    assert default.run.select == "best" and default.data["val_fraction"] == 0.1
    assert spec("--task", "subj", "--adapter", "none").optimization.lr == 1e-4
    assert spec("--task", "subj", "--adapter", "lora").optimization.lr == 5e-4


def test_flags_and_config_files_override_the_protocol(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nrank: 4\n")
    s = spec("--task", "subj", "--protocol", "spikelora-spikegpt", "--config", str(config), "--epochs", "2")
    assert (s.trainer.epochs, s.adapter.rank, s.adapter.v_threshold) == (2, 4, 0.25)
    assert spec("--task", "subj", "--protocol", "spikelora-spikegpt", "--gate", "temporal").adapter.gate == "temporal"
    assert spec("--task", "subj", "--batch-size", "8").data["batch_size"] == 8  # - and _ both accepted


def test_print_config_shows_the_resolved_values(capsys):
    assert main(["--task", "subj", "--protocol", "spikelora-spikegpt", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "v_threshold: 0.25" in out and "gate: pointwise" in out and "epochs: 20" in out


def test_help_is_clean(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "<function" not in out and "--protocol" in out and "--gate" in out


def test_a_protocol_outside_its_tasks_or_unknown_is_refused(capsys):
    assert main(["--task", "mr", "--protocol", "spikelora-spikegpt"]) == 2
    assert "covers the tasks ['subj']" in capsys.readouterr().err
    assert main(["--task", "subj", "--protocol", "nope"]) == 2
    assert "unknown protocol 'nope'" in capsys.readouterr().err


def test_a_boolean_flag_alone_means_true():
    s = spec("--task", "subj", "--resume", "--rslora", "false")
    assert s.run.resume is True and s.adapter.rslora is False
