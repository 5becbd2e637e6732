"""The worker side of the `rlx_gloo` weight-transfer engine (rlx/rollout/weight_transfer.py).

vLLM imports this module inside a rollout server's worker when the server runs with
`--weight-transfer-config '{"backend": "rlx_gloo"}'`.
"""

from __future__ import annotations

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

from rlx.rollout.weight_transfer import (
    broadcast,
    close_group,
    dtype_of,
    flat_groups,
    open_group,
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
        self.group = open_group(
            init_info.master_address,
            init_info.master_port,
            worker_rank(self.parallel_config, init_info.rank_offset),
            init_info.world_size,
            init_info.timeout_s,
        )

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
