"""Decode steps on static buffers, replayed from captured CUDA graphs.

A decode-only step of `b` rows runs on the buffers of the smallest batch bucket that holds it:
token, position and slot of each row, and its block table padded to the bucket's width, written
with one host-to-device copy. Rows past `b` are padding: they write their key to the pool's
scratch block and attend only to it, so they never touch a sequence's blocks or the null block.
Because every tensor the forward reads lives at a fixed address with a fixed shape, the forward
can be captured once per bucket as a CUDA graph and replayed: one launch instead of one per
kernel, which is most of a small model's decode time on a GPU.

Three modes: "capture" (CUDA: capture each bucket on first use, then replay), "static" (the same
padded forward run eagerly, with no capture: how CPU tests check that padding and bucketing
keep the greedy tokens of the eager path), and off (no DecodeGraphs at all).

A capture that fails (a model whose forward syncs with the host, or a kernel that cannot be
captured) turns graphs off for the replica with the reason logged and shown by `/health`; the
step it was for runs eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from models import attention
from models.attention import DecodeGroup, PagedLayout
from models.flash_paged import FlashDecode
from models.plan import PlanRow

log = logging.getLogger(__name__)
# Batch sizes graphs are captured for, as vLLM picks them: small sizes one by one (a lone chat
# decodes at batch 1), then multiples of 8 so that padding wastes at most 7 rows.
_SMALL_BUCKETS = (1, 2, 4)
_BUCKET_STEP = 8


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    sizes = [size for size in _SMALL_BUCKETS if size < max_batch]
    sizes.extend(range(_BUCKET_STEP, max_batch, _BUCKET_STEP))
    sizes.append(max_batch)
    return tuple(sorted(set(sizes)))


def width_buckets(max_width: int, *, flash: bool) -> tuple[int, ...]:
    """Block-table widths: one (the longest) when FlashAttention reads the pool itself, as it stops
    at each row's length; powers of two when keys are gathered, so that a short batch does not
    gather (and attend over) the longest context the server allows."""
    if flash:
        return (max_width,)
    widths, width = [], 1
    while width < max_width:
        widths.append(width)
        width *= 2
    widths.append(max_width)
    return tuple(widths)


def _bucket_for(value: int, buckets: tuple[int, ...]) -> int | None:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    return None


@dataclass(slots=True)
class _Bucket:
    batch: int
    width: int
    inputs: torch.Tensor  # [batch * (3 + width)] long: tokens, positions, slots, block tables
    graph: object = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the graph's output, rewritten by each replay

    @property
    def tokens(self) -> torch.Tensor:
        return self.inputs[: self.batch]

    @property
    def positions(self) -> torch.Tensor:
        return self.inputs[self.batch : 2 * self.batch]

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs[2 * self.batch : 3 * self.batch]

    @property
    def blocks(self) -> torch.Tensor:
        return self.inputs[3 * self.batch :].view(self.batch, self.width)


class DecodeGraphs:
    """The static-buffer decode path of one `PagedRunner`."""

    def __init__(self, runner, *, max_batch: int, max_seq_len: int, capture: bool) -> None:
        self.runner = runner
        self.capture = capture and runner.device.type == "cuda"
        self.mode = "capture" if self.capture else "static"
        block_size = runner.cache.block_size
        self.batches = batch_buckets(max_batch)
        self.widths = width_buckets(-(-max_seq_len // block_size), flash=runner.use_flash)
        self.disabled: str | None = None  # why graphs were turned off after a failed capture
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = None  # one memory pool shared by every captured graph
        self.captured = 0
        self.steps = 0  # decode steps this path ran (replayed, or run on the static buffers)

    @property
    def status(self) -> str:
        if self.disabled is not None:
            return f"off ({self.disabled})"
        return f"{self.mode} ({self.captured} captured, buckets up to batch {self.batches[-1]})"

    def applicable(self, rows: list[PlanRow]) -> bool:
        """Plain decode steps only: prefill chunks, images, scored prompt positions, M-RoPE tables
        and LongRoPE's per-row factors change shapes or take inputs the static buffers do not hold."""
        if self.disabled is not None or len(rows) > self.batches[-1]:
            return False
        if self.runner.long_rope_after is not None:
            return False
        block_size = self.runner.cache.block_size
        for row in rows:
            if len(row.token_ids) != 1 or not row.samplers or row.mm_inputs or row.scoring is not None:
                return False
            if row.inputs is not None and row.inputs.mrope_positions is not None:
                return False
            if -(-row.end // block_size) > self.widths[-1]:
                return False
        return True

    def forward(self, rows: list[PlanRow]) -> torch.Tensor:
        """Logits `[len(rows), vocab]` of a step `applicable` accepted."""
        cache = self.runner.cache
        block_size = cache.block_size
        width = _bucket_for(max(-(-row.end // block_size) for row in rows), self.widths)
        bucket = self._bucket(_bucket_for(len(rows), self.batches), width)
        self._fill(bucket, rows)
        self.steps += 1
        if not self.capture:
            return self._run(bucket)[: len(rows)]
        if bucket.graph is None:
            try:
                self._capture(bucket)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
                self.disabled = f"capture failed: {type(exc).__name__}: {exc}"[:300]
                log.warning("CUDA graphs turned off for this replica: %s", self.disabled)
                self._buckets.clear()
                self.steps -= 1
                return self.runner.forward_eager(rows)
        bucket.graph.replay()
        return bucket.logits[: len(rows)]

    def _bucket(self, batch: int, width: int) -> _Bucket:
        bucket = self._buckets.get((batch, width))
        if bucket is None:
            inputs = torch.zeros(batch * (3 + width), dtype=torch.long, device=self.runner.device)
            bucket = self._buckets[(batch, width)] = _Bucket(batch, width, inputs)
        return bucket

    def _fill(self, bucket: _Bucket, rows: list[PlanRow]) -> None:
        """Every input of the step in one host list and one copy to the device."""
        cache = self.runner.cache
        block_size, null, scratch = cache.block_size, cache.null_block, cache.scratch_block
        padding = bucket.batch - len(rows)
        tokens = [row.token_ids[0] for row in rows] + [0] * padding
        positions = [row.start for row in rows] + [0] * padding
        slots = [
            row.block_table[row.start // block_size] * block_size + row.start % block_size for row in rows
        ]
        slots += [scratch * block_size] * padding
        tables: list[int] = []
        for row in rows:
            table = row.block_table[: -(-row.end // block_size)]
            tables.extend(table)
            tables.extend([null] * (bucket.width - len(table)))
        tables.extend([scratch] * (bucket.width * padding))
        host = torch.tensor(tokens + positions + slots + tables, dtype=torch.long)
        bucket.inputs.copy_(host, non_blocking=False)

    def _run(self, bucket: _Bucket) -> torch.Tensor:
        """The padded forward; what a capture records."""
        runner = self.runner
        layout = PagedLayout(
            runner.cache,
            bucket.slots,
            bucket.positions,
            rules=runner.rules,
            declared_spans=runner.traits.bidirectional is not None,
        )
        layout.num_decode = bucket.batch
        if runner.use_flash:
            layout.flash_decode = FlashDecode(
                seq_lens=(bucket.positions + 1).to(torch.int32), block_table=bucket.blocks.to(torch.int32)
            )
        else:
            layout.decode_groups = [DecodeGroup(rows=None, blocks=bucket.blocks, positions=bucket.positions)]
        with attention.use_layout(layout):
            out = runner.model(
                input_ids=bucket.tokens[None],
                position_ids=(bucket.positions + runner.traits.position_offset)[None],
                logits_to_keep=0,
                use_cache=False,
            )
        return out.logits[0]

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up (lazy kernel and allocator set-up must not happen inside a capture), then record.
        The warm-up runs the real step's inputs: it writes the same keys to the same slots the
        replay that follows writes, so running it twice changes nothing."""
        device = self.runner.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(bucket)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other replicas' threads and the prompt-preparation lanes keep using CUDA
        # (copies, allocations) while this thread captures; "global" would make those calls fail.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            bucket.logits = self._run(bucket)
        bucket.graph = graph
        self.captured += 1
        log.info("captured a CUDA graph for decode batch %d, %d blocks", bucket.batch, bucket.width)
