"""Training-speed helpers that `train.py` switches on through `TrainConfig` (see `bench.py` for the figures).

Two things TRL 1.16 + transformers 5.23 do slowly outside CUDA, each replaced here through a public hook:

* `sdpa_packed`: attention for padding-free packed batches. transformers turns restarted `position_ids`
  into one dense (tokens x tokens) block-diagonal mask, so sdpa computes every document against every
  other one and throws most of it away (at 4 x 768 packed tokens that is as many FLOPs as the rest of the
  model). This runs sdpa once per document with `is_causal` instead, using the `cu_seq_lens_q` boundaries
  TRL's collator already computes. Registered with `AttentionInterface`, transformers' own extension point.
* `add_compact_lm_head`: the loss. TRL's fused LM head scores *every* position on non-Triton devices,
  in (4096 x 32768) fp32 tiles that it folds with ~10 elementwise passes, and recomputes every tile in
  backward; with Gemma's 262k vocabulary that is the larger part of a CPU step and gigabytes of RSS.
  This head keeps TRL's contract (`model(..., fused_lm_head=True)` returns a `FusedCausalLMOutput`) but
  scores only the positions in the loss and computes d(log p)/d(hidden) in the forward pass, a few
  hundred tokens at a time over the whole vocabulary (the Liger kernel's trick): 4 instead of 6 LM-head
  matmul FLOPs per token, and one (chunk x vocab) block alive at a time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
import types

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "sdpa_packed"


# --------------------------------------------------------------------------- device


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): then bf16 beats fp32 ~2.5x."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; without them, assume emulated bf16
        return False


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def idle_cpus(window: float = 0.5) -> float | None:
    """How many of this process's CPUs were idle over `window` seconds (Linux /proc/stat), or None."""
    cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}

    def sample() -> dict[str, tuple[int, int]]:
        with open("/proc/stat") as handle:
            rows = [line.split() for line in handle if line.startswith("cpu")]
        return {r[0]: (int(r[4]) + int(r[5]), sum(int(x) for x in r[1:])) for r in rows if r[0] in cpus}

    try:
        before = sample()
        time.sleep(window)
        after = sample()
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        idle += (idle_after - idle_before) / max(1, total_after - total_before)
    return idle


def resolve_threads(threads: int) -> int:
    """`train.threads`: a positive count is used as is; 0 means one per CPU that is idle right now.

    On a CPU shared with other jobs, more intra-op threads than free cores is much slower than fewer:
    each parallel op waits at a barrier for its descheduled threads (2 threads ran at 40% of the speed
    of 1 on the 2-core machine at load average 6). On CUDA the count is left to torch.
    """
    if threads > 0:
        return threads
    if torch.cuda.is_available():
        return torch.get_num_threads()
    idle = idle_cpus()
    if idle is None:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), round(idle)))


# --------------------------------------------------------------------------- attention


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window=None, softcap=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """sdpa per packed document: (1, heads, tokens, dim) -> (1, tokens, heads, dim), as transformers expects.

    Without document boundaries (generation, padded batches) it is plain sdpa with the model's mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] and softcap is None
              and (cu_seq_lens_k is None or torch.equal(cu_seq_lens_k, cu_seq_lens_q)))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and query.device.type != "cpu":
        # enable_gqa would send CUDA sdpa to the math kernel; repeat instead (cheap next to attention itself).
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        groups = 1
    bounds = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        mask = None
        if sliding_window is not None and end - start > sliding_window:
            # transformers' sliding window: a query sees the `sliding_window` most recent keys, itself included.
            i = torch.arange(end - start, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
        outputs.append(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None,
            enable_gqa=groups > 1))
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    if output.shape[2] < query.shape[2]:  # trailing padding (pad_to_multiple_of) past the last document
        output = F.pad(output, (0, 0, 0, query.shape[2] - output.shape[2]))
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def register_packed_attention() -> str:
    """Make `attn_implementation="sdpa_packed"` available; its masks (padded batches) are sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


# --------------------------------------------------------------------------- loss


class CompactLinearCrossEntropy(torch.autograd.Function):
    """log p(target) of `hidden @ weight.T` for N loss positions, never holding more than (chunk x vocab) logits.

    Returns (log_probs, entropy, is_top1), each of shape (N,); only log_probs has a gradient. The LM head is
    frozen under LoRA except for `row_values`: the rows `row_index` of `weight` that PEFT trains in place
    (`trainable_token_indices`, e.g. a base model's unseen end-of-turn token, tied to the embedding). The
    gradients d log p / d hidden and d log p / d logits[:, row_index] are computed in forward, so backward is
    two small multiplies. Logits are accumulated in fp32 whatever the compute dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk, row_index=None, row_values=None):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, min(chunk, n))
        log_probs = torch.empty(n, device=hidden.device, dtype=torch.float32)
        entropy = torch.empty_like(log_probs)
        is_top1 = torch.empty(n, device=hidden.device, dtype=torch.bool)
        d_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32)
        w = weight.to(dtype)
        if row_values is not None:
            w = w.index_copy(0, row_index, row_values.to(dtype))
            d_rows = torch.empty((n, len(row_index)), device=hidden.device, dtype=torch.float32)
        # Three (chunk x vocab) buffers, reused by every chunk: fresh multi-hundred-MB tensors would cost a page
        # fault per 4 KiB on CPU each time.
        logits = torch.empty((chunk, vocab), device=hidden.device, dtype=dtype)
        z_buf = logits if dtype == torch.float32 else torch.empty((chunk, vocab), device=hidden.device)
        e_buf = torch.empty((chunk, vocab), device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                rows = end - start
                target = targets[start:end, None]
                zl, z, e = logits[:rows], z_buf[:rows], e_buf[:rows]
                torch.mm(hidden[start:end].to(dtype), w.t(), out=zl)
                if z is not zl:
                    z.copy_(zl)  # logits in fp32 from here on
                if softcap is not None:
                    tanh = torch.tanh(z / softcap)
                    torch.mul(tanh, softcap, out=z)
                top = z.amax(-1, keepdim=True)
                target_z = z.gather(1, target)
                is_top1[start:end] = (target_z >= top).squeeze(1)
                z -= top
                torch.exp(z, out=e)
                total = e.sum(-1, keepdim=True)
                # H = log(sum e) - sum(e * z) / sum(e), with z shifted by its max; the row dot products as one bmm
                e_dot_z = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(rows, 1)
                entropy[start:end] = (total.log() - e_dot_z / total).squeeze(1)
                log_probs[start:end] = (target_z - top - total.log()).squeeze(1)
                e /= total  # softmax p; d log p_target / dz = onehot - p
                e.scatter_add_(1, target, torch.full_like(target_z, -1.0))  # p - onehot
                if softcap is not None:
                    e *= 1 - tanh * tanh
                if row_values is not None:
                    d_rows[start:end] = e[:, row_index].neg()
                grad_logits = e if dtype == torch.float32 else zl.copy_(e)
                d_hidden[start:end] = torch.mm(grad_logits, w).float().neg_()
        if row_values is None:
            ctx.save_for_backward(d_hidden)
        else:
            ctx.save_for_backward(d_hidden, d_rows, hidden)
        ctx.dtypes = hidden.dtype, None if row_values is None else row_values.dtype
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        hidden_dtype, rows_dtype = ctx.dtypes
        d_hidden, *rows = ctx.saved_tensors
        if grad_log_probs is None:
            return None, None, None, None, None, None, None
        grad_hidden = (d_hidden * grad_log_probs[:, None]).to(hidden_dtype)
        grad_rows = None
        if rows:  # d log p / d w_j = d log p / d z_j * hidden, summed over positions
            d_rows, hidden = rows
            grad_rows = torch.mm((d_rows * grad_log_probs[:, None]).t(), hidden.float()).to(rows_dtype)
        return grad_hidden, None, None, None, None, None, grad_rows


# Logits alive at once in the compact head: chunk x vocab ~ 2**25 (128 tokens for Gemma's 262k vocabulary).
# Three such fp32/bf16 buffers are ~300 MB; on the 2-core CPU 64-512 tokens per chunk ran within noise.
LOGITS_PER_CHUNK = 2**25


def head_parts(head) -> tuple | None:
    """(frozen weight, trained row indices, their values) of an LM head; None if the whole head trains.

    A head wrapped by PEFT's `trainable_token_indices` (directly or tied to the embedding) is its frozen
    weight with a few rows replaced: reading `.weight` through the wrapper would copy the whole matrix.
    """
    tokens = getattr(head, "token_adapter", None)
    frozen = (head if tokens is None else tokens.get_base_layer()).weight
    if frozen.requires_grad:
        return None
    active = [] if tokens is None else [name for name in tokens.active_adapters if name in tokens.token_indices]
    if not active or tokens.merged or tokens.disable_adapters:
        return frozen, None, None
    if len(active) > 1:
        return None
    index = torch.tensor(tokens.token_indices[active[0]], device=frozen.device)
    return frozen, index, tokens.trainable_tokens_delta[active[0]]


def add_compact_lm_head(model, chunk: int | None = None) -> bool:
    """Replace TRL's fused LM head on `model` (after `SFTTrainer` added it) with the compact one above.

    Keeps TRL's calling convention, so `SFTTrainer.compute_loss` and its entropy / token-accuracy metrics
    are unchanged. Returns False, leaving TRL's head, for what this head does not cover: logit scales,
    an LM-head bias, a wholly trainable LM head, MoE router losses, pre-shifted labels.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    head = model.get_output_embeddings()
    scaled = any(getattr(text_config, name, None) is not None
                 for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    parts = None if head is None else head_parts(head)
    if (scaled or parts is None or getattr(head, "bias", None) is not None
            or getattr(text_config, "output_router_logits", False)):
        return False
    softcap = getattr(text_config, "final_logit_softcapping", None)
    chunk = chunk or max(16, LOGITS_PER_CHUNK // parts[0].shape[0])
    fallback = model.forward  # TRL's fused forward, which handles everything else

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        parts = head_parts(self.get_output_embeddings())
        if not fused_lm_head or labels is None or shift_labels is not None or parts is None:
            return fallback(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        log_probs, entropy, is_top1 = CompactLinearCrossEntropy.apply(
            hidden[mask], parts[0], labels[mask], softcap, chunk, *parts[1:])
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero loss, not an error)
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in (log_probs, entropy, is_top1))
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
