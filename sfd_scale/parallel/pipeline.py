"""Pipeline parallelism: stage split of LightningDiT and one training micro-step through megatron schedules.

Split: depth / (PP x virtual stages) consecutive blocks per (virtual) stage; stage 0 also embeds
(patch, time, label), the last stage also holds the final layer, and the stage holding block
``repa_depth`` holds the REPA projector. Between stages travels one (T + 1, B, D) tensor: the tokens
plus the conditioning vector c as an extra row, so every stage sees c and its gradient flows back to
the embedders on stage 0. The REPA loss is computed where the projector lives and attached to the
activations (megatron's aux-loss autoscaler), so the schedules only ever see the main loss.

Every stage must agree on a micro-batch's random draw (base time, noise): micro-batches carry them
(``diffusion.micro_batch.MicroBatch``, the one micro-batch type of every engine).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_attr_wrapped_model

from ..diffusion.micro_batch import MicroBatch
from ..diffusion.sfd import SFDObjective
from .cpu_compat import megatron_on_cpu
from ..models.lightningdit import LightningDiT, ModelArgs, StageSpec, check_pipeline_split


def stage_spec(depth: int, pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0) -> StageSpec:
    """Blocks of virtual stage ``vp_rank * pp_size + pp_rank`` (megatron's interleaved assignment)."""
    check_pipeline_split(depth, pp_size, vp_size)
    stages, per = pp_size * vp_size, depth // (pp_size * vp_size)
    v = vp_rank * pp_size + pp_rank
    return StageSpec(first_block=v * per, last_block=(v + 1) * per, pre_process=v == 0, post_process=v == stages - 1)


def transformer_config(args: ModelArgs, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """The megatron config pipeline schedules read (p2p shapes and dtype, layout sizes)."""
    return TransformerConfig(
        num_layers=args.depth, hidden_size=args.hidden_size, num_attention_heads=args.num_heads,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, use_cpu_initialization=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        # gloo matches messages by (peer, tag) and megatron tags every p2p op 0: batched sends to the same
        # peer in both directions (PP = 2 with virtual stages) can pair an activation with a gradient.
        # Unbatched ops are posted in megatron's rank-parity order, which keeps them matched on gloo.
        batch_p2p_comm=torch.cuda.is_available())


def build_stages(args: ModelArgs, params_dtype: torch.dtype = torch.float32) -> List[LightningDiT]:
    """This rank's model chunks (one per virtual stage), in megatron's expected order."""
    config = transformer_config(args, params_dtype)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    # one draw: chunks = one model's init
    init_seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu"))
    for v in range(vp):
        chunk = LightningDiT(args, config, stage_spec(args.depth, pp, rank, vp, v), init_seed=init_seed)
        chunk.model_type = ModelType.encoder_or_decoder
        chunk.vp_stage = v if vp > 1 else None
        chunks.append(chunk)
    return chunks


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def stage_state_dict(full: Mapping[str, torch.Tensor], chunk: LightningDiT) -> Dict[str, torch.Tensor]:
    """The part of a full (official-named) state dict one stage holds, block indices made local."""
    first, own = chunk.block_ids.start, set(chunk.state_dict())
    out = {}
    for key, value in full.items():
        m = _BLOCK.match(key)
        local = f"blocks.{int(m.group(1)) - first}.{m.group(2)}" if m else key
        if m and int(m.group(1)) not in chunk.block_ids:
            continue
        if local in own:
            out[local] = value
    return out


def global_key(chunk: LightningDiT, local: str) -> str:
    """Official (global) name of a stage-local parameter name."""
    m = _BLOCK.match(local)
    return f"blocks.{int(m.group(1)) + chunk.block_ids.start}.{m.group(2)}" if m else local


def forward_backward(chunks: Sequence[LightningDiT], micro_batches: Sequence[MicroBatch], objective: SFDObjective,
                     forward_only: bool = False) -> Dict[str, torch.Tensor]:
    """One pass of megatron's pipeline schedule over ``micro_batches``; gradients accumulate in the chunks.

    Returns the mean loss terms over micro-batches on the last stage (empty dict on other stages) plus
    ``repa_loss_aux`` (also as the logged ``loss_repa``) on the stage owning the REPA projector when that is
    not the last stage (its term is then not part of the last stage's ``total``): 0-dim tensors on the
    device, never read on the host here (the trainer reads losses once per log step).
    """
    n = len(micro_batches)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # aux losses come pre-divided by n (below)
    repa_values: List[torch.Tensor] = []

    def forward_step(data_iterator, model):
        mb: MicroBatch = next(data_iterator)
        stage = get_attr_wrapped_model(model, "stage")  # through megatron's DDP wrapper
        batch = objective.prepare(mb.x1, t_base=mb.t_base, x0=mb.x0)

        def repa_loss(projection):
            loss = objective.repa_term(projection, mb.repa_target).mean()
            repa_values.append(loss.detach())
            return loss / n

        inputs = (batch["xt"], batch["t"], mb.y) if stage.pre_process else (None,)
        output = model(*inputs, repa_loss=repa_loss if mb.repa_target is not None else None)

        def loss_func(out):
            pred, proj = out if isinstance(out, tuple) else (out, None)
            terms = objective.losses(pred, batch["ut"], proj, mb.repa_target if proj is not None else None)
            return terms["total"], {k: v.detach().mean() for k, v in terms.items()}

        return output, loss_func

    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    args = get_attr_wrapped_model(chunks[0], "args")
    with megatron_on_cpu():  # the schedules allocate a few scalars with device="cuda"
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators,
            model=list(chunks) if len(chunks) > 1 else chunks[0], num_microbatches=n, seq_length=args.grid ** 2 + 1,
            micro_batch_size=micro_batches[0].x1.shape[0], forward_only=forward_only)
    out = ({k: torch.stack([r[k].reshape(()).double() for r in reduced]).sum() / n for k in reduced[0]}
           if reduced else {})
    if repa_values:  # REPA on a stage before the last: its term is not in the last stage's total
        out["repa_loss_aux"] = out["loss_repa"] = torch.stack(repa_values).double().sum() / len(repa_values)
    return out
