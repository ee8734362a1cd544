"""Operations and energy per token of SpikeGPT, with LoRA or SpikeLoRA adapters, from measured spike rates.

``spikegpt-ft energy`` (or ``python -m spikegpt_ft.tools.energy``) ``[--checkpoint PTH | --layers L --embd C
--vocab V] [--rates RATES.json] [--json OUT] [--markdown OUT]``

Without ``--rates`` the spike rates are measured here: the model (random weights unless a checkpoint is
given) reads real text, the sentences of a task (``--task``, default Subj, read by
:func:`spikegpt_ft.data.read_task`) tokenised with the 20B tokenizer, and forward hooks on
``model.spiking_neurons()`` (and on the binary embedding) count the spikes.

**What counts as spike-driven.** A linear layer can replace its multiply-accumulates (MACs) by
accumulates (ACs) only when its input is binary: then ``W x`` is the sum of the weight columns the
spikes select, ``rate x fan_in x fan_out`` additions per token. In SpikeGPT as computed
(``docs/spikegpt-model.md``) the spikes never reach a weight matrix directly:

- the binary embedding ``H(E[ids])`` goes through ``LN0`` before anything reads it;
- every mixer reads ``LN1(x)`` / ``LN2(x)`` of the residual stream (a real-valued vector), then the token
  shift blends it with the previous token's (``mu * y + (1 - mu) * y_prev``), again real-valued;
- ``att.output`` reads ``sigmoid(r) * wkv``, ``ffn.value`` reads ``relu(k)^2`` (sparse, not binary), the head
  reads ``LN_out(x)``.

So the **as implemented** account has no spike-driven matrix product at all: every linear layer is dense
MACs. The only spike-driven arithmetic is adding each LIF layer's spikes into the residual stream,
``rate x C`` ACs per LIF layer. The **spike-driven assumption** account is the paper-style estimate: it
pretends that each mixer's ``key/value/receptance`` read the spikes last added to the residual stream
(block 0's time mix: the binary embedding; block i's time mix: block i-1's ``lif2``; block i's channel
mix: block i's ``lif1``) and counts them as ``rate x fan_in x fan_out`` ACs, while ``att.output``,
``ffn.value`` and the head stay dense MACs (their inputs are real-valued in any reading).

Adapters (``h = W0 x + s B g(A x)``): ``A`` reads the base layer's input (dense MACs, or ACs at the
same rate under the spike-driven assumption when the base layer counts as spike-driven). LoRA's ``B``
reads ``A x``: dense MACs, ``r x fan_out``. SpikeLoRA's ``B`` reads ``S(A x) * A x``: sparse but not
binary, so **sparse MACs**, ``gate rate x r x fan_out``.

**Merged LoRA.** LoRA's update is linear in ``x``, so at inference ``W0 + s B A`` can be folded into one
matrix of ``W0``'s shape (:func:`spikegpt_ft.adapters.merge_adapters`): the row ``lora (merged)`` costs
exactly what the base (``none``) costs, in either account. SpikeLoRA's gate ``S(A x)`` depends on the
input, so its adapters cannot be merged and always cost ``A`` and ``B`` on top of the base: at inference
SpikeLoRA is dearer than merged LoRA however sparse its gate is (``A`` alone is ``r x fan_in`` per layer).

**Training step per token.** The cost of one forward and backward pass, counted in MACs of the matrix
products, per token (the usual convention for a dense layer of ``F = fan_in x fan_out`` forward MACs):

- forward ``1 x F``; backward ``2 x F``: the gradient with respect to the layer's input
  (``dL/dx = W^T dL/dy``, ``F`` MACs) and with respect to its weight (``dL/dW = dL/dy x^T``, ``F`` MACs);
- a **trained** layer costs ``3 x F``; a **frozen** layer (the base under adapters) needs only the gradient
  with respect to its input, so that the gradient can reach the adapters and layers before it: ``2 x F``.
  The input gradient is charged to every frozen layer, even the few in front of every trained parameter
  that would not need it, so the figure is an upper bound by at most those layers' ``F``;
- adapters' ``A`` and ``B`` and, for classifiers, the head are trained (``3 x F``); full fine-tuning
  (``none``) trains everything (``3 x`` the forward MACs);
- every product is counted dense (``F`` as a dense network does it, the ``dense_macs`` of the inference
  account), as a GPU trains: the gradients are real-valued and dense, and SpikeLoRA's ``B`` gets the same
  ``3 x r x fan_out`` as LoRA's. Element-wise work (LayerNorm, WKV, LIF surrogate gradients, the optimizer
  update) is not counted, as at inference. Energy is the same 4.6 pJ per MAC.

Energy uses the usual 45 nm figures (Horowitz, ISSCC 2014, as used in the SNN literature): 4.6 pJ per
32-bit float MAC, 0.9 pJ per AC. Element-wise work (LayerNorm, WKV recurrence, sigmoid, LIF membrane
updates, token-shift mixing; a few dozen operations per channel and layer, well under 1% of the matrix
products at C = 768) and the embedding lookup are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import attach_adapters, load_adapters
from ..data import find_data_dir, load_tokenizer, read_task
from ..model import SpikeGPT, SpikeGPTConfig, init_random_spiking, load_model, read_state_dict

#: 45 nm energy per operation, joules.
E_MAC = 4.6e-12
E_AC = 0.9e-12

ACCOUNTS = ("as_implemented", "spike_driven_assumption")
#: Adapters of the inference accounts: ``lora_merged`` is LoRA folded into the base weights.
ADAPTER_KINDS = ("none", "lora", "lora_merged", "spikelora")
#: Adapters of the training-step account (merging is an inference-time step: training is ``lora``'s).
TRAINING_KINDS = ("none", "lora", "spikelora")
#: How the tables name the adapter kinds.
KIND_LABELS = {"none": "none", "lora": "lora (unmerged)", "lora_merged": "lora (merged)", "spikelora": "spikelora"}
#: The linear layers of a block: (role, fan_in, fan_out) as functions of C and the FFN width.
BLOCK_LINEARS = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value")
ADAPTER_TARGETS = BLOCK_LINEARS
#: What each linear layer reads (why it is dense in the as-implemented account).
INPUT_OF = {
    "att.key": "reads the token-shift mix of LN1(x): real-valued",
    "att.value": "reads the token-shift mix of LN1(x): real-valued",
    "att.receptance": "reads the token-shift mix of LN1(x): real-valued",
    "att.output": "reads sigmoid(r) * wkv: real-valued",
    "ffn.key": "reads the token-shift mix of LN2(x): real-valued",
    "ffn.receptance": "reads the token-shift mix of LN2(x): real-valued",
    "ffn.value": "reads relu(k)^2: sparse but real-valued",
    "head": "reads LN_out(x): real-valued",
}
EMBEDDING_RATE = "embedding"  # key of the binary embedding's rate (fraction of ones of H(E[ids]))


def energy_joules(macs: float, acs: float) -> float:
    """``4.6 pJ x MACs + 0.9 pJ x ACs``."""
    return E_MAC * macs + E_AC * acs


def layer_shapes(config: SpikeGPTConfig) -> dict[str, tuple[int, int]]:
    """``{name: (fan_in, fan_out)}`` of every linear layer of the model, head included, in forward order."""
    C, H = config.n_embd, config.ffn_hidden
    shape = {
        "att.key": (C, C),
        "att.value": (C, C),
        "att.receptance": (C, C),
        "att.output": (C, C),
        "ffn.key": (C, H),
        "ffn.receptance": (C, C),
        "ffn.value": (H, C),
    }
    out = {f"blocks.{i}.{role}": shape[role] for i in range(config.n_layer) for role in BLOCK_LINEARS}
    out["head"] = (C, config.head_out)
    return out


def spike_source(name: str) -> str | None:
    """Under the spike-driven assumption, the spike tensor a linear layer is taken to read (``None``: dense)."""
    if not name.startswith("blocks."):
        return None
    i, role = int(name.split(".")[1]), name.split(".", 2)[2]
    if role in ("att.key", "att.value", "att.receptance"):
        return EMBEDDING_RATE if i == 0 else f"blocks.{i - 1}.lif2"
    if role in ("ffn.key", "ffn.receptance"):
        return f"blocks.{i}.lif1"
    return None


@dataclass
class Ops:
    """The work of one operation per token."""

    name: str
    part: str  # "base", "residual_spikes", "adapter_A", "adapter_B"
    fan_in: int
    fan_out: int
    input: str  # "dense", "binary", "sparse"
    rate: float  # fraction of nonzero (spiking) inputs used for the count; 1 for dense
    dense_macs: float  # what a dense network does here (matrix products only)
    macs: float
    acs: float
    why: str

    @property
    def energy(self) -> float:
        return energy_joules(self.macs, self.acs)


def _rate(rates: Mapping[str, float], key: str) -> float:
    if key not in rates:
        raise KeyError(f"no spike rate for {key!r}; rates given for {sorted(rates)[:8]}...")
    r = float(rates[key])
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"spike rate of {key!r} must be in [0, 1], got {r}")
    return r


def operation_account(
    config: SpikeGPTConfig,
    rates: Mapping[str, float],
    account: str = "as_implemented",
    adapter: str = "none",
    r: int = 8,
    targets: tuple[str, ...] = ADAPTER_TARGETS,
) -> list[Ops]:
    """Per-token operations of every linear layer, residual spike addition and adapter projection.

    ``rates``: fraction of ones of each LIF layer's output by module name (``blocks.{i}.lif1/lif2``), of
    the binary embedding (``"embedding"``, needed by the spike-driven assumption) and, for SpikeLoRA, of
    each gate (``blocks.{i}.att.key.gate`` ...). ``adapter="lora_merged"`` is LoRA folded into the base
    weights: the operations of ``"none"``, exactly (the merged matrix has the base's shape and input).
    """
    if account not in ACCOUNTS:
        raise ValueError(f"account must be one of {ACCOUNTS}, got {account!r}")
    if adapter not in ADAPTER_KINDS:
        raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {adapter!r}")
    ops: list[Ops] = []
    for name, (k, d) in layer_shapes(config).items():
        source = spike_source(name) if account == "spike_driven_assumption" else None
        if source is None:
            why = INPUT_OF[name.split(".", 2)[2] if name.startswith("blocks.") else name]
            ops.append(Ops(name, "base", k, d, "dense", 1.0, k * d, k * d, 0.0, why))
        else:
            rate = _rate(rates, source)
            ops.append(
                Ops(
                    name,
                    "base",
                    k,
                    d,
                    "binary",
                    rate,
                    k * d,
                    0.0,
                    rate * k * d,
                    f"assumed to read the spikes of {source} (LN and token shift ignored)",
                )
            )
        role = name.split(".", 2)[2] if name.startswith("blocks.") else None
        if adapter == "lora_merged" and role in targets:
            ops[-1].why += "; LoRA merged into W0 (same shape, same cost)"
        if adapter in ("lora", "spikelora") and role in targets:
            base = ops[-1]
            if base.input == "binary":
                ops.append(
                    Ops(
                        name,
                        "adapter_A",
                        k,
                        r,
                        "binary",
                        base.rate,
                        k * r,
                        0.0,
                        base.rate * k * r,
                        "reads the same (assumed binary) input as the base layer",
                    )
                )
            else:
                ops.append(
                    Ops(
                        name,
                        "adapter_A",
                        k,
                        r,
                        "dense",
                        1.0,
                        k * r,
                        k * r,
                        0.0,
                        "reads the same real-valued input as the base layer",
                    )
                )
            if adapter == "lora":
                ops.append(
                    Ops(
                        name,
                        "adapter_B",
                        r,
                        d,
                        "dense",
                        1.0,
                        r * d,
                        r * d,
                        0.0,
                        "LoRA: B reads A x, dense (mergeable into W0 at inference)",
                    )
                )
            else:
                g = _rate(rates, f"{name}.gate")
                ops.append(
                    Ops(
                        name,
                        "adapter_B",
                        r,
                        d,
                        "sparse",
                        g,
                        r * d,
                        g * r * d,
                        0.0,
                        "SpikeLoRA: B reads S(Ax)*Ax, sparse but not binary: sparse MACs",
                    )
                )
    C = config.n_embd
    for i in range(config.n_layer):
        for lif in ("lif1", "lif2"):
            key = f"blocks.{i}.{lif}"
            rate = _rate(rates, key)
            ops.append(
                Ops(
                    key,
                    "residual_spikes",
                    C,
                    1,
                    "binary",
                    rate,
                    0.0,
                    0.0,
                    rate * C,
                    "binary spikes added to the residual stream: additions only",
                )
            )
    return ops


def totals(ops: list[Ops]) -> dict[str, float]:
    """Sums per token: dense-network MACs, MACs, ACs, energy and the dense-network energy."""
    dense = sum(o.dense_macs for o in ops)
    macs, acs = sum(o.macs for o in ops), sum(o.acs for o in ops)
    e = energy_joules(macs, acs)
    e_dense = energy_joules(dense, 0.0)
    return {
        "dense_macs": dense,
        "macs": macs,
        "acs": acs,
        "energy_j": e,
        "dense_energy_j": e_dense,
        "energy_ratio_dense_over_account": e_dense / e if e else math.inf,
    }


def by_role(ops: list[Ops]) -> list[dict]:
    """Operations summed over blocks, per layer role and part (``att.key``/base, ``ffn.value``/adapter_B...)."""
    groups: dict[tuple[str, str], dict] = {}
    for o in ops:
        role = o.name.split(".", 2)[2] if o.name.startswith("blocks.") else o.name
        g = groups.setdefault(
            (role, o.part),
            {
                "role": role,
                "part": o.part,
                "input": o.input,
                "why": o.why,
                "dense_macs": 0.0,
                "macs": 0.0,
                "acs": 0.0,
                "rates": [],
            },
        )
        g["dense_macs"] += o.dense_macs
        g["macs"] += o.macs
        g["acs"] += o.acs
        g["rates"].append(o.rate)
    out = []
    for g in groups.values():
        rs = g.pop("rates")
        g["mean_rate"] = sum(rs) / len(rs)
        g["energy_j"] = energy_joules(g["macs"], g["acs"])
        out.append(g)
    return out


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainOps:
    """The matrix-product work of one layer (or adapter projection) in a training step, per token."""

    name: str
    part: str  # "base", "adapter_A", "adapter_B"
    fan_in: int
    fan_out: int
    trained: bool
    forward_macs: float
    input_grad_macs: float
    weight_grad_macs: float

    @property
    def macs(self) -> float:
        return self.forward_macs + self.input_grad_macs + self.weight_grad_macs


def training_account(
    config: SpikeGPTConfig,
    adapter: str = "none",
    r: int = 8,
    targets: tuple[str, ...] = ADAPTER_TARGETS,
    head_trained: bool = True,
) -> list[TrainOps]:
    """Per-token MACs of one training step (forward + backward) of every linear layer and adapter projection.

    The convention of the module docstring: forward ``F``, gradient w.r.t. the input ``F``, gradient w.r.t.
    the weight ``F`` when the layer is trained (so ``3 F`` trained, ``2 F`` frozen), all dense. Full
    fine-tuning (``"none"``) trains every layer; under ``"lora"`` / ``"spikelora"`` the base layers are
    frozen, their adapters trained, and the head trained when ``head_trained`` (a classifier's fresh head;
    ``False`` for a language model whose vocabulary head stays frozen).
    """
    if adapter not in TRAINING_KINDS:
        raise ValueError(f"adapter must be one of {TRAINING_KINDS} for a training step, got {adapter!r}")
    ops: list[TrainOps] = []

    def add(name: str, part: str, k: int, d: int, trained: bool) -> None:
        f = float(k * d)
        ops.append(TrainOps(name, part, k, d, trained, f, f, f if trained else 0.0))

    for name, (k, d) in layer_shapes(config).items():
        if adapter == "none":
            add(name, "base", k, d, True)
            continue
        add(name, "base", k, d, head_trained if name == "head" else False)
        role = name.split(".", 2)[2] if name.startswith("blocks.") else None
        if role in targets:
            add(name, "adapter_A", k, r, True)
            add(name, "adapter_B", r, d, True)
    return ops


def training_totals(ops: list[TrainOps]) -> dict[str, float]:
    """Sums per token of a training step: forward, backward and total MACs, energy, and backward / forward."""
    forward = sum(o.forward_macs for o in ops)
    backward = sum(o.input_grad_macs + o.weight_grad_macs for o in ops)
    return {
        "forward_macs": forward,
        "input_grad_macs": sum(o.input_grad_macs for o in ops),
        "weight_grad_macs": sum(o.weight_grad_macs for o in ops),
        "backward_macs": backward,
        "macs": forward + backward,
        "energy_j": energy_joules(forward + backward, 0.0),
        "step_over_forward": (forward + backward) / forward if forward else math.nan,
        "trained_macs_forward": sum(o.forward_macs for o in ops if o.trained),
    }


# --------------------------------------------------------------------------------------------- measuring


def task_texts(task: str = "subj", data_dir: str | Path | None = None) -> list[str]:
    """The sentences of ``task`` (every split), classes interleaved so that a short read sees each of them.

    ``data_dir`` ``None`` looks where training does (:func:`spikegpt_ft.data.find_data_dir`).
    """
    splits, _ = read_task(task, data_dir)
    by_label: dict[int, list[str]] = {}
    for texts, labels in splits.values():
        for text, label in zip(texts, labels, strict=True):
            by_label.setdefault(label, []).append(text)
    queues = [by_label[k] for k in sorted(by_label)]
    mixed = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return [t for t in mixed if t.strip()]


def token_chunks(
    texts: list[str], tokenizer_path: str | Path | None, chunks: int, tokens: int, vocab: int
) -> torch.Tensor:
    """``[chunks, tokens]`` ids: ``texts`` joined by newlines, tokenised, cut into chunks (ids modulo ``vocab``).

    ``tokenizer_path`` ``None`` looks where training does (:func:`spikegpt_ft.data.load_tokenizer`).
    """
    tok = load_tokenizer(tokenizer_path)
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t + "\n").ids
        if len(ids) >= chunks * tokens:
            break
    if len(ids) < chunks * tokens:
        raise ValueError(f"the texts hold only {len(ids)} tokens; asked for {chunks} x {tokens}")
    ids_t = torch.tensor(ids[: chunks * tokens]).view(chunks, tokens)
    return ids_t % vocab  # a reduced test vocabulary keeps ids in range


@torch.no_grad()
def measure_rates(model: SpikeGPT, ids: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """Fraction of ones of every LIF node's output (and of the binary embedding) over ``ids`` ``[N, T]``."""
    counts: dict[str, list[float]] = {}

    def hook(name):
        def fn(_module, _inputs, out):
            c = counts.setdefault(name, [0.0, 0.0])
            c[0] += float(out.float().sum())
            c[1] += out.numel()

        return fn

    handles = [node.register_forward_hook(hook(name)) for name, node in model.spiking_neurons().items()]
    handles.append(model.binarize.register_forward_hook(hook(EMBEDDING_RATE)))
    try:
        was_training = model.training
        model.eval()
        for i in range(0, ids.shape[0], batch):
            model(ids[i : i + batch].to(model.emb.weight.device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return {name: s / n for name, (s, n) in counts.items()}


def load_rates(path: Path) -> dict[str, float]:
    """Rates from a JSON file: ``{"rates": {...}}`` (what this tool writes), or a flat ``{name: rate}``.

    A run's per-module sparsity (fraction of zeros of ``S(Ax)*Ax``: ``"test_sparsity_per_module"`` in a
    run's ``metrics.json``, or ``"sparsity"``) supplies the SpikeLoRA gate densities (``1 - sparsity``) where
    no gate rate is given; its per-block and ``"mean"`` entries are not modules and are left out.
    """
    data = json.loads(Path(path).read_text())
    sparsity_keys = [k for k in ("test_sparsity_per_module", "sparsity") if isinstance(data.get(k), dict)]
    rates = dict(data.get("rates", {} if sparsity_keys else data))
    for key in sparsity_keys:
        for name, zeros in data[key].items():
            if (
                name.startswith("blocks.")
                and name.count(".") >= 3
                and isinstance(zeros, int | float)
                and math.isfinite(zeros)
            ):
                rates.setdefault(f"{name}.gate", 1.0 - float(zeros))
    return {k: float(v) for k, v in rates.items() if isinstance(v, int | float)}


# --------------------------------------------------------------------------------------------- report


def report(
    config: SpikeGPTConfig,
    rates: Mapping[str, float],
    r: int,
    adapters: tuple[str, ...],
    head_trained: bool = True,
) -> dict:
    """Every (account, adapter) combination: totals and per-role sums; and the training step per adapter."""
    out = {"config": asdict(config), "rank": r, "e_mac_j": E_MAC, "e_ac_j": E_AC, "rates": dict(rates), "accounts": {}}
    for account in ACCOUNTS:
        for adapter in adapters:
            ops = operation_account(config, rates, account, adapter, r)
            out["accounts"][f"{account}/{adapter}"] = {"totals": totals(ops), "by_role": by_role(ops)}
    out["training"] = {
        kind: training_totals(training_account(config, kind, r, head_trained=head_trained))
        for kind in TRAINING_KINDS
        if kind == "none" or kind in adapters
    }
    out["training_head_trained"] = head_trained
    return out


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def comparison(rep: dict) -> list[str]:
    """Sentences: merged LoRA costs the base; SpikeLoRA (unmergeable) costs more than merged LoRA, per account."""
    lines = []
    accounts = rep["accounts"]
    for account in ACCOUNTS:
        base, merged = accounts.get(f"{account}/none"), accounts.get(f"{account}/lora_merged")
        spike = accounts.get(f"{account}/spikelora")
        if base is None or merged is None:
            continue
        e_base, e_merged = base["totals"]["energy_j"], merged["totals"]["energy_j"]
        same = "exactly the base's" if e_merged == e_base else f"{e_merged * 1e6:.3f} uJ (base {e_base * 1e6:.3f})"
        line = f"- {account}: merged LoRA costs {same} {e_base * 1e6:.3f} uJ/token"
        if spike is not None:
            e_spike = spike["totals"]["energy_j"]
            verdict = "dearer" if e_spike > e_merged else "not dearer"
            line += (
                f"; SpikeLoRA, whose data-dependent gate cannot be merged, costs {e_spike * 1e6:.3f} uJ/token: "
                f"{verdict} at inference than merged LoRA by {(e_spike - e_merged) * 1e6:.3f} uJ/token "
                f"({100 * (e_spike / e_merged - 1):.2f} %)"
            )
        lines.append(line + ".")
    return lines


def markdown(rep: dict) -> str:
    """The report as Markdown tables."""
    lines = [
        "## Inference, per token",
        "",
        "| account | adapter | dense-net MACs | MACs | ACs | energy (uJ/token) | dense-net energy (uJ) | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, acc in rep["accounts"].items():
        account, adapter = key.split("/")
        t = acc["totals"]
        lines.append(
            f"| {account} | {KIND_LABELS.get(adapter, adapter)} | {_fmt(t['dense_macs'])} | {_fmt(t['macs'])} | "
            f"{_fmt(t['acs'])} | {t['energy_j'] * 1e6:.3f} | {t['dense_energy_j'] * 1e6:.3f} | "
            f"{t['energy_ratio_dense_over_account']:.2f} |"
        )
    lines += [
        "",
        "LoRA merged into the base weights (`W0 + s B A`, one matrix of `W0`'s shape) costs exactly what the base "
        "costs. SpikeLoRA cannot be merged (its gate `S(A x)` depends on the input), so at inference it is dearer "
        "than merged LoRA: its `A` and sparse `B` come on top of the base.",
        "",
        *comparison(rep),
    ]
    if rep.get("training"):
        head = "trained" if rep.get("training_head_trained", True) else "frozen"
        lines += [
            "",
            "## Training step (forward + backward), per token",
            "",
            "Dense MACs of the matrix products: forward `F`, backward `2 F` for a trained layer (gradients with "
            "respect to its input and its weight), `F` for a frozen one (input gradient only). Full fine-tuning "
            f"(`none`) trains every layer; under adapters the base is frozen, the adapters are trained and the head "
            f"is {head}. SpikeLoRA's gate sparsity is not exploited (a GPU trains dense).",
            "",
            "| adapter | forward MACs | input-grad MACs | weight-grad MACs | step MACs | step / forward | "
            "energy (uJ/token) | inference energy, as implemented (uJ/token) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for kind, t in rep["training"].items():
            inference = rep["accounts"].get(f"as_implemented/{kind}")
            inf = f"{inference['totals']['energy_j'] * 1e6:.3f}" if inference else "–"
            lines.append(
                f"| {kind} | {_fmt(t['forward_macs'])} | {_fmt(t['input_grad_macs'])} | "
                f"{_fmt(t['weight_grad_macs'])} | {_fmt(t['macs'])} | {t['step_over_forward']:.3f} | "
                f"{t['energy_j'] * 1e6:.3f} | {inf} |"
            )
    for key, acc in rep["accounts"].items():
        lines += [
            "",
            f"### {key} (summed over blocks)",
            "",
            "| layer | part | input | mean rate | MACs | ACs | why |",
            "| --- | --- | --- | ---: | ---: | ---: | --- |",
        ]
        for g in acc["by_role"]:
            lines.append(
                f"| {g['role']} | {g['part']} | {g['input']} | {g['mean_rate']:.4f} | {_fmt(g['macs'])} | "
                f"{_fmt(g['acs'])} | {g['why']} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spikegpt-ft energy", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="official SpikeGPT .pth (else random weights at --layers/--embd)")
    p.add_argument("--adapter-file", type=Path, help="trained adapters (safetensors) to load onto the checkpoint")
    p.add_argument(
        "--init",
        choices=("scaled", "default"),
        default="scaled",
        help="random weights: 'scaled' (LIFs fire: spikegpt_ft.model.init_random_spiking) or torch's default "
        "(LIFs stay silent)",
    )
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--head-out", type=int, help="head outputs (default: vocabulary, an LM head; 2: a classifier)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank r (SpikeLoRA paper default 8)")
    p.add_argument("--v-threshold", type=float, default=0.1, help="SpikeLoRA gate threshold (fresh adapters)")
    p.add_argument(
        "--frozen-head",
        action="store_true",
        help="training step: the head stays frozen under adapters (a language model; default: trained, a classifier)",
    )
    p.add_argument("--rates", type=Path, help="JSON of spike rates, or a run's metrics.json (skip measuring)")
    p.add_argument("--task", default="subj", help="task whose sentences the rates are measured on (default subj)")
    p.add_argument("--data-dir", type=Path, help="the task's files (default: where training finds them)")
    p.add_argument("--tokenizer", type=Path, help="20B_tokenizer.json (default: where training finds it)")
    p.add_argument("--chunks", type=int, default=8, help="sequences of text to measure the rates on")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p


def _measure(args: argparse.Namespace) -> tuple[SpikeGPTConfig, dict[str, float], int, str]:
    """Build or load the model, give it SpikeLoRA adapters if it has none, and measure its rates on text."""
    if args.checkpoint:
        model, source = load_model(args.checkpoint), str(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = SpikeGPT(SpikeGPTConfig.sized(args.layers, args.embd, args.vocab)).eval()
        if args.init == "scaled":
            init_random_spiking(model, seed=0)
        source = f"random weights ({args.init} init, seed 0): rates are NOT those of a trained model"
    if args.adapter_file:
        load_adapters(model, args.adapter_file)
    else:  # fresh SpikeLoRA (B = 0, so the base output is unchanged) to measure its gates
        attach_adapters(model, kind="spikelora", r=args.rank, v_threshold=args.v_threshold)
    data_dir = find_data_dir(args.task, args.data_dir)
    texts = task_texts(args.task, data_dir)
    ids = token_chunks(texts, args.tokenizer, args.chunks, args.tokens, model.config.vocab_size)
    rates = measure_rates(model, ids)
    source = f"measured on {args.chunks} x {args.tokens} tokens of {args.task} ({data_dir}; {source})"
    return model.config, rates, model.adapter_config.rank, source


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.rates:
        if args.checkpoint:
            config = SpikeGPTConfig.from_state_dict(read_state_dict(args.checkpoint))
        else:
            config = SpikeGPTConfig.sized(args.layers, args.embd, args.vocab)
        rates, r, rate_source = load_rates(args.rates), args.rank, f"read from {args.rates}"
    else:
        config, rates, r, rate_source = _measure(args)
    if args.head_out:
        config = SpikeGPTConfig(**{**asdict(config), "head_out": args.head_out})
    gated = any(k.endswith(".gate") for k in rates)
    adapters = ("none", "lora", "lora_merged", "spikelora") if gated else ("none", "lora", "lora_merged")
    rep = report(config, rates, r, adapters, head_trained=not args.frozen_head)
    rep["rate_source"] = rate_source
    lif = [v for k, v in rates.items() if k.endswith((".lif1", ".lif2"))]
    gates = [v for k, v in rates.items() if k.endswith(".gate")]
    print(f"# rates: {rate_source}")
    print(
        f"# mean LIF rate {sum(lif) / max(len(lif), 1):.4f}, embedding {rates.get(EMBEDDING_RATE, math.nan):.4f}"
        + (f", mean SpikeLoRA gate rate {sum(gates) / len(gates):.4f}" if gates else "")
    )
    md = markdown(rep)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"Spike rates: {rate_source}\n\n{md}\n")
    return rep


if __name__ == "__main__":
    main()
