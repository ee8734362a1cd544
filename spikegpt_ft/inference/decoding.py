"""Fast recurrent decoding: one ``model.step`` per token, replayed as a CUDA graph or, on the CPU, compiled.

At batch 1 a SpikeGPT step is a few thousand small kernels (LayerNorms, token shifts, WKV, the
SpikingJelly LIFs, the adapters), so on a GPU the host's time to launch them, not the GPU's time to run
them, sets the speed. :class:`GraphedStepper` keeps the token input, the logits and the whole
:class:`~spikegpt_ft.state.RecurrentState` in fixed buffers and advances them in place; on CUDA that
in-place step is captured once as a ``torch.cuda.CUDAGraph`` and each token is one graph launch.

On the CPU the same overhead is Python's: a few microseconds per operation and module call. There the
stepper runs the blocks in one compiled call (:func:`~spikegpt_ft.ops.decode.decode_blocks`, bitwise
``model.step``'s result) when they are built of exactly the modules that call implements (plain linear
layers or LoRA / SpikeLoRA adapters), without hooks; otherwise (spike monitors, other neurons, adapters in
training mode) and with ``use_graph=False`` on CUDA it runs
``model.step`` eagerly, whose buffer logic is what the CPU tests check; on CUDA the graph replays exactly
those kernels.

Written by hand rather than with ``torch.cuda.make_graphed_callables`` (which graphs autograd-aware
callables over their explicit tensor inputs, not a state that is updated in place) or ``torch.compile``
(whose ``reduce-overhead`` mode would have to trace SpikingJelly's dispatch and the WKV extension).

What a graph captures is fixed at capture time: the model's modules and the memory of its weights.

- Weights changed **in place** (``param.data.copy_``, ``load_adapters``, ``merge_adapters``, an optimiser
  step) are seen by the next step: the graph reads the same memory.
- Parameters or modules **reassigned** after capture (``model.reset_head``, ``attach_adapters``,
  ``model.to(...)``, ``load_state_dict(..., assign=True)``) are not: the graph keeps reading the old
  tensors. Build a new stepper after such a change.
- The compiled CPU step likewise holds the blocks' tensors from construction. A forward hook registered
  later on a block's module, or an adapter put in training mode, sends each step back to ``model.step``
  (which calls the hook); merging or unmerging adapters makes the stepper collect its operands again.
- The stepper runs the model in eval mode under ``torch.no_grad`` and counts every token in the adapters'
  sparsity counters (their token mask is set to ``None`` at construction); those counters are on-device
  buffers and keep counting during replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.modules.module as module_hooks

from ..adapters import AdapterLinear, sparsity
from ..model import RecurrentState, SpikeGPT, check_token_ids
from ..model.spikegpt import Block, ChannelMix, TimeMix
from ..ops.decode import (
    NEURONS,
    PRODUCTS,
    BlockOperands,
    ProductOperands,
    StackOperands,
    block_operands,
    decode_blocks,
    linear_operands,
    stack_operands,
    unhooked,
)

#: Eager steps run on a side stream before capture (PyTorch's CUDA-graph recipe; lets lazy
#: initialisation such as cuBLAS handles, Triton compilation and kernel selection happen outside the graph).
WARMUP_STEPS = 3


class GraphedStepper:
    """Token-by-token decoding of ``batch_size`` sequences with the state held in fixed buffers.

    ``step(tokens)`` feeds one token per sequence and returns the logits ``[B, head_out]``; the state
    advances in place. ``use_graph=None`` captures a CUDA graph when the model is on a CUDA device and
    runs eagerly otherwise; ``True`` requires CUDA, ``False`` always runs eagerly. Both run the same
    function: ``model.step(tokens, state, check_ids=False)`` followed by copying the next state and the
    logits into the buffers. The model must be in eval mode; see the module docstring for what a graph
    sees of later changes to the model.
    """

    def __init__(self, model: SpikeGPT, batch_size: int, use_graph: bool | None = None):
        if model.training:
            raise ValueError("GraphedStepper needs the model in eval mode: call model.eval() first")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.device = model.emb.weight.device
        if use_graph and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device; it is on {self.device}")
        self.uses_graph = self.device.type == "cuda" if use_graph is None else bool(use_graph)
        self._graph: torch.cuda.CUDAGraph | None = None
        # Buffers are ordinary tensors even when built inside ``torch.inference_mode``, so that the
        # in-place updates of ``step`` are allowed wherever it is called.
        # the probe and warm-up steps are not the caller's tokens: no sparsity recording counts them
        with torch.inference_mode(False), torch.no_grad(), self._on_device(), sparsity.suspended():
            self._tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            fresh = model.init_state(batch_size)
            # A fresh state's membranes are None (0); a probe step gives their shapes and the logits' dtype.
            logits, probe = model.step(self._tokens, fresh, check_ids=False)
            self._logits = torch.zeros_like(logits)
            self._state = RecurrentState(
                att_shift=torch.zeros_like(fresh.att_shift),
                ffn_shift=torch.zeros_like(fresh.ffn_shift),
                wkv=torch.zeros_like(fresh.wkv),
                membranes={name: torch.zeros_like(v) for name, v in probe.membranes.items()},
                signature=fresh.signature,
            )
            self._compiled: CompiledStep | None = None
            if not self.uses_graph:
                self._compile()
            # the compiled step's second set of shift and WKV buffers (see _advance_compiled)
            self._spare = (
                None
                if self._compiled is None
                else RecurrentState(
                    torch.empty_like(fresh.att_shift), torch.empty_like(fresh.ffn_shift), torch.empty_like(fresh.wkv)
                )
            )
            if self.uses_graph:
                self._capture()
            _copy_state(self._state, fresh)

    @property
    def uses_compiled_step(self) -> bool:
        """Whether steps run the blocks in one compiled call (CPU, and blocks exactly as SpikeGPT builds them)."""
        return self._compiled is not None

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _advance(self) -> None:
        """The step that is captured: the model on the token buffer, results copied into the buffers."""
        if self._compiled_step_applies():
            self._advance_compiled()
            return
        logits, next_state = self.model.step(self._tokens, self._state, check_ids=False)
        self._logits.copy_(logits)
        _copy_state(self._state, next_state)

    def _compile(self) -> None:
        """Collect the compiled step's operands (``None``: the model's blocks take ``model.step``)."""
        self._compiled = compile_step(self.model, self.batch_size)
        modules = [] if self._compiled is None else [m for b in self.model.blocks for m in b.modules()]
        # the blocks' modules' hook dictionaries, which registering a hook fills in place: one any() over them per
        # step (hundreds of modules) instead of a generator over the modules
        self._hook_dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._adapters = [(m, m.merged) for m in modules if isinstance(m, AdapterLinear)]

    def _compiled_step_applies(self) -> bool:
        """Whether this step can run compiled: no hook since, no adapter in training mode or merged since."""
        if self._compiled is None or self._hooked() or any(m.training for m, _ in self._adapters):
            return False
        if any(m.merged != merged for m, merged in self._adapters):
            self._compile()
        return self._compiled is not None

    def _hooked(self) -> bool:
        """Whether a forward hook sits on a block's module or on every module: the compiled step would skip it.

        Reads torch's hook dictionaries (``nn.Module`` has no public accessor for them).
        """
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return True
        return any(self._hook_dicts)

    def _advance_compiled(self) -> None:
        # on the CPU nothing holds the buffers' addresses: the next state's tensors become the buffers, and the
        # state before, which nothing else holds (``state()`` hands out copies), receives the one after
        logits, next_state = compiled_step(self.model, self._compiled, self._tokens, self._state, into=self._spare)
        self._spare, self._state = self._state, next_state
        self._logits.copy_(logits)

    def _capture(self) -> None:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._advance()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captures on its own side stream; nothing runs until replay
            self._advance()
        self._graph = graph

    def step(self, tokens: torch.Tensor | Sequence[int], *, check_ids: bool = True) -> torch.Tensor:
        """Feed one token per sequence (``tokens`` ``[B]``) and return the logits ``[B, head_out]``.

        The result is the stepper's own logits buffer, not a copy: the next ``step`` overwrites it, so
        ``clone()`` it to keep it. Token ids are range-checked before anything runs (a bad id is a
        ``ValueError`` and leaves the state as it was); for ids on the CPU that costs nothing, for ids
        already on the GPU it is one host-device sync, which ``check_ids=False`` skips for ids known
        to be in range (an out-of-range id then reads outside the embedding on the device).
        """
        if self.model.training:
            raise ValueError("the model was put in training mode; call model.eval() before stepping")
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(list(tokens))
        if tokens.shape != (self.batch_size,):
            raise ValueError(
                f"this stepper decodes {self.batch_size} sequences: tokens must have shape [{self.batch_size}], "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be integers (int64), got {tokens.dtype}")
        if check_ids:
            check_token_ids(tokens, self.model.config.vocab_size)
        with torch.no_grad(), self._on_device():
            self._tokens.copy_(tokens)
            if self._graph is None:
                self._advance()
            else:
                self._graph.replay()
        return self._logits

    def reset(self) -> None:
        """Go back to the state before any token (every sequence starts afresh)."""
        self.load_state(self.model.init_state(self.batch_size))

    def load_state(self, state: RecurrentState) -> None:
        """Continue from ``state`` (e.g. the state after ``model.prefill`` of a prompt); it is copied in."""
        if not isinstance(state, RecurrentState):
            raise ValueError(f"state must be a RecurrentState, got {type(state).__name__}")
        if state.signature != self._state.signature:
            raise ValueError(
                "this state belongs to another model (layers, width or spiking neurons differ): "
                f"state {state.signature[:2]} vs stepper {self._state.signature[:2]}"
            )
        if state.batch_size != self.batch_size:
            raise ValueError(f"state holds {state.batch_size} sequences but this stepper decodes {self.batch_size}")
        # inference mode: the compiled step's states made under it are inference tensors, which only it may
        # write into (and it may write into plain ones too)
        with torch.inference_mode(), self._on_device():
            _copy_state(self._state, state)

    def state(self) -> RecurrentState:
        """A copy of the current state (membranes as tensors, zeros before the first token)."""
        s = self._state
        return RecurrentState(
            att_shift=s.att_shift.clone(),
            ffn_shift=s.ffn_shift.clone(),
            wkv=s.wkv.clone(),
            membranes={name: v.clone() for name, v in s.membranes.items()},
            signature=s.signature,
        )


def _product_operands(layer: torch.nn.Module, dtype: torch.dtype, rows: int) -> ProductOperands | None:
    if type(layer) is AdapterLinear:
        return layer.decode_operands(dtype, rows)
    return linear_operands(layer, dtype, rows)


def _neuron_names(operands: list[BlockOperands]) -> list[str | None]:
    """The state's name of each neuron slot of :func:`~spikegpt_ft.ops.decode.decode_blocks` (``None``: not carried)."""
    names: list[str | None] = []
    for i, block in enumerate(operands):
        names += [
            f"blocks.{i}.{path}.gate" if p.gate == "temporal" else None
            for path, p in zip(PRODUCTS, block.products, strict=True)
        ]
        names += [f"blocks.{i}.{name}" for name in NEURONS]
    return names


@dataclass(frozen=True)
class CompiledStep:
    """What :func:`compiled_step` runs: the blocks' operands (as listed and as laid out for the kernel) and the
    state's name of each neuron slot."""

    blocks: list[BlockOperands]
    stack: StackOperands
    neurons: list[str | None]
    carried: frozenset[str]


def compile_step(model: SpikeGPT, batch_size: int) -> CompiledStep | None:
    """What :func:`compiled_step` needs to step ``batch_size`` sequences of ``model``, or ``None``.

    ``None`` unless the model is on the CPU in float32 or bfloat16, every block is built of exactly the
    modules SpikeGPT builds (its linear layers plain or with LoRA / SpikeLoRA adapters; no subclasses, no
    forward hooks) and the model carries no neurons but the blocks' LIFs and the adapters' temporal gates.
    """
    dtype = model.emb.weight.dtype
    if (
        type(model) is not SpikeGPT
        or model.emb.weight.device.type != "cpu"
        or dtype not in (torch.float32, torch.bfloat16)
    ):
        return None
    for block in model.blocks:
        if not (unhooked(block, Block) and unhooked(block.att, TimeMix) and unhooked(block.ffn, ChannelMix)):
            return None
        if not unhooked(block.drop, torch.nn.Dropout):
            return None
    operands = [block_operands(block, dtype, batch_size, _product_operands) for block in model.blocks]
    if any(o is None for o in operands) or len({o.eps for o in operands}) > 1:
        return None
    neurons = _neuron_names(operands)
    carried = tuple(name for name in neurons if name is not None)
    if tuple(model.carried_neurons()) != carried:
        return None
    return CompiledStep(operands, stack_operands(operands), neurons, frozenset(carried))


def compiled_step(
    model: SpikeGPT,
    plan: CompiledStep,
    tokens: torch.Tensor,
    state: RecurrentState,
    into: RecurrentState | None = None,
) -> tuple[torch.Tensor, RecurrentState]:
    """``model.step(tokens, state)`` with the blocks in one compiled call: the same logits and next state, bitwise.

    ``plan`` is :func:`compile_step` of ``model`` for ``len(tokens)`` rows; ``state`` is one of
    this model's (``init_state``, ``prefill``, ``step``). The embedding, ``ln_out`` and the head run as modules;
    the SpikeLoRA gates report to an active sparsity recording as the adapters do. Call it without gradients.
    ``into``: a state of the same shapes, not ``state``, whose shift and WKV tensors receive the next ones
    (:func:`~spikegpt_ft.ops.decode.decode_blocks`); it is overwritten.
    """
    names = plan.neurons
    if state.membranes.keys() != plan.carried or state.batch_size != tokens.shape[0]:
        raise ValueError(
            f"compiled_step: a state of {state.batch_size} sequences and neurons {sorted(state.membranes)[:3]}... "
            f"does not fit {tokens.shape[0]} tokens through these {len(plan.blocks)} blocks"
        )
    recording = sparsity.is_recording()
    x = model.binarize(model.emb(tokens))
    x, att_shift, ffn_shift, wkv, membranes, gated = decode_blocks(
        x,
        plan.stack,
        state.att_shift,
        state.ffn_shift,
        state.wkv,
        [None if n is None else state.membranes[n] for n in names],
        record=recording,
        into=None if into is None else (into.att_shift, into.ffn_shift, into.wkv),
    )
    if recording:
        for index, activations in enumerate(gated):
            if activations is not None:
                block, path = divmod(index, len(PRODUCTS))
                sparsity.record(model.blocks[block].get_submodule(PRODUCTS[path]), activations.unsqueeze(1))
    carried = {n: v for n, v in zip(names, membranes, strict=True) if n is not None}
    next_state = RecurrentState(att_shift, ffn_shift, wkv, {n: carried[n] for n in state.membranes}, state.signature)
    return model.head(model.ln_out(x)), next_state


def step_function(
    model: SpikeGPT, batch_size: int
) -> Callable[[torch.Tensor, RecurrentState], tuple[torch.Tensor, RecurrentState]]:
    """``(tokens, state) -> (logits, next_state)`` for ``batch_size`` sequences: :func:`compiled_step` where
    :func:`compile_step` allows it, else ``model.step`` (the same results)."""
    plan = compile_step(model, batch_size)
    if plan is None:
        return model.step
    return lambda tokens, state: compiled_step(model, plan, tokens, state)


def _copy_state(dst: RecurrentState, src: RecurrentState) -> None:
    """Copy ``src`` into the buffers of ``dst`` in place; a ``None`` membrane (never fired) is zeros."""
    dst.att_shift.copy_(src.att_shift)
    dst.ffn_shift.copy_(src.ffn_shift)
    dst.wkv.copy_(src.wkv)
    for name, buffer in dst.membranes.items():
        membrane = src.membranes[name]
        if membrane is None:
            buffer.zero_()
        else:
            buffer.copy_(membrane)
