"""One method of one `gfa bench` cell, run in a process of its own so that its memory is its own.

The parent starts one worker per method and drives them one step at a time, so that the methods' steps
interleave (see `plan.py`). A step is one training step (`WorkerSpec.task` "train": forward, loss, backward,
AdamW) or one greedy `generate` call ("generate": a prompt's prefill, then one decode forward per new token).
Protocol, pickled messages over the worker's stdin and stdout: the parent sends the `WorkerSpec`; the worker
builds its model and answers ("ready", {"trainable": n}); then each command gets one answer:

    "step"    -> ("step", timings)                           one timed step; training:
                                                              {"wall_s": ..., "cpu_s": ...}, generation:
                                                              {"prefill_s", "prefill_cpu_s", "decode_s",
                                                              "decode_cpu_s" (per decode forward), "tokens"}
    "memory"  -> ("memory", {"resting_mem_mb": ..., "peak_mem_mb": ..., "step_mem_mb": ...})
                                                              one step with its memory measured
    "stop"    -> no answer; the process ends.

A failure is answered with ("error", traceback) and ends the process.

Memory is the memory held by PyTorch tensors, measured the same way as on a GPU: `resting` is what the
process holds between steps (weights, trainable factors, optimizer state, and any scratch memory an
implementation keeps between steps), `peak` the most it holds at any moment of a step (adding activations,
gradients and temporaries), `step` = peak - resting. On CUDA these are the caching allocator's statistics
(`memory_allocated` before the step, `max_memory_allocated` after `reset_peak_memory_stats`). On CPU, PyTorch's
profiler records every tensor allocation and free from before the model is built until the measured step ends,
each with the running total of the bytes held (`CpuAllocationRecorder`). That is exact and deterministic, where
the process's resident set size (RSS, `ru_maxrss`) is not: RSS also counts what glibc keeps mapped after a
free, which depends on allocation sizes and history rather than on what the step holds, and `ru_maxrss` is a
high-water mark over the whole life of the process, model construction included.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from peft import get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from gfa_peft.bench.settings import DTYPE_NAMES, NO_ADAPTER
from gfa_peft.bench.shapes import SCOPES, BenchShapes
from gfa_peft.targets import find_targets
from gfa_peft.training.methods import peft_config

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
MIB = 2**20
LEARNING_RATE = 1e-4


class WorkerError(RuntimeError):
    """A worker failed or died; the message holds its traceback or the end of its log."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its model, adapter and batch (picklable: it crosses the process boundary).

    `task` "train": a step trains on `batch_size` sequences of `seq_len` tokens. "generate": a step greedily
    generates `new_tokens` tokens after a prompt of `seq_len` tokens for each of `batch_size` sequences.
    """

    shapes: BenchShapes
    scope: str
    method: str
    rank: int | None
    batch_size: int
    seq_len: int
    device: str
    dtype: str
    threads: int
    seed: int
    task: str = "train"
    new_tokens: int = 0


def attach_method(model: nn.Module, method: str, rank: int | None, targets: str | list[str]) -> nn.Module:
    """The model with `method`'s adapter at `rank` ("gfa", "gfa-gain", "lora", "dora"), or one of the two floors.

    The floor ("floor") freezes every weight and makes the outputs of the target modules require grad: backward
    runs from the loss down to every module an adapter would train, and computes no weight gradient. That is the
    least work any adapter on those modules must do. (Gradients flowing further, to the input embeddings,
    would add the input gradients of the first layer's projections, which no adapter needs: such a floor
    measured slower than LoRA at q+v.)

    The weight-gradient floor ("wgrad") freezes every weight but the target modules' own, whose gradients are
    computed and dropped, with no update: the least work of a method whose exact gradient needs each target
    module's weight gradient g^T x, as GFA's does (its factor gradients are products with it).
    """
    if method in ("floor", "wgrad"):
        model.requires_grad_(False)
        for _, module in find_targets(model, targets):
            if method == "wgrad":
                module.weight.requires_grad_(True)
            else:
                module.register_forward_hook(_output_requires_grad)
        return model
    knobs = {"r": rank, "module_gain": True} if method == "gfa-gain" else {"r": rank}
    return get_peft_model(model, peft_config(method.removesuffix("-gain"), knobs, targets))


def _output_requires_grad(module: nn.Module, inputs, output: torch.Tensor) -> None:
    if not output.requires_grad:  # outputs downstream of an earlier target already require grad
        output.requires_grad_()


def attach_for_generation(model: nn.Module, method: str, rank: int | None, targets: str | list[str]) -> nn.Module:
    """The model as `method` generates with: bare ("base"), with LoRA or GFA unmerged, or with GFA merged
    (`merge_adapter`, so the PEFT wrapper and its layers stay in the forward path, as a user's merged model's do).

    Every factor is drawn at random (no zero B), so no shortcut for a zero update can hide an adapter's cost.
    """
    if method == "base":
        return model.requires_grad_(False)  # nothing trains: its trainable count is 0, as an adapter's is its own
    model = get_peft_model(model, peft_config(method.removesuffix("-merged"), {"r": rank}, targets, zero_update=False))
    if method == "gfa-merged":
        model.merge_adapter()
    return model


class Session:
    """One method's model, built with the same weights for every method, and its memory measurement.

    Subclasses define `step` (the work timed and measured) and `timed_step`.
    """

    def __init__(self, spec: WorkerSpec, attach: Callable[[nn.Module, str, int | None, str | list[str]], nn.Module]):
        self.device = torch.device(spec.device)
        # On CPU, recording starts before the model exists, so that every tensor the worker holds is counted.
        self._recorder = CpuAllocationRecorder() if self.device.type == "cpu" else None
        torch.manual_seed(spec.seed)  # the same weights for every method
        model = spec.shapes.build(self.device).to(DTYPES[spec.dtype])
        self.model = attach(model, spec.method, spec.rank, SCOPES[spec.scope])
        trains = spec.method not in NO_ADAPTER  # the weight-gradient floor's gradients are never applied
        self.trainable = sum(parameter.numel() for parameter in self.model.parameters()
                             if parameter.requires_grad) if trains else 0
        generator = torch.Generator().manual_seed(spec.seed)
        vocabulary = self.model.get_input_embeddings().num_embeddings
        self.tokens = torch.randint(vocabulary, (spec.batch_size, spec.seq_len), generator=generator).to(self.device)

    def step(self) -> object:
        raise NotImplementedError

    def timed_step(self) -> dict:
        raise NotImplementedError

    def measured_step(self) -> dict[str, float]:
        """One step's tensor memory in MiB: resting before it, its peak, and the rise between them.

        On CPU this ends the recording of allocations, so it is done once, before the timed steps.
        """
        if self._recorder is None:
            torch.cuda.synchronize(self.device)
            resting = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            resting, peak = self._recorder.measure(self.step)
        return {"resting_mem_mb": resting / MIB, "peak_mem_mb": peak / MIB, "step_mem_mb": (peak - resting) / MIB}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Trainer(Session):
    """One method's model in training mode, AdamW over its trainable parameters, a fixed batch of random tokens."""

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec, attach_method)
        self.model.train()
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE) if self.trainable else None

    def step(self) -> None:
        """Forward, causal-LM loss, backward, optimizer step; gradients are dropped so none is held between steps."""
        self.model(input_ids=self.tokens, labels=self.tokens).loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)

    def timed_step(self) -> dict[str, float]:
        """Wall-clock and process CPU seconds (all threads) of one step."""
        self._synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        self._synchronize()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


class Generator(Session):
    """One method's model in eval mode, generating greedily from a fixed batch of random prompts."""

    def __init__(self, spec: WorkerSpec):
        if spec.new_tokens < 2:
            raise ValueError(f"generation needs at least 2 new tokens (one decode forward), got {spec.new_tokens}")
        super().__init__(spec, attach_for_generation)
        self.model.eval()
        self.new_tokens = spec.new_tokens

    def step(self, logits_processor: list | None = None) -> torch.Tensor:
        """The new tokens (batch x new_tokens) of one greedy `generate`, exactly `new_tokens` of them."""
        with torch.no_grad():
            output = self.model.generate(
                input_ids=self.tokens, attention_mask=torch.ones_like(self.tokens), do_sample=False,
                max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, pad_token_id=0,
                logits_processor=logits_processor,
            )
        return output[:, self.tokens.shape[1]:]

    def timed_step(self) -> dict:
        """Seconds (wall and process CPU) of the prefill and of one decode forward (the mean over the call's
        `new_tokens - 1` decode forwards), with the tokens generated.

        The times are read where `generate` hands each new token's logits to its logits processors: the first
        call follows the prefill forward, each later one a decode forward.
        """
        clock = _Clock(self._synchronize)
        tokens = self.step(logits_processor=[clock])
        wall, cpu = zip(*clock.marks)
        decodes = len(clock.marks) - 2
        return {
            "prefill_s": wall[1] - wall[0], "prefill_cpu_s": cpu[1] - cpu[0],
            "decode_s": (wall[-1] - wall[1]) / decodes, "decode_cpu_s": (cpu[-1] - cpu[1]) / decodes,
            "tokens": tokens.cpu().tolist(),
        }


class _Clock:
    """A logits processor that changes nothing and notes (wall, CPU) time at its creation and at each call."""

    def __init__(self, synchronize: Callable[[], None]):
        self._synchronize = synchronize
        synchronize()
        self.marks = [(time.perf_counter(), time.process_time())]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._synchronize()
        self.marks.append((time.perf_counter(), time.process_time()))
        return scores


class CpuAllocationRecorder:
    """Every CPU tensor allocation and free from its creation on, recorded by PyTorch's profiler.

    Each recorded allocation or free carries the running total of the bytes allocated since recording began and
    not yet freed (the event tree read here is PyTorch's own input to its memory timeline), so the total at any
    moment is what the tensors created since then hold: weights, factors, optimizer state, and also scratch
    memory that an implementation keeps between steps outside any parameter or buffer.
    """

    _MARK = "gfa-bench-measured-step"

    def __init__(self):
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()
        self._recording = True

    def measure(self, run: Callable[[], object]) -> tuple[int, int]:
        """(bytes held just before `run()`, the most held during it); recording ends with it."""
        from torch._C._profiler import _EventType  # the profiler's event kinds; no public name exists

        if not self._recording:
            raise RuntimeError("a CpuAllocationRecorder measures once: its recording has ended")
        with record_function(self._MARK):
            run()
        self._profiler.stop()
        self._recording = False
        [mark] = [event for event in _walk(self._profiler.profiler.kineto_results.experimental_event_tree())
                  if event.name == self._MARK]
        events = sorted((event for event in _walk(mark.children)
                         if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu"),
                        key=lambda event: event.start_time_ns)
        if not events:
            raise RuntimeError("the measured step allocated no CPU tensor: is it running on CPU?")
        first = events[0].extra_fields
        return first.total_allocated - first.alloc_size, max(event.extra_fields.total_allocated for event in events)


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def serve(commands: BinaryIO, answers: BinaryIO) -> None:
    """The worker's loop: read the spec, build, answer "ready", then answer commands until "stop" (see above)."""
    try:
        spec = pickle.load(commands)
        torch.set_num_threads(spec.threads)
        session = {"train": Trainer, "generate": Generator}[spec.task](spec)
        _answer(answers, ("ready", {"trainable": session.trainable}))
        actions = {"step": session.timed_step, "memory": session.measured_step}
        while (command := pickle.load(commands)) != "stop":
            _answer(answers, (command, actions[command]()))
    except EOFError:  # the parent is gone
        pass
    except Exception:  # noqa: BLE001 - whatever fails, the parent reports it with the traceback
        _answer(answers, ("error", traceback.format_exc()))


def _answer(answers: BinaryIO, message: tuple[str, object]) -> None:
    pickle.dump(message, answers)
    answers.flush()


def main() -> None:
    """`python -m gfa_peft.bench.worker`: commands on stdin, answers on stdout, all else on stderr."""
    # Answers keep the original stdout; whatever a library prints goes to stderr, the worker's log.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers)


class WorkerHandle:
    """The parent's end of one worker process: start it, send commands, receive answers (`WorkerError` on failure).

    The worker is a fresh interpreter (`python -m`), not a fork: it inherits no model, threads or state of the
    parent, and no `if __name__ == "__main__"` guard is needed in the caller's script.
    """

    def __init__(self, spec: WorkerSpec, log_path: Path):
        self.spec = spec
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                env={**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)},
            )
        self._send(spec)

    def ask(self, command: str) -> dict:
        self._send(command)
        return self.receive(command)

    def receive(self, expected: str) -> dict:
        try:
            kind, payload = pickle.load(self._process.stdout)
        except EOFError:
            code = self._process.wait(timeout=30)
            raise WorkerError(
                f"{self._describe()} exited (code {code}) without answering {expected!r}; "
                f"end of its log:\n{self._log_tail()}"
            ) from None
        if kind == "error":
            raise WorkerError(f"{self._describe()} failed:\n{payload}end of its log:\n{self._log_tail()}")
        return payload

    def stop(self) -> None:
        """End the worker: politely if it is listening, by force if it does not end in time."""
        try:
            self._send("stop")
            self._process.stdin.close()
            self._process.wait(timeout=30)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()

    def _send(self, message: object) -> None:
        try:
            pickle.dump(message, self._process.stdin)
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: `receive` reports it with its log

    def _describe(self) -> str:
        spec = self.spec
        return f"bench worker {spec.method} r={spec.rank} on {spec.shapes.name}/{spec.scope}"

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


if __name__ == "__main__":
    main()
