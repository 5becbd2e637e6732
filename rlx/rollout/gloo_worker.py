"""The worker side of the `rlx_gloo` weight-transfer engine (rlx/rollout/weight_transfer.py).

vLLM imports this module inside a rollout server's worker when the server runs with
`--weight-transfer-config '{"backend": "rlx_gloo"}'`.

Joining a group is only half of it: before the first update every member proves it holds the
server's token (RLX_SERVE_TOKEN in this process's environment, set by `rlx serve`) and checks
the others' proofs (rlx/rollout/auth.py), so a worker never receives weights in a group where
someone lacks the token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.model_loader.reload import (
    finalize_layerwise_reload,
    initialize_layerwise_reload,
)

from rlx.rollout.auth import TOKEN_ENV
from rlx.rollout.weight_transfer import (
    broadcast,
    check_members,
    close_group,
    dtype_of,
    flat_groups,
    open_group,
    refuse_members,
    repack_tied_lm_head,
)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this server's first worker rank in the group (the trainer is rank 0)
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError("names, dtype_names and shapes must have the same length")


def worker_rank(parallel_config, rank_offset: int) -> int:
    """This worker's rank in the weight-sync group, as vLLM's nccl engine numbers its workers:
    a server's data-parallel replicas follow each other (`/get_world_size` counts them all)."""
    per_replica = parallel_config.world_size  # TP x PP
    index = parallel_config.data_parallel_index * per_replica + parallel_config.rank
    return rank_offset + index


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives checkpoint-format weights over gloo and loads them through layer-wise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()  # a new trainer replaces one that left without saying so
        rank = worker_rank(self.parallel_config, init_info.rank_offset)
        self.group = open_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.timeout_s,
        )
        token = os.environ.get(TOKEN_ENV, "")
        bad = check_members(self.group, rank, init_info.world_size, token)
        if bad:
            self.shutdown()
            refuse_members(bad, "server")

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("rlx_gloo: init_weight_transfer_engine was not called")
        loaded = []
        for dtype_name, indices in flat_groups(update_info.dtype_names):
            shapes = [torch.Size(update_info.shapes[i]) for i in indices]
            flat = torch.empty(sum(s.numel() for s in shapes), dtype=dtype_of(dtype_name))
            broadcast(self.group, flat)
            views = flat.split([s.numel() for s in shapes])
            loaded += [
                (update_info.names[i], view.view(shape))
                for i, view, shape in zip(indices, views, shapes, strict=True)
            ]
        self.model.load_weights(loaded)

    def update_weights(self, update_info: dict) -> None:
        # the base class then synchronizes an accelerator; gloo has already finished
        self.receive_weights(self.parse_update_info(update_info))

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        repack_tied_lm_head(self.model)

    def shutdown(self) -> None:
        if self.group is not None:
            close_group(self.group)
            self.group = None
