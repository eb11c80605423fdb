"""Jamba in plain PyTorch, sliceable into pipeline stages.

A `JambaStage` owns the contiguous layers [start, end) of the model, plus the token embedding
if it is the first stage and the final norm and head if it is the last. Parameter names are the
global Hugging Face names (`model.layers.37.mamba.A_log`), so one checkpoint serves any split.

Activations are *packed*: a forward call carries B rows (sequences) of different lengths as one
(T, hidden) tensor, T = total new tokens, with a `ForwardBatch` telling which tokens belong to
which row and cache slot. Prefill chunks and decode steps of different sequences go together.

Numerics follow transformers' `JambaForCausalLM`: RMSNorm in float32, softmax router in float32
with the top-k weights not renormalised, Mamba's scan state in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import DecodeBatch, ForwardBatch, HybridCache
from .config import JambaConfig
from .kernels import causal_conv1d_varlen, selective_scan_varlen
from .kernels.reference import causal_conv1d_update_ref, selective_state_update_ref
from .linear import linear
from .ops import moe_experts, paged_decode_attention


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (stages.quant.Int8Linear has the same method)."""
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention with no positional embedding (Jamba's Mamba layers carry position)."""

    def __init__(self, c: JambaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: HybridCache, b: ForwardBatch | DecodeBatch) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(T, self.n_kv, self.head_dim)
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]  # (num_blocks, block_size, n_kv, hd)
        k_cache[b.token_block, b.token_offset] = k.to(k_cache.dtype)
        v_cache[b.token_block, b.token_offset] = v.to(v_cache.dtype)

        if isinstance(b, DecodeBatch):  # one query per row against its whole prefix
            out = paged_decode_attention(q, k_cache, v_cache, b.block_tables, b.positions)
        elif b.all_decode:
            out = paged_decode_attention(q, k_cache, v_cache, b.block_tables, b.token_pos)
        else:
            # Prefill chunks differ in length; attend row by row (few attention layers, long rows).
            out = torch.empty_like(q)  # (T, n_heads, hd)
            bs = cache.block_size
            for row, (n, start) in enumerate(zip(b.seq_lens_list, b.start_pos_list)):
                lo, L = int(b.cu_seqlens[row]), start + n
                blocks = b.block_tables[row, : -(-L // bs)]
                qr = q[lo : lo + n].transpose(0, 1)[None]  # (1, n_heads, n, hd)
                kr = k_cache[blocks].flatten(0, 1)[:L].transpose(0, 1)[None]  # (1, n_kv, start+n, hd)
                vr = v_cache[blocks].flatten(0, 1)[:L].transpose(0, 1)[None]
                if start == 0:
                    o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
                else:
                    # Query j sits at position start+j and sees keys 0..start+j.
                    mask = torch.arange(L, device=x.device)[None, :] <= (start + torch.arange(n, device=x.device))[:, None]
                    o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, enable_gqa=True)
                out[lo : lo + n] = o[0].transpose(0, 1)
        return self.o_proj(out.reshape(T, -1))


class MambaMixer(nn.Module):
    """Mamba-1 selective SSM with Jamba's extra RMSNorms on dt, B and C."""

    def __init__(self, c: JambaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        d, n, r = c.mamba_d_inner, c.mamba_d_state, c.mamba_dt_rank
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.in_proj = Linear(c.hidden_size, 2 * d, bias=c.mamba_proj_bias)
        self.conv1d = nn.Conv1d(d, d, kernel_size=c.mamba_d_conv, groups=d, bias=c.mamba_conv_bias, padding=c.mamba_d_conv - 1)
        self.x_proj = Linear(d, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))  # log(1..d_state) per channel, as HF initializes it
        if self.A_log.device.type != "meta":  # (see JambaStage: not on meta, where arange imports dynamo)
            with torch.no_grad():
                self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = Linear(d, c.hidden_size, bias=c.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, c.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, c.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: HybridCache, b: ForwardBatch | DecodeBatch) -> torch.Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (T, d_inner) each
        conv, ssm = cache.conv[self.layer], cache.ssm[self.layer]
        weight = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
        if isinstance(b, DecodeBatch):
            # One token per row: the recurrences' one-step updates in plain torch ops, which the
            # compiled decode step fuses (stages/decode.py); same results as the kernels below.
            u = causal_conv1d_update_ref(xs, weight, self.conv1d.bias, conv, b.slots)  # (B, d_inner), SiLU applied
            delta, A, B, C = self._ssm_inputs(u)
            y = selective_state_update_ref(ssm, b.slots, u, delta, A, B, C, self.D.float(), z)
            return self.out_proj(y.to(x.dtype))
        u = causal_conv1d_varlen(
            xs.contiguous(), weight, self.conv1d.bias, conv, b.cu_seqlens, b.slots,
            snap_tok=b.snap_tok, snap_dst=b.snap_dst,
        )  # (T, d_inner), SiLU applied
        delta, A, B, C = self._ssm_inputs(u)
        y = selective_scan_varlen(
            u, delta, A, B.contiguous(), C.contiguous(), self.D.float(), z.contiguous(), ssm, b.cu_seqlens, b.slots,
            snap_tok=b.snap_tok, snap_dst=b.snap_dst,
        )  # (T, d_inner)
        return self.out_proj(y.to(x.dtype))

    def _ssm_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The scan's time step, decay and input/output projections for conv outputs u (T, d_inner)."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        # The bias is added before softplus, as in mamba-ssm's `delta_bias` and HF's scan.
        delta = F.softplus(self.dt_proj.matmul(dt) + self.dt_proj.bias).float()  # (T, d_inner)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        return delta, A, B, C


class MLP(nn.Module):
    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))


class Experts(nn.Module):
    """All experts' weights fused, as transformers v5 stores them: gate then up in `gate_up_proj`."""

    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(c.num_experts, 2 * c.intermediate_size, c.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, c.intermediate_size))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """gate_up, down and their int8 scales (None: not quantized), as stages.ops.moe_experts takes
        them (stages.quant.Int8Experts has the same method)."""
        return self.gate_up_proj, self.down_proj, None, None


class SparseMoE(nn.Module):
    """Softmax router, top-k experts per token, weights *not* renormalised (as Jamba was trained)."""

    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.router = Router(c)
        self.experts = Experts(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, H)
        probs = F.softmax(linear(x, self.router.weight), dim=-1, dtype=torch.float32)  # (T, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        return moe_experts(x, weights.to(x.dtype), experts, *self.experts.tensors())


class DecoderLayer(nn.Module):
    def __init__(self, c: JambaConfig, layer: int) -> None:
        super().__init__()
        self.is_attention = c.is_attention(layer)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if self.is_attention:
            self.self_attn = Attention(c, layer)
        else:
            self.mamba = MambaMixer(c, layer)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = SparseMoE(c) if c.is_moe(layer) else MLP(c)

    def forward(self, x: torch.Tensor, cache: HybridCache, b: ForwardBatch | DecodeBatch) -> torch.Tensor:
        mixer = self.self_attn if self.is_attention else self.mamba
        x = x + mixer(self.input_layernorm(x), cache, b)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class _Body(nn.Module):
    """Holds what HF keeps under `model.`: embedding, layers (keyed by global index), final norm."""


class JambaStage(nn.Module):
    """Layers [start, end) of a Jamba model; the first stage embeds tokens, the last one applies the head.

    head: "lm" (next-token logits, `lm_head`) or "classification" (`score`, pooled by the caller's
    choice of output positions).
    """

    def __init__(self, config: JambaConfig, start: int = 0, end: int | None = None, head: str | None = None) -> None:
        super().__init__()
        end = config.num_hidden_layers if end is None else end
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for a {config.num_hidden_layers}-layer model")
        head = head or ("classification" if config.is_classifier else "lm")
        if head not in ("lm", "classification"):
            raise ValueError(f"unknown head {head!r}")
        self.config, self.start, self.end, self.head = config, start, end, head
        self.quantize: str | None = None  # set by stages.quant.quantize_modules
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        self.model = _Body()
        if self.is_first:
            # nn.Embedding's own init, but skipped on the meta device (stages/loading.py builds
            # there): torch's meta kernels for normal_ and arange import torch._dynamo, which would
            # cost every stage process 1.5 s.
            weight = torch.empty(config.vocab_size, config.hidden_size)
            if weight.device.type != "meta":
                nn.init.normal_(weight)
            self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(start, end)})
        if self.is_last:
            self.model.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if head == "lm":
                self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
            else:
                self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    @property
    def layer_range(self) -> range:
        return range(self.start, self.end)

    def make_cache(self, num_slots: int, max_seq_len: int, **paging) -> HybridCache:
        """This stage's cache; `paging`: block_size, num_blocks, num_snapshots, manage_blocks."""
        p = next(self.parameters())
        return HybridCache(self.config, self.layer_range, num_slots, max_seq_len, dtype=p.dtype, device=p.device, **paging)

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        cache: HybridCache,
        slots: list[int],
        seq_lens: list[int],
        output_index: torch.Tensor | None = None,
        snapshots: list[list[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """One packed step through this stage's layers.

        x: (T,) token ids on the first stage, else (T, hidden) activations from the previous stage.
        Rows are consecutive runs of `seq_lens[b]` tokens, written to cache slot `slots[b]`.
        `snapshots[b]` lists (offset in row b, snapshot id): copy the Mamba states after that token
        into the snapshot (the prefix cache; see stages/paging.py). Returns (T, hidden) activations, or on the last stage the head's output for the packed
        token positions `output_index` (default: each row's last token): (K, vocab) or (K, labels).
        """
        device = self.model.layers[str(self.start)].input_layernorm.weight.device
        x = x.to(device)  # token ids / activations arrive on the CPU from the runner or the previous stage
        if output_index is not None:
            output_index = output_index.to(device)
        T = sum(seq_lens)
        if x.shape[0] != T:
            raise ValueError(f"input has {x.shape[0]} tokens but seq_lens add up to {T}")
        if self.is_first:
            # (Their range is checked where requests come in, once: cluster/runtime/intake.py.)
            if x.dtype != torch.long or x.dim() != 1:
                raise ValueError("the first stage takes a 1-D tensor of token ids")
        b = cache.begin(slots, seq_lens, snapshots)
        h = self.model.embed_tokens(x) if self.is_first else x
        for layer in self.model.layers.values():
            h = layer(h, cache, b)
        cache.commit(b)
        if not self.is_last:
            return h
        if output_index is None:
            output_index = b.cu_seqlens[1:] - 1
        h = self.model.final_layernorm(h[output_index])
        return self.lm_head(h) if self.head == "lm" else self.score(h)

    def decode(self, x: torch.Tensor, cache: HybridCache, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step at a fixed shape: B rows of one token, no host sync, no checks (the
        caller's `cache.begin_decode` made them; stages/decode.py compiles this and pads B).

        x: (B,) token ids on the first stage, else (B, hidden); slots, positions: (B,) int64 on the
        stage's device. Returns (B, hidden), or on the last stage the head's output (B, vocab).
        """
        b = cache.decode_batch(slots, positions)
        h = self.model.embed_tokens(x) if self.is_first else x
        for layer in self.model.layers.values():
            h = layer(h, cache, b)
        if not self.is_last:
            return h
        h = self.model.final_layernorm(h)
        return self.lm_head(h) if self.head == "lm" else self.score(h)
