"""One steered rollout per GRPO/DAPO group, as an explicit rare negative (Qwen-Scope report section 8).

For each prompt the policy samples ``G - 1`` rollouts normally and one more with the repetition
features amplified (``h <- h + alpha * d`` at every generation step). The steered rollout is expected
to degenerate into repetition and so to score low, which hands the group a negative example that
plain sampling rarely produces; the loss and the reward stay unchanged. The report does not give
``alpha``, the layers, the feature set or ``G``.

Everything goes through :meth:`Backend.generate` with :class:`~qscope_plugins.backends.Intervention`
objects (build them with :func:`qscope_plugins.recipes.steering.additive`). Layouts:

* :func:`rollout_groups`: one :class:`RolloutGroup` per prompt (for hand-written training loops);
* :func:`grouped_rollouts`: a flat prompt list laid out as GRPO trainers lay out a generation batch
  (each prompt repeated ``G`` times in a row), the last of every ``G`` steered;
* :func:`trl_rollout_func`: a ``rollout_func`` for TRL's ``GRPOTrainer`` (see docs/training_signals.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..backends import Backend, Generation, Intervention, Prompts, Sampling, as_backend

SAMPLED = Sampling(do_sample=True)


@dataclass
class RolloutGroup:
    """The ``G`` rollouts of one prompt; ``steered[i]`` says which one was feature-amplified (the last)."""

    prompt: str | list[int]
    completions: list[Generation]
    steered: list[bool]


def steered_mask(n: int, group_size: int, offset: int = 0) -> list[bool]:
    """Which of ``n`` consecutive rollouts, the first at global index ``offset``, close their group of ``group_size``.

    A generation batch split across processes can cut a group in two; counting from the global
    index keeps exactly one steered rollout per group whatever the split.
    """
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 rollouts (one normal, one steered), got {group_size}")
    if n < 0 or offset < 0:
        raise ValueError("n and offset must be >= 0")
    return [(offset + i) % group_size == group_size - 1 for i in range(n)]


def _as_list(steering: Intervention | Sequence[Intervention]) -> list[Intervention]:
    steering = [steering] if isinstance(steering, Intervention) else list(steering)
    if not steering:
        raise ValueError("no steering interventions given: the steered rollout would be a normal one")
    return steering


def grouped_rollouts(
    backend: Backend,
    prompts: Prompts,
    steering: Intervention | Sequence[Intervention],
    *,
    group_size: int,
    max_new_tokens: int,
    offset: int = 0,
    sampling: Sampling = SAMPLED,
    batch_size: int = 8,
) -> tuple[list[Generation], list[bool]]:
    """One completion per entry of ``prompts`` (each prompt repeated ``group_size`` times in a row).

    Entries at global index ``offset + i`` with ``(offset + i) % group_size == group_size - 1`` are
    generated with ``steering``; the others normally. Returns the completions in input order and
    the steered mask.
    """
    steering = _as_list(steering)
    mask = steered_mask(len(prompts), group_size, offset)
    out: list[Generation | None] = [None] * len(prompts)
    for flag, interventions in ((False, []), (True, steering)):
        index = [i for i, m in enumerate(mask) if m == flag]
        if not index:
            continue
        generations = backend.generate([prompts[i] for i in index], max_new_tokens=max_new_tokens,
                                       interventions=interventions, sampling=sampling, batch_size=batch_size)
        for i, generation in zip(index, generations):
            out[i] = generation
    return out, mask


def rollout_groups(
    backend: Backend,
    prompts: Prompts,
    steering: Intervention | Sequence[Intervention],
    *,
    group_size: int,
    max_new_tokens: int,
    sampling: Sampling = SAMPLED,
    batch_size: int = 8,
) -> list[RolloutGroup]:
    """``group_size - 1`` normal rollouts and one steered rollout (last) for each prompt."""
    repeated = [p for p in prompts for _ in range(group_size)]
    completions, mask = grouped_rollouts(backend, repeated, steering, group_size=group_size,
                                         max_new_tokens=max_new_tokens, sampling=sampling, batch_size=batch_size)
    return [RolloutGroup(p, completions[i * group_size : (i + 1) * group_size], mask[i * group_size : (i + 1) * group_size])
            for i, p in enumerate(prompts)]


def trl_rollout_func(
    steering: Intervention | Sequence[Intervention],
    *,
    max_new_tokens: int | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 8,
) -> Callable[[list, object], dict]:
    """A ``rollout_func(prompts, trainer)`` for TRL's ``GRPOTrainer`` (TRL 1.x, experimental there).

    TRL calls it with this process's slice of the generation batch (each prompt ``num_generations``
    times in a row, plain text or chat messages) and the trainer. It returns ``prompt_ids``,
    ``completion_ids``, ``logprobs=None`` (TRL then skips its sampling-log-prob correction) and a
    ``steered`` list that TRL forwards to the reward functions. Generation runs on the trainer's
    own model through the backend :func:`~qscope_plugins.backends.as_backend` picks for it (an HF
    model: :class:`~qscope_plugins.backends.hf.HFBackend`); defaults come from the
    trainer's ``max_completion_length``, ``temperature``, ``top_k`` and ``top_p``.
    """
    steering = _as_list(steering)

    def rollout(prompts: list, trainer) -> dict:
        args, tokenizer = trainer.args, trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        texts = [p if isinstance(p, str) else
                 tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        was_training = model.training
        try:
            completions, mask = grouped_rollouts(
                as_backend(model, tokenizer), texts, steering, group_size=args.num_generations,
                max_new_tokens=max_new_tokens or args.max_completion_length,
                offset=trainer.accelerator.process_index * len(prompts),
                sampling=sampling or Sampling(True, args.temperature, args.top_k, args.top_p),
                batch_size=batch_size,
            )
        finally:
            model.train(was_training)
        return {"prompt_ids": [g.prompt_ids for g in completions], "completion_ids": [g.token_ids for g in completions],
                "logprobs": None, "steered": mask}

    return rollout
