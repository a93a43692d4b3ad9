"""lsr_fused.integrations.transformers against the stock ``transformers.Trainer`` (its
``LabelSmoother`` with ``label_smoothing_factor``, the model's own loss at 0) on tiny GPT-2
(tied embeddings), Llama (untied) and Qwen2 (tied) models built from configs (no hub access):
logged losses, gradients before every optimizer step, gradient accumulation 1 and 2
(``num_items_in_batch``), ``evaluate()``, bf16 autocast, and the peak memory of one step at
V = 50257 (in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LabelSmoother  # noqa: E402

import lsr_fused.integrations.transformers as hf  # noqa: E402
from lsr_fused.integrations.transformers import FusedLossTrainer, patch_causal_lm  # noqa: E402

VOCAB, SEQ, SAMPLES = 101, 12, 8


def tiny_config(kind: str, vocab: int = VOCAB, positions: int = SEQ):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt2":  # GPT-2 ties lm_head to the token embedding
        return GPT2Config(
            n_positions=positions,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    llama_like = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
        **common,
    )
    if kind == "llama":
        return LlamaConfig(tie_word_embeddings=False, **llama_like)
    return Qwen2Config(tie_word_embeddings=True, **llama_like)


def tiny_model(kind: str, dtype=torch.float64, **config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind, **config))
    return model.to(dtype)


def dataset(seed: int = 1, samples: int = SAMPLES):
    """Fixed-length samples whose labelled-token counts differ (so the normalisation matters)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(samples):
        input_ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        labels = input_ids.clone()
        labels[: 1 + 2 * (i % 4)] = -100  # a masked prompt of 1 to 7 tokens
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


class GradRecorder(TrainerCallback):
    """Every gradient the optimizer is about to apply."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        self.steps.append(grads)


def train(trainer_class, kind, tmp_path, *, eps, accumulation, dtype=torch.float64, **extra):
    model = tiny_model(kind, dtype)
    args = TrainingArguments(
        output_dir=str(tmp_path / trainer_class.__name__),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        label_smoothing_factor=eps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )
    recorder = GradRecorder()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(seed=2, samples=4),
        callbacks=[recorder],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, recorder.steps


@pytest.mark.parametrize(
    ("kind", "eps", "accumulation"),
    [("gpt2", eps, ga) for eps in (0.0, 0.1) for ga in (1, 2)]
    + [("llama", 0.1, 2), ("qwen2", 0.1, 2), ("llama", 0.0, 1)],
)
def test_trainer_matches_stock(kind, eps, accumulation, tmp_path):
    stock, stock_losses, stock_grads = train(
        Trainer, kind, tmp_path, eps=eps, accumulation=accumulation
    )
    fused, fused_losses, fused_grads = train(
        FusedLossTrainer, kind, tmp_path, eps=eps, accumulation=accumulation
    )
    assert len(fused_losses) == len(stock_losses) == 2
    # LabelSmoother sums the smoothing term in float32: agreement to float32 rounding.
    torch.testing.assert_close(fused_losses, stock_losses, rtol=1e-6, atol=0)
    assert len(fused_grads) == len(stock_grads) == 2
    for step_fused, step_stock in zip(fused_grads, stock_grads, strict=True):
        assert step_fused.keys() == step_stock.keys()
        for name, grad in step_stock.items():
            # At eps 0 the model's own loss runs on float32 logits: float32 rounding.
            atol = 1e-5 * float(grad.abs().max())
            torch.testing.assert_close(
                step_fused[name], grad, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )
    stock_eval, fused_eval = stock.evaluate(), fused.evaluate()
    assert fused_eval["eval_loss"] == pytest.approx(stock_eval["eval_loss"], rel=1e-6)


def test_evaluate_with_compute_metrics_raises(tmp_path):
    trainer, _, _ = train(FusedLossTrainer, "gpt2", tmp_path, eps=0.1, accumulation=1)
    trainer.compute_metrics = lambda prediction: {"n": 0}
    with pytest.raises(ValueError, match="prediction_loss_only"):
        trainer.evaluate()


def test_bf16_runs_the_head_under_autocast(tmp_path, monkeypatch):
    seen = []
    original = hf.linear_label_smoothing_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(hf, "linear_label_smoothing_cross_entropy", spy)
    _, stock_losses, _ = train(
        Trainer, "llama", tmp_path, eps=0.1, accumulation=2, dtype=torch.float32, bf16=True
    )
    _, fused_losses, _ = train(
        FusedLossTrainer, "llama", tmp_path, eps=0.1, accumulation=2, dtype=torch.float32, bf16=True
    )
    assert seen and all(state == (True, torch.bfloat16) for state in seen)
    # Both ran their matmuls in bfloat16; HF's loss also smooths bfloat16 logits.
    torch.testing.assert_close(fused_losses, stock_losses, rtol=5e-2, atol=0)


def test_model_init_results_are_patched(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                             per_device_train_batch_size=2, label_smoothing_factor=0.1,
                             save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = FusedLossTrainer(model_init=lambda: tiny_model("gpt2"), args=args,
                               train_dataset=dataset())  # fmt: skip
    trainer.train()
    assert trainer.model._lsr_fused_patch.label_smoothing == 0.1
    assert trainer.label_smoother is None


def test_trainer_refuses_compute_loss_func(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="compute_loss_func"):
        FusedLossTrainer(
            model=tiny_model("gpt2"),
            args=args,
            compute_loss_func=lambda outputs, labels, num_items_in_batch: 0,
        )


# ---------------------------------------------------------------------------------------------
# patch_causal_lm on its own: a custom loop.


def _batch():
    rows = dataset(seed=3, samples=3)
    return torch.stack([r["input_ids"] for r in rows]), torch.stack([r["labels"] for r in rows])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("num_items", [None, 17])
def test_patched_loss_and_gradients_match_label_smoother(kind, num_items):
    input_ids, labels = _batch()
    stock = tiny_model(kind)
    expected = LabelSmoother(0.1)(
        stock(input_ids), labels, shift_labels=True, num_items_in_batch=num_items
    )
    expected.backward()
    fused = patch_causal_lm(tiny_model(kind), 0.1)
    if kind != "llama":
        assert fused.get_output_embeddings().weight is fused.get_input_embeddings().weight
    out = fused(input_ids, labels=labels, num_items_in_batch=num_items)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.to(out.loss.dtype), rtol=1e-6, atol=0)
    stock_grads = dict(stock.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, stock_grads[name].grad, rtol=1e-5, atol=1e-9)


def test_patched_model_calling_conventions():
    input_ids, labels = _batch()
    model = tiny_model("gpt2")
    logits = model(input_ids).logits
    patch_causal_lm(model, 0.0)
    torch.testing.assert_close(model(input_ids).logits, logits)  # no labels: the original forward
    own = tiny_model("gpt2")(
        input_ids, labels=labels
    ).loss.double()  # the model's own loss at eps 0
    torch.testing.assert_close(model(input_ids, labels=labels).loss, own, rtol=1e-6, atol=0)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(input_ids, shift_labels=shifted).loss, own, rtol=1e-6, atol=0)
    as_tuple = model(input_ids, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], own, rtol=1e-6, atol=0)
    patch_causal_lm(model, 0.1, chunk_size=5)  # patching again replaces the options
    assert model._lsr_fused_patch.label_smoothing == 0.1
    smoothed = LabelSmoother(0.1)(tiny_model("gpt2")(input_ids), labels, shift_labels=True)
    torch.testing.assert_close(model(input_ids, labels=labels).loss, smoothed, rtol=1e-6, atol=0)


def test_patch_refuses_what_it_cannot_compute():
    with pytest.raises(TypeError, match="unsupported loss options"):
        patch_causal_lm(tiny_model("gpt2"), 0.1, reduction="sum")
    with pytest.raises(ValueError, match="spread"):
        patch_causal_lm(tiny_model("gpt2"), 0.1, spread="some")
    with pytest.raises(TypeError, match="causal LM"):
        patch_causal_lm(torch.nn.Linear(2, 2), 0.1)
    gemma2 = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=30.0,
    )
    model = transformers.AutoModelForCausalLM.from_config(gemma2)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        patch_causal_lm(model, 0.1)


# ---------------------------------------------------------------------------------------------
# Peak memory of one Trainer step at GPT-2's vocabulary, each trainer in a fresh process.

MEMORY_VOCAB, MEMORY_BATCH, MEMORY_SEQ = 50257, 4, 384


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _one_step_peak(mode: str, out_dir: str) -> dict:
    """Peak resident memory above the pre-step level during one training step (VmHWM, reset
    through /proc/self/clear_refs just before it)."""
    torch.set_num_threads(1)
    model = tiny_model("gpt2", torch.float32, vocab=MEMORY_VOCAB, positions=MEMORY_SEQ)
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, MEMORY_VOCAB, (MEMORY_BATCH, MEMORY_SEQ), generator=gen)
    ]
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=MEMORY_BATCH,
        max_steps=1,
        label_smoothing_factor=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = (FusedLossTrainer if mode == "fused" else Trainer)(
        model=model, args=args, train_dataset=data
    )
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = _proc_status_bytes("VmRSS")
    trainer.train()
    return {"peak_extra": _proc_status_bytes("VmHWM") - before}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_one_step_peak_memory_is_at_most_a_third_of_stock(tmp_path):
    peaks = {}
    for mode in ("stock", "fused"):
        done = subprocess.run(
            [sys.executable, __file__, mode, str(tmp_path / mode)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak_extra"]
    logits = MEMORY_BATCH * MEMORY_SEQ * MEMORY_VOCAB * 4
    assert peaks["stock"] > 2 * logits, peaks  # the stock step holds several logits-sized tensors
    assert peaks["fused"] <= peaks["stock"] / 3, peaks


if __name__ == "__main__":
    print(json.dumps(_one_step_peak(sys.argv[1], sys.argv[2])))
