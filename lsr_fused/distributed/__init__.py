"""Vocabulary-parallel label-smoothed cross-entropy: the class dimension sharded over a group.

With tensor parallelism the output layer is often split along the classes: rank ``k`` of a
``torch.distributed`` group holds logits for its contiguous slice ``[offset_k, offset_k + C_k)`` of
the ``C = sum_k C_k`` classes (slices may be uneven, empty included; they are ordered by rank in
the group). :func:`sharded_label_smoothing_cross_entropy` (reached through
``label_smoothing_cross_entropy(..., process_group=pg)`` or ``LabelSmoothingCE(...,
process_group=pg)``) returns exactly the loss of the unsharded logits on every rank, and each rank
receives the gradient of its own slice. The smoothing masses use the *global* class count, so
``spread="all"`` and ``spread="others"`` both match the single-device result.

Per row, with the math of :mod:`lsr_fused.backends` (``b = other_mass``, ``a - b = target_extra``)
and ``r_k`` rank ``k``'s reference for the row, by the rule of :mod:`lsr_fused.backends` applied to
its slice: the slice's first logit where finite and at most 64 below ``m_k``, else ``m_k`` where
finite, else 0 (0 for an empty slice)::

    rank k, one fused pass over its slice (Triton kernel or chunked torch):
        m_k   = max_c x_c           s_k = sum_c exp(x_c - m_k)      t_k = sum_c w_c (x_c - r_k)
        xy_k  = x_y - r_k if y is in the slice else 0    wy_k = w_y likewise (1 without weights)
    all_reduce(MAX):  M = max_k m_k                                   (N values)
    every rank:       s_k *= exp(m_k - M),  t_k += (r_k - M) W_k,  xy_k += r_k - M (y's slice)
    all_reduce(SUM):  sum_k s_k, sum_k t_k, sum_k xy_k, sum_k wy_k, and once
                      W = sum_k W_k  (W_k = sum(w_k), or C_k)         (4 N + 1 values)
    every rank:       lse - M = log(sum_k s_k), S = b W + (a - b) w_y,
                      loss = S (lse - M) - b t - (a - b) w_y (x_y - M) + z lse^2

Every sum is relative to a logit of the same row, so a large offset shared by all logits cancels
in ``r_k - M`` (two nearby numbers) rather than between sums of size ``C * offset``; an all-equal
row of 1e30 gives ``S log(C)``; a first class masked with a large finite value (-1e9) does not
become the reference, so it cannot shift the others' ``x - r_k`` by 1e9. Backward needs no
communication: every rank holds the per-row ``lse - r_k``, ``r_k``, ``S`` and ``w_y`` and writes
its slice in one pass,
``g (softmax_i (S + 2 z lse) - b w_i - (a - b) w_y [i == y - offset])`` with
``softmax_i = exp((x_i - r_k) - (lse - r_k))``.
The logits are never gathered: the collectives carry O(N) statistics only.

Before any of that, each call all-gathers a small description of every rank's arguments (shard
width, target shape, dtype, options, and on the CPU the target range and a checksum of the
targets). Ranks that disagree, or a rank whose arguments are invalid, make *every* rank raise the
same ``ValueError`` instead of leaving the others blocked in a collective. On groups that carry CPU
tensors (gloo, or torch's default ``"cpu:gloo,cuda:nccl"`` pair) this exchange is host-only and
costs no device synchronisation; on an NCCL-only group it goes through the device and costs one
small device-to-host copy per call (initialise the group with both backends to avoid it).

The shard sizes (hence ``C`` and this rank's offset) come out of that same exchange, on every call,
so no cache can go stale when shapes change between calls.

Backends: ``"triton"`` runs the kernels of :mod:`lsr_fused.backends.triton_sharded` (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``); ``"torch"`` is a chunked composite whose temporaries are
bounded by a fixed number of elements, whatever the size of the logits. ``"auto"`` picks Triton on
CUDA and the torch composite elsewhere; ``"cpp"`` maps to the torch composite (the C++ extension
has no sharded kernels).

Modules: :mod:`.agreement` (the exchange), :mod:`.shard_math` (combining the shard statistics),
:mod:`.loss` (the entry point and its autograd function).
"""

from .loss import sharded_label_smoothing_cross_entropy

__all__ = ["sharded_label_smoothing_cross_entropy"]
