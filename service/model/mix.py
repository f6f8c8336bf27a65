"""The served distribution: the network mixed with the n-gram memory of its training text.

    linear:      P(w | h) = lambda_k * P_memory(w | h) + (1 - lambda_k) * P_network(w | h)
    log-linear:  P(w | h) proportional to P_memory(w | h) ** lambda_k * P_network(w | h) ** (1 - lambda_k)

k is the longest context of h that the memory has seen (0 .. order - 1): where the whole context
occurred in training the memory recalls what followed it, and its weight is high; where little of
it did, the network carries the answer. The weights, one per k, are fitted at export by EM on the
validation lines, and export keeps the rule that ranks those lines better (training/mix_fit.py);
the manifest stores both. Files from before the choice are linear.

``MixedModel`` is a StepModel, so suggestions, sessions, generation and the batcher use it as they
use the network. Its state is the network's [L, B, S] with one more layer [1, B, S] whose first
``width`` places hold the memory's context (service/model/memory.py):

    state [L + 1, B, S]:  layers 0 .. L-1  the network's
                          layer L          context tokens | zeros
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from service.model.artifact import MIX_RULES
from service.model.memory import NO_TOKEN, MemoryModel
from service.model.steps import ScriptedModel, Step, StepModel, advance_ragged


def served_model(network: ScriptedModel, artifact, ngram: bool = True) -> ScriptedModel | MixedModel:
    """What a model file serves on top of its ``network``: the mix with the file's memory when it has one
    (and ``ngram``), else the network alone. The server, evaluation and benchmarks all build it here."""
    if not ngram or artifact.memory is None:
        return network
    spec = artifact.manifest.memory
    return MixedModel(network, MemoryModel(artifact.memory), spec.weights, spec.rule)


class MixedModel:
    def __init__(self, network: StepModel, memory: MemoryModel, weights: list[float], rule: str = "linear") -> None:
        if len(weights) != memory.memory.order:
            raise ValueError(f"{len(weights)} mixing weights for a memory of order {memory.memory.order}")
        if rule not in MIX_RULES:
            raise ValueError(f"unknown mixing rule {rule!r}; choose one of {', '.join(MIX_RULES)}")
        self.rule = rule
        self.network = network
        self.memory = memory
        self.weights = np.asarray(weights, dtype=np.float32)
        self.vocab_size = network.vocab_size
        self.device = getattr(network, "device", torch.device("cpu"))
        self._size = network.init_state(1).size(2)
        # the linear mix adds probabilities: from a network that gives them (one softmax), no log then exp
        linear = rule == "linear" and getattr(network, "gives_probabilities", False)
        self._network_options = {"probabilities": True} if linear else {}
        self._base = torch.from_numpy(memory.memory.base)  # P(w) with no context [V]
        if self._size < memory.width:
            raise ValueError(f"the network's state ({self._size} values) cannot carry {memory.width} context tokens")

    def init_state(self, batch_size: int) -> Tensor:
        history = torch.zeros(1, batch_size, self._size)
        history[:, :, : self.memory.width] = NO_TOKEN
        return torch.cat([self.network.init_state(batch_size), history])

    def advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        width = self.memory.width
        network_out, network_state = self.network.advance(tokens, state[:-1], **self._network_options)
        contexts = self.memory.read(tokens, state[-1:, :, :width])
        return self._mix(network_out, network_state, contexts)

    def advance_ragged(self, steps: Sequence[Step]) -> list[Step]:
        """Steps of different lengths: the network's in one forward (service/model/steps.py), the memory's at once."""
        width = self.memory.width
        inner = [(tokens, state[:-1]) for tokens, state in steps]
        network = advance_ragged(self.network, inner, **self._network_options)
        contexts = np.concatenate([self.memory.read(tokens, state[-1:, :, :width]) for tokens, state in steps])
        log_probs, states = self._mix(
            torch.cat([out for out, _ in network]), torch.cat([st for _, st in network], dim=1), contexts
        )
        sizes = [tokens.size(0) for tokens, _ in steps]
        return list(zip(log_probs.split(sizes), states.split(sizes, dim=1)))

    def _mix(self, network_out: Tensor, network_state: Tensor, contexts: np.ndarray) -> tuple[Tensor, Tensor]:
        """The served log-probabilities [B, V] and state after the network's output (its probabilities where
        ``_network_options`` asks for them, else its log-probabilities) and the memory's [B, width] contexts."""
        history = torch.zeros(1, contexts.shape[0], self._size)
        history[0, :, : self.memory.width] = torch.from_numpy(contexts.astype(np.float32))
        parts = self.memory.memory.parts(contexts)
        weight = self.weights[parts[-1]]  # [B], by the longest context seen
        if self.rule == "linear":
            probabilities = network_out.float() if self._network_options else network_out.float().exp()
            mixed = self._linear(probabilities, parts, weight)
        else:
            mixed = self._log_linear(network_out.float(), parts, weight)
        return mixed, torch.cat([network_state, history])

    def _linear(self, probabilities: Tensor, parts: tuple, weight: np.ndarray) -> Tensor:
        """log(w * P_memory + (1 - w) * P_network) for each row: the memory's dense part and its sparse
        followers are added straight into the network's weighted probabilities (no [B, V] memory array)."""
        scale, rows, ids, values, _ = parts
        # a new tensor: the network's may be an inference tensor, which cannot change outside inference mode
        mixed = probabilities * torch.from_numpy(1 - weight)[:, None]
        mixed.addcmul_(torch.from_numpy(weight * scale)[:, None], self._base[None, :])
        if len(rows):
            flat = torch.from_numpy(rows * self.vocab_size + ids)
            mixed.view(-1).index_add_(0, flat, torch.from_numpy(values * weight[rows]))
        out = mixed.numpy()  # the logarithm in place, by numpy (faster than torch's on CPU here)
        np.maximum(out, 1e-30, out=out)
        np.log(out, out=out)
        return mixed

    def _log_linear(self, network_log_probs: Tensor, parts: tuple, weight: np.ndarray) -> Tensor:
        """w * log P_memory + (1 - w) * log P_network for each row, normalised over the vocabulary."""
        memory_log_probs = self.memory.memory.dense(*parts[:4]).clamp_min_(1e-30).log_()
        w = torch.from_numpy(weight)[:, None]
        mixed = memory_log_probs.mul_(w).add_(network_log_probs * (1 - w))
        return mixed.sub_(torch.logsumexp(mixed, dim=1, keepdim=True))
