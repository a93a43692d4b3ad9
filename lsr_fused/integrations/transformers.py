"""Hugging Face ``transformers``: causal LMs trained through the fused head, never holding the
``(B, T, V)`` logits.

* :func:`patch_causal_lm` makes ``model(input_ids, labels=labels, ...)`` return HF's causal-LM
  loss (token ``t`` predicts ``labels[t + 1]``; ``-100`` ignored), label-smoothed, computed by
  :func:`lsr_fused.linear_label_smoothing_cross_entropy` from the base model's last hidden
  state and the output embedding's weight. Without labels the model is untouched.
* :class:`FusedLossTrainer` is a ``transformers.Trainer`` that patches its model so, with
  ``label_smoothing_factor`` (or 0).

Why the model's own forward is patched instead of overriding ``Trainer.compute_loss``: the
Trainer then runs its stock path for a model that returns its loss (the path of
``label_smoothing_factor=0``). Every convention of that path stays the Trainer's own: the
``num_items_in_batch`` normalisation and its gradient-accumulation scaling,
``average_tokens_across_devices``, the DDP/FSDP wrappers and accelerate's autocast (which wraps
``model.forward``, so a loss computed inside it runs in the mixed-precision dtype), and
``evaluate()``'s ``eval_loss``.

Supported: models whose ``lm_head`` (``get_output_embeddings()``, an ``nn.Linear``, tied or not)
is applied to ``base_model``'s last hidden state with nothing in between (GPT-2, Llama, Qwen2,
Mistral, Gemma 1, ...). Models that transform the logits (Gemma 2's final-logit softcap,
Cohere's ``logit_scale``, Granite's ``logits_scaling``) are refused with a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..linear import linear_label_smoothing_cross_entropy
from ..policy import check_options

__all__ = ["FusedLossTrainer", "causal_lm_loss", "patch_causal_lm"]

# Config attributes with which a model transforms its logits between the head and the loss, and
# the value that leaves them unchanged: the fused head cannot apply these transforms.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
# Options of linear_label_smoothing_cross_entropy that patch_causal_lm passes on. `reduction`
# and `class_weight` are not among them: HF's normalisation (by num_items_in_batch, else by the
# count of labelled tokens) decides the reduction.
_LOSS_OPTIONS = ("ignore_index", "spread", "z_loss", "chunk_size", "backend")
# Keyword arguments of a causal LM's forward that belong to the loss, not to the base model.
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict")


def causal_lm_loss(
    hidden: Tensor,
    head: nn.Linear,
    labels: Optional[Tensor],
    label_smoothing: float = 0.0,
    *,
    num_items_in_batch: Optional[Union[Tensor, int]] = None,
    shift_labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    **loss_options: Any,
) -> Tensor:
    """HF's causal-LM loss of ``head(hidden)``, label-smoothed (PyTorch's ``"all"`` spread, as
    ``transformers.trainer_pt_utils.LabelSmoother``), without the logits.

    ``hidden`` ``(B, T, H)``, ``labels`` ``(B, T)`` (position ``t`` is scored against
    ``labels[:, t + 1]``; the last position and ``ignore_index`` labels count for nothing), or
    ``shift_labels`` ``(B, T)`` already aligned with ``hidden``. The per-token losses are summed
    and divided by ``num_items_in_batch`` when given (the Trainer's count of labelled tokens over
    the accumulated batch), else by this batch's labelled-token count. Float32 result.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_label_smoothing_cross_entropy(
        hidden, head.weight, shift_labels, label_smoothing, bias=head.bias,
        ignore_index=ignore_index, reduction=reduction, **loss_options,
    )  # fmt: skip
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


@dataclasses.dataclass
class _Patch:
    original_forward: Any
    signature: inspect.Signature
    label_smoothing: float
    loss_options: dict


def _split_arguments(patch: _Patch, args, kwargs) -> tuple[dict, dict]:
    """(the base model's keyword arguments, the loss's), from a call of the LM's forward."""
    bound = patch.signature.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, parameter in patch.signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    loss_arguments = {name: arguments.pop(name) for name in _LOSS_KWARGS if name in arguments}
    return arguments, loss_arguments


def _fused_forward(self, *args, **kwargs):
    """A causal LM's forward: with labels, the fused loss and ``logits=None``; else the original."""
    patch: _Patch = self._lsr_fused_patch
    base_arguments, loss_arguments = _split_arguments(patch, args, kwargs)
    labels, shift_labels = loss_arguments.get("labels"), loss_arguments.get("shift_labels")
    if labels is None and shift_labels is None:
        return patch.original_forward(*args, **kwargs)
    base_outputs = self.base_model(**base_arguments)
    loss = causal_lm_loss(
        base_outputs[0], self.get_output_embeddings(), labels, patch.label_smoothing,
        num_items_in_batch=loss_arguments.get("num_items_in_batch"), shift_labels=shift_labels,
        **patch.loss_options,
    )  # fmt: skip
    fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    # A ModelOutput, or a tuple when the config asks for tuples (only its first item is named).
    items = base_outputs.items() if hasattr(base_outputs, "items") else ()
    passed_on = {k: v for k, v in items if k in fields and k != "logits"}
    outputs = CausalLMOutputWithPast(loss=loss, logits=None, **passed_on)
    return outputs if loss_arguments.get("return_dict", True) is not False else outputs.to_tuple()


def _check_patchable(model: nn.Module, label_smoothing: float, loss_options: dict) -> None:
    unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(
            f"patch_causal_lm got unsupported loss options {unknown}; supported: "
            f"{list(_LOSS_OPTIONS)} (the reduction follows HF's token-count normalisation)"
        )
    check_options(
        label_smoothing, loss_options.get("ignore_index", -100), "mean",
        loss_options.get("spread", "all"), loss_options.get("z_loss", 0.0),
        loss_options.get("backend", "auto"),
    )  # fmt: skip
    if not callable(getattr(model, "get_output_embeddings", None)) or not hasattr(
        model, "base_model"
    ):
        raise TypeError(
            f"model must be a transformers causal LM (a PreTrainedModel with an lm_head), "
            f"got {type(model).__name__}"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or model.base_model is model:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear output embedding over a base model "
            f"(get_output_embeddings() returned {type(head).__name__})"
        )
    config = getattr(model, "config", None)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value != neutral:
            raise ValueError(
                f"{type(model).__name__} transforms its logits (config.{name}={value!r}), which "
                "the fused head does not apply; train it with its own loss"
            )


def patch_causal_lm(model: nn.Module, label_smoothing: float = 0.1, **loss_options: Any):
    """Make a transformers causal LM compute its loss with the fused head; returns ``model``.

    Afterwards ``model(input_ids, labels=labels, ...)`` (and ``shift_labels=``,
    ``num_items_in_batch=``) returns ``loss`` = HF's causal-LM loss smoothed by
    ``label_smoothing`` (what ``Trainer`` with ``label_smoothing_factor`` computes through
    ``LabelSmoother``, and at 0 what the model itself computes) and ``logits=None``: the
    ``(B, T, V)`` logits are never formed. Calls without labels (``generate()``, inference) run
    the original forward. Tied input/output embeddings get both gradients.

    ``loss_options``: ``ignore_index`` (default -100), ``spread``, ``z_loss``, ``chunk_size``,
    ``backend`` of :func:`lsr_fused.linear_label_smoothing_cross_entropy`. Patch before
    ``accelerator.prepare``/DDP wrapping (the Trainer does), so that their wrappers, autocast
    included, run around the patched forward. Patching again replaces the options.
    """
    _check_patchable(model, label_smoothing, loss_options)
    previous = model.__dict__.get("_lsr_fused_patch")
    original = previous.original_forward if previous is not None else model.forward
    signature = inspect.signature(original)
    model._lsr_fused_patch = _Patch(original, signature, float(label_smoothing), dict(loss_options))
    model.forward = types.MethodType(_forward_with_signature(signature), model)
    return model


def _forward_with_signature(signature: inspect.Signature):
    """``_fused_forward`` advertising the original forward's parameters: the Trainer keeps only
    the dataset columns that ``inspect.signature(model.forward)`` names."""

    def forward(self, *args, **kwargs):
        """The model's forward with its loss through the fused head (see ``patch_causal_lm``)."""
        return _fused_forward(self, *args, **kwargs)

    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = [self_parameter, *signature.parameters.values()]
    forward.__signature__ = signature.replace(parameters=parameters)
    return forward


class FusedLossTrainer(Trainer):
    """``transformers.Trainer`` for causal LMs whose loss goes through the fused head: the same
    losses (``label_smoothing_factor`` or 0, gradient accumulation, ``num_items_in_batch``),
    mixed precision and ``eval_loss`` as the stock Trainer, without the ``(B, T, V)`` logits.

    ``FusedLossTrainer(model, args, ..., loss_options=None)``: the Trainer's arguments, plus
    ``loss_options`` for :func:`patch_causal_lm`. The model (or every ``model_init()`` result)
    is patched with ``args.label_smoothing_factor``, and the Trainer's ``LabelSmoother`` (which
    would take ``log_softmax`` of the full logits) is switched off. ``compute_loss_func`` is
    refused. Evaluation yields losses only: ``compute_metrics`` on logits needs the logits.
    """

    def __init__(self, *args: Any, loss_options: Optional[dict] = None, **kwargs: Any) -> None:
        self._lsr_fused_loss_options = dict(loss_options or {})
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is not None:
            raise ValueError(
                "FusedLossTrainer computes the loss itself: compute_loss_func must be None"
            )
        if self.model is not None:
            self._patch(self.model)
        # The patched model returns the smoothed loss from its labels; the stock label smoother
        # would pop them and smooth the full logits instead.
        self.label_smoother = None

    def _patch(self, model):
        eps = self.args.label_smoothing_factor
        return patch_causal_lm(model, eps, **self._lsr_fused_loss_options)

    def call_model_init(self, trial=None):
        return self._patch(super().call_model_init(trial))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not (prediction_loss_only or self.args.prediction_loss_only):
            raise ValueError(
                "FusedLossTrainer never forms the logits, so it evaluates losses only: pass "
                "prediction_loss_only=True (and no compute_metrics), or evaluate with "
                "transformers.Trainer"
            )
        return super().prediction_step(model, inputs, True, ignore_keys=ignore_keys)
