"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

Weights keep Hugging Face's layout, with q/k/v and gate/up fused at load time so each layer runs
four matrix products instead of seven.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharekv.model.attention import AttentionMetadata, PagedAttention
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.config import ModelConfig, ModelLoadError
from sharekv.model.elementwise import Elementwise
from sharekv.model.kv_cache import KVCache
from sharekv.model.linear import Linear
from sharekv.model.native import cpu_kernels
from sharekv.model.rope import RotaryEmbedding


@dataclass
class DecoderLayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                 dtype: torch.dtype, device: torch.device, native_kernels: bool = True) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim

        native = cpu_kernels() if device.type == "cpu" and native_kernels else None

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"checkpoint is missing weight {name!r}")
            return weights.pop(name).to(dtype=dtype, device=device)

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[DecoderLayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            qkv = torch.cat([take(attn + "q_proj.weight"), take(attn + "k_proj.weight"),
                             take(attn + "v_proj.weight")])
            bias = None
            if c.qkv_bias:
                bias = torch.cat([take(attn + "q_proj.bias"), take(attn + "k_proj.bias"),
                                  take(attn + "v_proj.bias")])
            mlp = p + "mlp."
            self.layers.append(DecoderLayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=Linear(qkv, bias, native_kernels, native),
                o_proj=Linear(take(attn + "o_proj.weight"), pack=native_kernels, native=native),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=Linear(torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]),
                               pack=native_kernels, native=native),
                down=Linear(take(mlp + "down_proj.weight"), pack=native_kernels, native=native),
            ))
        self.norm = take("model.norm.weight")
        tied = c.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = Linear(self.embed if tied else take("lm_head.weight"), pack=native_kernels, native=native)
        self.rotary = RotaryEmbedding(c.head_dim, max_positions, c.rope_theta, c.rope_scaling, dtype, device)
        self.attention = PagedAttention(c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window)
        self.elementwise = Elementwise(native)
        if c.head_dim % 16 == 0:
            self.attention.native = self.elementwise.native

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, max_positions: int, dtype: torch.dtype,
                        device: torch.device, native_kernels: bool = True) -> LlamaModel:
        weights = {name: t for name, t in checkpoint.tensors(dtype) if "rotary_emb" not in name}
        return cls(checkpoint.config, weights, max_positions, dtype, device, native_kernels)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [tokens, hidden] for flattened tokens."""
        c, ops = self.config, self.elementwise
        n = input_ids.shape[0]
        h = self.embed[input_ids]
        mlp_out = None  # each layer's MLP output joins the residual stream in the next norm
        for i, layer in enumerate(self.layers):
            h, x = ops.add_rms_norm(h, mlp_out, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = ops.rope(self.rotary, positions, q.view(n, c.num_heads, c.head_dim),
                            k.view(n, c.num_kv_heads, c.head_dim))
            attn = self.attention(q, k, v.view(n, c.num_kv_heads, c.head_dim), *kv_cache.for_layer(i, meta))
            h, x = ops.add_rms_norm(h, layer.o_proj(attn), layer.post_norm, c.rms_norm_eps)
            mlp_out = layer.down(ops.silu_mul(layer.gate_up(x)))
        return ops.add_rms_norm(h, mlp_out, self.norm, c.rms_norm_eps)[1]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
