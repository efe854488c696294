"""Mixture-of-experts MLP: top-k routing as Hugging Face computes it, and a grouped product that
runs each token through its own experts only.

Routing (Mixtral, Qwen2-MoE, Qwen3-MoE): router logits x . W_router [E], softmax in float32, the
top `experts_per_token` probabilities (renormalised to sum to 1 when
`normalize_expert_weights`), cast to the activation type; the output is the weighted sum of the
chosen experts' gated MLPs, plus (Qwen2-MoE) a shared expert scaled by sigmoid(x . w_gate).

The grouped product: the N * k (token, expert) assignments are sorted by expert and laid out in
tiles of `rows` assignments, each tile holding one expert's assignments only (a group is padded
to whole tiles). A scan over the tiles runs the tile's expert on its rows (`lax.switch` over the
experts: each branch reads its expert's own arrays, see checkpoint.nest_params), on as few rows
as hold the tile's assignments (a power of two, `row_buckets`); tiles past the used ones take an
empty branch, so a decode step reads only the experts its tokens chose, and a
prefill does about N * k rows of work, not N * E. (`jax.lax.ragged_dot` does the same grouping,
but XLA:CPU lowers it to a product over every expert: measured as slow as running all experts.)

Shapes: N tokens, D hidden, E experts, F expert width, k experts per token, R rows per tile.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

TILE_ROWS = 128  # assignment rows per tile (fewer when there are fewer tokens)
BUCKET_BRANCHES = 64  # at most this many (expert, row bucket) branches per layer (see row_buckets)


def route(config, h: jax.Array, lp: dict) -> Tuple[jax.Array, jax.Array]:
    """h [N, D] -> (weights [N, k] in h's dtype, experts [N, k] int32), as HF routes with the
    layer's router (`config.router`: "scaled" is Gemma 4's, with lp's router_scale and
    router_expert_scale)."""
    from jaxgen.model.decoder import linear, norm

    if config.router == "scaled":  # rms(h) * scale / sqrt(D), in h's dtype
        h = norm(h, None, config) * lp["router_scale"]["weight"].astype(h.dtype) * jnp.asarray(
            h.shape[-1] ** -0.5, h.dtype)
    logits = linear(h, lp["router"]).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, config.experts_per_token)
    if config.normalize_expert_weights:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if config.router == "scaled":
        weights = weights * jnp.take(lp["router_expert_scale"]["weight"].astype(jnp.float32), experts)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def tile_plan(experts: jax.Array, num_experts: int, rows: int
              ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array, int]:
    """Lays the assignments experts [N, k] out in tiles of `rows` rows, one expert per tile.

    Returns (slot [N*k]: the padded row of each assignment (in token-major order), tile_expert
    [T]: the expert of each tile, tile_count [T]: the assignments in each tile (its first rows;
    0 past the used tiles), used: tiles holding assignments, T: the static tile count)."""
    flat = experts.reshape(-1)
    a = flat.shape[0]
    counts = jnp.bincount(flat, length=num_experts)  # [E]
    tiles_per_expert = (counts + rows - 1) // rows
    first_tile = jnp.cumsum(tiles_per_expert) - tiles_per_expert  # [E]
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    sorted_experts = flat[order]
    group_start = jnp.cumsum(counts) - counts
    rank = jnp.arange(a, dtype=jnp.int32) - group_start[sorted_experts]  # index within its expert's group
    slot_sorted = first_tile[sorted_experts] * rows + rank
    slot = jnp.zeros((a,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    if rows >= experts.shape[0]:  # a token picks distinct experts: every group fits one tile
        n_tiles = min(num_experts, a)
    else:  # each group adds at most one partial tile
        n_tiles = min(-(-a // rows) + min(num_experts, a), a)
    used = jnp.sum(tiles_per_expert)
    # the expert of tile t: mark each used expert's first tile, then carry the mark forward
    starts = jnp.where(counts > 0, first_tile, n_tiles)  # empty experts: out of range, dropped
    marks = jnp.zeros((n_tiles,), jnp.int32).at[starts].max(jnp.arange(num_experts, dtype=jnp.int32), mode="drop")
    tile_expert = jax.lax.cummax(marks, axis=0)
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_count = jnp.clip(counts[tile_expert] - (t - first_tile[tile_expert]) * rows, 0, rows)
    tile_count = jnp.where(t < used, tile_count, 0)
    return slot, tile_expert.astype(jnp.int32), tile_count.astype(jnp.int32), used, n_tiles


def tile_rows(tokens: int) -> int:
    """Rows per tile: every token (up to TILE_ROWS), so that at decode sizes each chosen expert is
    one tile and its weights are read once per step (measured: tiles of half that size, 8 rows at
    batch 16, read an expert twice as often and were slower than one tile per expert)."""
    return min(tokens, TILE_ROWS)


def row_buckets(rows: int, num_experts: int) -> Tuple[int, ...]:
    """Row counts a tile's product may run on: the tile's assignments rounded up to one of these
    (padding rows are computed and dropped). At decode sizes a tile holds one expert's share of the
    step's tokens, usually far fewer than `rows` (batch 16, top-2 of 8 experts: 4 on average),
    and XLA:CPU's product of a few rows by an expert costs about its rows (measured, 8 experts x 6
    layers, hidden 768, width 1536: 4 rows 98 ms of CPU, 16 rows 136 ms, 1 row 58 ms). Powers of two
    from 4 up to `rows`, as long as experts x buckets stays within BUCKET_BRANCHES (each is a
    branch of the tile's `lax.switch`: compile time)."""
    sizes = [rows]
    while sizes[-1] > 4 and sizes[-1] % 2 == 0 and num_experts * (len(sizes) + 1) <= BUCKET_BRANCHES:
        sizes.append(sizes[-1] // 2)
    return tuple(sorted(sizes))


def _expert(p: dict, e: int) -> dict:
    """Expert e's parameters ({kind: list of E arrays} -> {kind: array})."""
    return {kind: arrays[e] for kind, arrays in p.items()}


def experts_mlp(config, h: jax.Array, lp: dict, router_input=None) -> jax.Array:
    """The experts MLP of one layer: h [B, T, D] -> [B, T, D], routed on h or on router_input
    [B, T, D] (Gemma 4 routes on the residual stream, not on the experts' normed input)."""
    from jaxgen.model.decoder import gated_mlp, linear

    shape = h.shape
    x = h.reshape(-1, shape[-1])  # [N, D]
    n, k = x.shape[0], config.experts_per_token
    weights, experts = route(config, x if router_input is None else router_input.reshape(x.shape), lp)
    rows = tile_rows(n)
    slot, tile_expert, tile_count, used, n_tiles = tile_plan(experts, config.num_experts, rows)
    buckets = row_buckets(rows, config.num_experts)
    padded = n_tiles * rows
    token_of_slot = jnp.zeros((padded,), jnp.int32).at[slot].set(jnp.repeat(jnp.arange(n, dtype=jnp.int32), k))
    weight_of_slot = jnp.zeros((padded,), x.dtype).at[slot].set(weights.reshape(-1))
    gate, up, down = lp["expert_gate"], lp["expert_up"], lp["expert_down"]

    def tile(_, t):
        tokens = jax.lax.dynamic_slice_in_dim(token_of_slot, t * rows, rows)
        w = jax.lax.dynamic_slice_in_dim(weight_of_slot, t * rows, rows)
        xt = jnp.take(x, tokens, axis=0)

        def run(e: int, size: int):
            def branch(xt):
                y = gated_mlp(xt[:size], _expert(gate, e), _expert(up, e), _expert(down, e), config.activation)
                return y if size == rows else jnp.pad(y, ((0, rows - size), (0, 0)))
            return branch

        # branch e * B + b: expert e (its own buffers) on the first buckets[b] rows; the last
        # branch: an unused tile, nothing to compute
        branches = [run(e, size) for e in range(config.num_experts) for size in buckets]
        branches.append(lambda xt: jnp.zeros_like(xt))
        bucket = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), tile_count[t])  # the smallest that holds them
        index = jnp.where(t < used, tile_expert[t] * len(buckets) + bucket, len(branches) - 1)
        y = jax.lax.switch(index, branches, xt)
        return None, y * w[:, None]

    _, ys = jax.lax.scan(tile, None, jnp.arange(n_tiles, dtype=jnp.int32))  # [T, R, D]
    out = jnp.zeros_like(x).at[token_of_slot].add(ys.reshape(padded, -1))  # padding rows add zeros
    if config.shared_expert_intermediate_size:
        shared = gated_mlp(x, lp["shared_gate"], lp["shared_up"], lp["shared_down"], config.activation)
        out = out + jax.nn.sigmoid(linear(x, lp["shared_expert_gate"])) * shared
    return out.reshape(shape)
