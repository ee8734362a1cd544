"""Operations and energy per token of SpikeGPT, with LoRA or SpikeLoRA adapters, from measured spike rates.

``python -m spikegpt_ft.energy [--checkpoint PTH | --layers L --embd C --vocab V] [--rates RATES.json]
[--json OUT] [--markdown OUT]``

Without ``--rates`` the spike rates are measured here: the model (random weights unless a checkpoint is
given) reads real text, the Subj sentences of ``../shared/data/subj`` tokenised with the 20B tokenizer,
and forward hooks on ``model.lif_nodes()`` (and on the binary embedding) count the spikes.

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
binary, so **sparse MACs**, ``gate rate x r x fan_out``. (LoRA can also be merged into ``W0``, costing
nothing extra at inference; SpikeLoRA's gate depends on the input and cannot be.)

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

from .model import SpikeGPT, SpikeGPTConfig

#: 45 nm energy per operation, joules.
E_MAC = 4.6e-12
E_AC = 0.9e-12

ACCOUNTS = ("as_implemented", "spike_driven_assumption")
ADAPTER_KINDS = ("none", "lora", "spikelora")
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
    shape = {"att.key": (C, C), "att.value": (C, C), "att.receptance": (C, C), "att.output": (C, C),
             "ffn.key": (C, H), "ffn.receptance": (C, C), "ffn.value": (H, C)}
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
    each gate (``blocks.{i}.att.key.gate`` ...).
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
            ops.append(Ops(name, "base", k, d, "binary", rate, k * d, 0.0, rate * k * d,
                           f"assumed to read the spikes of {source} (LN and token shift ignored)"))
        role = name.split(".", 2)[2] if name.startswith("blocks.") else None
        if adapter != "none" and role in targets:
            base = ops[-1]
            if base.input == "binary":
                ops.append(Ops(name, "adapter_A", k, r, "binary", base.rate, k * r, 0.0, base.rate * k * r,
                               "reads the same (assumed binary) input as the base layer"))
            else:
                ops.append(Ops(name, "adapter_A", k, r, "dense", 1.0, k * r, k * r, 0.0,
                               "reads the same real-valued input as the base layer"))
            if adapter == "lora":
                ops.append(Ops(name, "adapter_B", r, d, "dense", 1.0, r * d, r * d, 0.0,
                               "LoRA: B reads A x, dense (mergeable into W0 at inference)"))
            else:
                g = _rate(rates, f"{name}.gate")
                ops.append(Ops(name, "adapter_B", r, d, "sparse", g, r * d, g * r * d, 0.0,
                               "SpikeLoRA: B reads S(Ax)*Ax, sparse but not binary: sparse MACs"))
    C = config.n_embd
    for i in range(config.n_layer):
        for lif in ("lif1", "lif2"):
            key = f"blocks.{i}.{lif}"
            rate = _rate(rates, key)
            ops.append(Ops(key, "residual_spikes", C, 1, "binary", rate, 0.0, 0.0, rate * C,
                           "binary spikes added to the residual stream: additions only"))
    return ops


def totals(ops: list[Ops]) -> dict[str, float]:
    """Sums per token: dense-network MACs, MACs, ACs, energy and the dense-network energy."""
    dense = sum(o.dense_macs for o in ops)
    macs, acs = sum(o.macs for o in ops), sum(o.acs for o in ops)
    e = energy_joules(macs, acs)
    e_dense = energy_joules(dense, 0.0)
    return {"dense_macs": dense, "macs": macs, "acs": acs, "energy_j": e, "dense_energy_j": e_dense,
            "energy_ratio_dense_over_account": e_dense / e if e else math.inf}


def by_role(ops: list[Ops]) -> list[dict]:
    """Operations summed over blocks, per layer role and part (``att.key``/base, ``ffn.value``/adapter_B...)."""
    groups: dict[tuple[str, str], dict] = {}
    for o in ops:
        role = o.name.split(".", 2)[2] if o.name.startswith("blocks.") else o.name
        g = groups.setdefault((role, o.part), {"role": role, "part": o.part, "input": o.input, "why": o.why,
                                               "dense_macs": 0.0, "macs": 0.0, "acs": 0.0, "rates": []})
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


# --------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def scaled_init(model: SpikeGPT, seed: int = 0) -> SpikeGPT:
    """Random weights scaled so that the LIFs fire (torch's default init leaves them silent).

    Matrices ~ N(0, (2 / sqrt(fan_in))^2), ``time_decay`` ~ U(-3, 1), ``time_first`` ~ U(-1, 1), the
    ``time_mix`` ~ U(0, 1). Rates measured on it describe a random network, not a trained one.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("time_decay"):
            p.copy_(torch.rand(p.shape, generator=g) * 4 - 3)
        elif name.endswith("time_first"):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
        elif "time_mix" in name:
            p.copy_(torch.rand(p.shape, generator=g))
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[1] ** 0.5))
    return model


def read_texts(data_dir: Path) -> list[str]:
    """Sentences of a data folder: every line of every file (``LABEL sentence`` lines lose the label)."""
    files = sorted(p for p in Path(data_dir).iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"no text files in {data_dir}")
    texts = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            head, _, rest = line.partition(" ")
            texts.append(rest if head.isdigit() and rest else line)
    return [t for t in texts if t.strip()]


def token_chunks(data_dir: Path, tokenizer_path: Path | None, chunks: int, tokens: int, vocab: int) -> torch.Tensor:
    """``[chunks, tokens]`` ids: the data's sentences interleaved across files, joined by newlines, cut into chunks.

    ``tokenizer_path`` ``None`` looks in the training code's places (``data/``, ``../shared/tokenizer/``).
    """
    from .data import load_tokenizer

    texts = read_texts(data_dir)
    # interleave the files' sentences (e.g. subjective / objective) so that a short read sees both
    half = len(texts) // 2
    mixed = [t for pair in zip(texts[:half], texts[half:], strict=False) for t in pair] or texts
    tok = load_tokenizer(tokenizer_path)
    ids: list[int] = []
    for t in mixed:
        ids += tok.encode(t + "\n").ids
        if len(ids) >= chunks * tokens:
            break
    if len(ids) < chunks * tokens:
        raise ValueError(f"{data_dir} holds only {len(ids)} tokens; asked for {chunks} x {tokens}")
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

    handles = [node.register_forward_hook(hook(name)) for name, node in model.lif_nodes().items()]
    handles.append(model.binarize.register_forward_hook(hook(EMBEDDING_RATE)))
    try:
        was_training = model.training
        model.eval()
        for i in range(0, ids.shape[0], batch):
            model(ids[i: i + batch].to(model.emb.weight.device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return {name: s / n for name, (s, n) in counts.items()}


def load_rates(path: Path) -> dict[str, float]:
    """Rates from a JSON file: ``{"rates": {...}}`` (what this tool writes), or a flat ``{name: rate}``.

    A run's adapter ``sparsity`` dict (fraction of zeros of ``S(Ax)*Ax`` per module, under ``"sparsity"``)
    supplies the SpikeLoRA gate densities (``1 - sparsity``) where no gate rate is given.
    """
    data = json.loads(Path(path).read_text())
    rates = dict(data.get("rates", {} if "sparsity" in data else data))
    for name, zeros in data.get("sparsity", {}).items():
        if name.startswith("blocks.") and name.count(".") >= 3:
            rates.setdefault(f"{name}.gate", 1.0 - float(zeros))
    return {k: float(v) for k, v in rates.items() if isinstance(v, int | float)}


# --------------------------------------------------------------------------------------------- report


def report(config: SpikeGPTConfig, rates: Mapping[str, float], r: int, adapters: tuple[str, ...]) -> dict:
    """Every (account, adapter) combination: totals and per-role sums."""
    out = {"config": asdict(config), "rank": r, "e_mac_j": E_MAC, "e_ac_j": E_AC, "rates": dict(rates),
           "accounts": {}}
    for account in ACCOUNTS:
        for adapter in adapters:
            ops = operation_account(config, rates, account, adapter, r)
            out["accounts"][f"{account}/{adapter}"] = {"totals": totals(ops), "by_role": by_role(ops)}
    return out


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def markdown(rep: dict) -> str:
    """The report as Markdown tables."""
    lines = ["| account | adapter | dense-net MACs | MACs | ACs | energy (uJ/token) | dense-net energy (uJ) | ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, acc in rep["accounts"].items():
        account, adapter = key.split("/")
        t = acc["totals"]
        lines.append(f"| {account} | {adapter} | {_fmt(t['dense_macs'])} | {_fmt(t['macs'])} | {_fmt(t['acs'])} | "
                     f"{t['energy_j'] * 1e6:.3f} | {t['dense_energy_j'] * 1e6:.3f} | "
                     f"{t['energy_ratio_dense_over_account']:.2f} |")
    for key, acc in rep["accounts"].items():
        lines += ["", f"### {key} (summed over blocks)", "",
                  "| layer | part | input | mean rate | MACs | ACs | why |",
                  "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        for g in acc["by_role"]:
            lines.append(f"| {g['role']} | {g['part']} | {g['input']} | {g['mean_rate']:.4f} | {_fmt(g['macs'])} | "
                         f"{_fmt(g['acs'])} | {g['why']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spikegpt_ft.energy", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="official SpikeGPT .pth (else random weights at --layers/--embd)")
    p.add_argument("--adapter-file", type=Path, help="trained adapters (safetensors) to load onto the checkpoint")
    p.add_argument("--init", choices=("scaled", "default"), default="scaled",
                   help="random weights: 'scaled' (LIFs fire, see scaled_init) or torch's default (LIFs stay silent)")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--head-out", type=int, help="head outputs (default: vocabulary, an LM head; 2: a classifier)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank r (SpikeLoRA paper default 8)")
    p.add_argument("--v-threshold", type=float, default=0.1, help="SpikeLoRA gate threshold (fresh adapters)")
    p.add_argument("--rates", type=Path, help="JSON of spike rates (skip measuring)")
    p.add_argument("--data-dir", type=Path, help="text files for the rates (default: Subj, where train.py finds it)")
    p.add_argument("--tokenizer", type=Path, help="20B_tokenizer.json (default: where train.py finds it)")
    p.add_argument("--chunks", type=int, default=8, help="sequences of text to measure the rates on")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p


def _measure(args: argparse.Namespace) -> tuple[SpikeGPTConfig, dict[str, float], int, str]:
    """Build or load the model, give it SpikeLoRA adapters if it has none, and measure its rates on text."""
    from .adapters import attach_adapters, load_adapters

    if args.checkpoint:
        from .model import load_model

        model, source = load_model(args.checkpoint), str(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = SpikeGPT(SpikeGPTConfig(args.vocab, args.embd, args.layers, 4 * args.embd, args.vocab)).eval()
        if args.init == "scaled":
            scaled_init(model)
        source = f"random weights ({args.init} init, seed 0): rates are NOT those of a trained model"
    if args.adapter_file:
        load_adapters(model, args.adapter_file)
    else:  # fresh SpikeLoRA (B = 0, so the base output is unchanged) to measure its gates
        attach_adapters(model, kind="spikelora", r=args.rank, v_threshold=args.v_threshold)
    from .data import find_data_dir

    data_dir = args.data_dir or find_data_dir("subj")
    ids = token_chunks(data_dir, args.tokenizer, args.chunks, args.tokens, model.config.vocab_size)
    rates = measure_rates(model, ids)
    source = f"measured on {args.chunks} x {args.tokens} tokens of {data_dir} ({source})"
    return model.config, rates, model.adapter_config.r, source


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.rates:
        if args.checkpoint:
            from .model import _read_state_dict

            config = SpikeGPTConfig.from_state_dict(_read_state_dict(args.checkpoint))
        else:
            config = SpikeGPTConfig(args.vocab, args.embd, args.layers, 4 * args.embd, args.vocab)
        rates, r, rate_source = load_rates(args.rates), args.rank, f"read from {args.rates}"
    else:
        config, rates, r, rate_source = _measure(args)
    if args.head_out:
        config = SpikeGPTConfig(**{**asdict(config), "head_out": args.head_out})
    adapters = ("none", "lora", "spikelora") if any(k.endswith(".gate") for k in rates) else ("none", "lora")
    rep = report(config, rates, r, adapters)
    rep["rate_source"] = rate_source
    lif = [v for k, v in rates.items() if k.endswith((".lif1", ".lif2"))]
    gates = [v for k, v in rates.items() if k.endswith(".gate")]
    print(f"# rates: {rate_source}")
    print(f"# mean LIF rate {sum(lif) / max(len(lif), 1):.4f}, embedding {rates.get(EMBEDDING_RATE, math.nan):.4f}"
          + (f", mean SpikeLoRA gate rate {sum(gates) / len(gates):.4f}" if gates else ""))
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
