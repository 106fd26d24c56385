"""LightningDiT / SFD model: architecture, size registry, weight initialisation.

The model knows which layers are tensor-parallel (megatron-core primitives in ``layers.py``, sharding
rules in ``tensor_parallel.py``); its TP size comes from the ``ModelParallelConfig`` it is built with
(``parallel_config(tensor_parallel=N)``, default 1). Building a model never creates a process group:
``sfd_scale/parallel`` decides the layout and sets it up first when TP > 1 (at TP = 1 without a layout,
megatron's linears run on one rank with no group).

Forward signature matches the official model: ``model(x, t, y)`` with ``t = (t_tex, t_sem)`` for an SFD
(dual-time) model and a tensor for a plain one; in training mode with REPA it returns
``(velocity, repa_projection)``, otherwise the velocity.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from timm.layers import PatchEmbed

# the size registry and the architecture dataclasses live in the torch-free args.py (a config is read and
# checked without importing torch or megatron-core); re-exported here under their old names
from .args import (REPA_FEATURE_DIMS, SIZE_ALIASES, SIZES, ArchitectureOptions, ModelArgs,  # noqa: F401
                   args_for, check_pipeline_split, parse_model_name)
from .embeddings import LabelEmbedder, Rope2D, TimestepEmbedder, sincos_pos_embed_2d
from .layers import AdaLNModulation, Attention, GeluMlp, SwiGLU, column_linear, make_norm, modulate, zeros
from .master_linear import Linear


@dataclass(frozen=True)


class StageSpec:
    """Which part of the network one module holds (pipeline parallelism); the default is all of it.

    ``pre_process``: patch / time / label embedders; blocks ``first_block`` .. ``last_block - 1`` (global
    indices); ``post_process``: final layer. The REPA projector lives with block ``repa_depth``.
    """

    first_block: int = 0
    last_block: Optional[int] = None
    pre_process: bool = True
    post_process: bool = True

    def blocks(self, depth: int) -> range:
        return range(self.first_block, depth if self.last_block is None else self.last_block)


def parallel_config(params_dtype: torch.dtype = torch.float32, tensor_parallel: int = 1) -> ModelParallelConfig:
    """Megatron layer config of a ``tensor_parallel``-way model. Always CPU initialisation (then
    ``.to(device)``): megatron's GPU path draws from its CUDA RNG tracker, which would make weights depend on
    the layout and the device."""
    return ModelParallelConfig(use_cpu_initialization=True, perform_initialization=True, params_dtype=params_dtype,
                               tensor_model_parallel_size=tensor_parallel)


@contextlib.contextmanager


def _seeded(base: int, part: int):
    """Global CPU RNG seeded for one part of the model, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((base * 1_000_003 + part) % (2 ** 63))
        yield


class LightningDiTBlock(nn.Module):
    def __init__(self, args: ModelArgs, config: ModelParallelConfig):
        super().__init__()
        d = args.hidden_size
        self.wo_shift = args.wo_shift
        self.norm1 = make_norm(d, args.use_rmsnorm)
        self.norm2 = make_norm(d, args.use_rmsnorm)
        self.attn = Attention(d, args.num_heads, config, qk_norm=args.use_qknorm, use_rmsnorm=args.use_rmsnorm)
        mlp = SwiGLU if args.use_swiglu else GeluMlp
        self.mlp = mlp(d, args.mlp_hidden, config)
        self.adaLN_modulation = AdaLNModulation(d, 4 if args.wo_shift else 6, config)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[nn.Module]) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, args: ModelArgs, config: ModelParallelConfig):
        super().__init__()
        d = args.hidden_size
        self.norm_final = make_norm(d, args.use_rmsnorm)
        self.linear = column_linear(d, args.patch_size ** 2 * args.out_channels, config, gather_output=True, init=zeros)
        self.adaLN_modulation = AdaLNModulation(d, 2, config)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)
        out, _ = self.linear(modulate(self.norm_final(x), shift, scale))
        return out


class LightningDiT(nn.Module):
    def __init__(self, args: ModelArgs, config: Optional[ModelParallelConfig] = None, stage: StageSpec = StageSpec(),
                 init_seed: Optional[int] = None):
        super().__init__()
        config = config or parallel_config()
        args.check_tensor_parallel(config.tensor_model_parallel_size)
        if config.sequence_parallel:  # megatron splits dim 0 (its [seq, batch, hidden]); ours is the batch
            raise ValueError("sequence parallel is not supported: LightningDiT activations are [batch, tokens, hidden]")
        self.args, self.config, self.stage = args, config, stage
        self.block_ids = stage.blocks(args.depth)
        self.input_tensor = None  # pipeline stages after the first get their input from the previous stage
        self.checkpoint_blocks = False  # train.activation_checkpointing (parallel/optimizations.py)
        # what megatron's finalize_model_grads asks a pipeline chunk: nothing is tied across stages here
        self.pre_process, self.post_process = stage.pre_process, stage.post_process
        self.share_embeddings_and_output_weights = False
        # Initialisation does not depend on the layout: every part draws from its own generator state,
        # seeded from one number (``init_seed``, else drawn from the global RNG; all chunks of a pipelined
        # model share it), so block i of a pipeline stage (or a TP shard of it: megatron's CPU init draws
        # the full weight) equals block i of the one-process model.
        base = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu")) if init_seed is None else init_seed
        d = args.hidden_size
        if stage.pre_process:
            with _seeded(base, 0):
                self.x_embedder = PatchEmbed(args.input_size, args.patch_size, args.in_channels, d, bias=True)
                if args.dual_time_embed:
                    self.t_embedder_sem = TimestepEmbedder(d // 2)
                    self.t_embedder_tex = TimestepEmbedder(d // 2)
                else:
                    self.t_embedder = TimestepEmbedder(d)
                self.y_embedder = LabelEmbedder(args.num_classes, d, args.class_dropout_prob)
                self.pos_embed = nn.Parameter(sincos_pos_embed_2d(d, args.grid).unsqueeze(0), requires_grad=False)
                self._init_embedders()
        self.feat_rope = Rope2D(d // args.num_heads, args.grid) if args.use_rope and len(self.block_ids) else None
        blocks = []
        for i in self.block_ids:
            with _seeded(base, 1 + i):
                blocks.append(LightningDiTBlock(args, config))
        self.blocks = nn.ModuleList(blocks)
        if stage.post_process:
            with _seeded(base, 1 + args.depth):
                self.final_layer = FinalLayer(args, config)
        self.has_repa = args.use_repa and (args.repa_depth - 1) in self.block_ids
        if self.has_repa:
            p = args.repa_projector_dim
            with _seeded(base, 2 + args.depth):
                self.repa_projector = nn.Sequential(Linear(d, p), nn.SiLU(), Linear(p, p), nn.SiLU(),
                                                    Linear(p, args.repa_feature_dim))
                for layer in self.repa_projector:
                    if isinstance(layer, nn.Linear):
                        nn.init.xavier_uniform_(layer.weight)
                        nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------------------------------ init
    def _init_embedders(self) -> None:
        """Official init of the replicated embedders (megatron layers get theirs at construction):
        patch conv as a Xavier linear, zero biases, N(0, 0.02) label table and time-MLP weights."""
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in self.time_embedders():
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)

    def time_embedders(self):
        return [self.t_embedder_sem, self.t_embedder_tex] if self.args.dual_time_embed else [self.t_embedder]

    # ------------------------------------------------------------------------------------------ forward
    def embed_time(self, t: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if self.args.dual_time_embed:
            if not isinstance(t, (tuple, list)) or len(t) != 2:
                raise TypeError("an SFD model takes t as the pair (t_tex, t_sem)")
            t_tex, t_sem = t
            return torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=1)
        if isinstance(t, (tuple, list)):
            raise TypeError("a plain (single-time) model takes t as one tensor, not a pair")
        return self.t_embedder(t)

    def condition(self, t, y: torch.Tensor) -> torch.Tensor:
        """Conditioning vector c = time embedding + label embedding (B, D)."""
        return self.embed_time(t) + self.y_embedder(y, self.training)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p, s = self.args.out_channels, self.args.patch_size, self.args.grid
        x = x.reshape(x.shape[0], s, s, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, s * p, s * p)

    def set_input_tensor(self, tensor) -> None:
        """Megatron pipeline schedules hand a stage its input here (a list with one tensor, or a tensor)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, x: Optional[torch.Tensor], t=None, y: Optional[torch.Tensor] = None, repa_loss=None):
        """Velocity (B, C, H, W); in training with REPA ``(velocity, projection)``.

        As a pipeline stage the input comes from ``set_input_tensor`` unless this stage embeds, and a stage
        without the final layer returns the packed (T + 1, B, D) activations: the tokens plus the
        conditioning vector c as one extra row, so c and its gradient travel with the hidden states.
        ``repa_loss(projection) -> scalar`` is then needed on the stage owning the projector: its loss is
        attached to the activations (megatron's aux-loss autoscaler) instead of being returned.
        """
        if self.stage.pre_process:
            tokens = self.x_embedder(x) + self.pos_embed
            c = self.condition(t, y)
        else:
            packed = self.input_tensor.transpose(0, 1)
            tokens, c = packed[:, :-1], packed[:, -1]
        repa = None
        for i, block in zip(self.block_ids, self.blocks):
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                # activation checkpointing: keep only each block's input, recompute the rest in backward
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, self.feat_rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, self.feat_rope)
            if self.has_repa and self.training and i + 1 == self.args.repa_depth:
                repa = self.repa_projector(tokens)
        if not self.stage.post_process:
            if repa is not None:
                if repa_loss is None:
                    raise ValueError("this pipeline stage owns the REPA projector: pass repa_loss")
                tokens = MoEAuxLossAutoScaler.apply(tokens, repa_loss(repa))
            return torch.cat([tokens, c.unsqueeze(1)], dim=1).transpose(0, 1).contiguous()
        out = self.unpatchify(self.final_layer(tokens, c))
        if self.args.learn_sigma:
            out = out[:, : self.args.in_channels]
        return (out, repa) if repa is not None else out


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen pos_embed included (how the official counts were taken)."""
    return sum(p.numel() for p in model.parameters())
