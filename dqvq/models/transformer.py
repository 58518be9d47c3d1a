"""DQ-Transformer: a Position-Transformer with a Content-Transformer stacked on it.

The official StackGPT (`modules/dynamic_modules/stackgpt.py`), numerics and
parameter names kept so official checkpoints map one to one:

  x_t  = content_emb(c_t) + pos_emb_{g_t}(p_t) + seg_emb(g_t) + abs_pos[t]
  H_p  = position stack (causal pre-LN blocks) over x       -> position head
  H_c  = content stack over H_p + pos_emb_{g_{t+1}}(p_{t+1}) -> content head

The content stack at step t is told where the next code goes (the true next
position in training, the sampled one at generation) and nothing later,
which is what lets it predict that code. The content embedding is shared by
every granularity, each granularity has its own position table, and the
position head scores every granularity over the finest vocabulary, as the
official does.

The input layers are the paper's Table 7 ablations, switched by four
attributes (`config.model.*`) whose defaults are the paper's choice and the
official parameters, names and counts:

  content_sharing='shared'         one `content_emb` for every granularity;
    'non_shared': one `content_<role>_emb` per granularity instead.
  position_sharing='non_shared'    one `content_<role>_pos_emb` per
    granularity; 'shared': only the finest granularity's table, read by
    every granularity with its own ids (the finest vocabulary holds every
    granularity's ids, as the position head's does), so a coarse cell and
    the fine cell with the same index, or a coarse eos and a fine cell,
    read the same row: what the paper's ablation takes away.
  granularity_embedding=True       `seg_emb`; False: no such table (as the
    official StackGPT with segment_size <= 0).
  absolute_position_embedding=True `pos_emb`; False: no such table, and
    block_size no longer bounds the sequence length.

Every path (the full forward and the KV-cached decode steps) embeds through
`embed_tokens` and `next_position_embedding`, so both honour the switches.

Absolute positions (`abs_pos`) are read at `layout.absolute_index`: the slot
(dqvq's default), or with `position_index='compact'` the row the official
gives each token, pads left out (converted official generators). Two deliberate differences from the official code: pads are
masked out as attention keys (the official attends to them), so what an
image's tokens see never depends on how much padding its layout has; and
attention goes through
`jax.nn.dot_product_attention` so accelerators get fused kernels (dropout on
attention probabilities, which the fused path cannot do, falls back to an
explicit softmax in training).

Weights carry logical axis names ('embed', 'mlp', 'heads', 'vocab'), which
`dqvq.sharding` maps onto the ('data', 'fsdp') mesh so the large model shards
its parameters and optimizer state over 'fsdp'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dqvq.models import attention
from dqvq.models import granularity as grain_lib
from dqvq import sequence

Array = jax.Array

# Logical axis -> mesh axis. Only the model width is sharded (FSDP): every
# weight matrix has it, and activations stay batch-sharded.
LOGICAL_AXIS_RULES = (('embed', 'fsdp'), ('mlp', None), ('heads', None),
                      ('vocab', None), ('length', None))

# The input-layer switches (paper Table 7) and the values of the two that
# choose between one table for every granularity and one per granularity.
INPUT_LAYER_FIELDS = ('content_sharing', 'position_sharing',
                      'granularity_embedding', 'absolute_position_embedding')
SHARING = ('shared', 'non_shared')


class DQTransformer(nn.Module):
  """StackGPT over a `sequence.StreamLayout`.

  Attributes:
    layout: token ids and capacities (vocabulary sizes follow from it).
    width: n_embd (paper 1024).
    num_heads: attention heads (paper 8).
    position_layers: blocks of the Position-Transformer (paper 6).
    content_layers: blocks of the Content-Transformer (paper 18; large 42).
    block_size: rows of the learned absolute position table (official 2048);
      must be at least layout.length - 1.
    mlp_ratio: MLP hidden width / width.
    embed_dropout, attn_dropout, resid_dropout: official 0.1 each.
    dtype: compute dtype (params stay float32).
    remat: recompute each block's activations in the backward pass instead
      of storing them (`nn.remat`): the paper-size models at the official
      per-device batch need it to fit (see `python -m dqvq.tools.aot`).
    content_sharing: 'shared' (paper) or 'non_shared' content tables
      across granularities (paper Table 7; see the module docstring).
    position_sharing: 'non_shared' (paper) or 'shared' position tables.
    granularity_embedding: add the granularity (segment) embedding.
    absolute_position_embedding: add the learned absolute position table.
  """
  layout: sequence.StreamLayout
  width: int = 1024
  num_heads: int = 8
  position_layers: int = 6
  content_layers: int = 18
  block_size: int = 2048
  mlp_ratio: int = 4
  embed_dropout: float = 0.1
  attn_dropout: float = 0.1
  resid_dropout: float = 0.1
  dtype: Any = None
  remat: bool = False
  content_sharing: str = 'shared'
  position_sharing: str = 'non_shared'
  granularity_embedding: bool = True
  absolute_position_embedding: bool = True

  def validate(self) -> None:
    check_input_layers(self._input_layers())
    if self.width % self.num_heads:
      raise ValueError(f'width={self.width} is not divisible by num_heads='
                       f'{self.num_heads}.')
    if (self.absolute_position_embedding
        and self.block_size < self.layout.length - 1):
      raise ValueError(
          f'block_size={self.block_size} is shorter than the '
          f'{self.layout.length - 1} inputs of the token layout; raise '
          'block_size or lower the stream capacities.')

  def _input_layers(self) -> dict[str, Any]:
    return {f: getattr(self, f) for f in INPUT_LAYER_FIELDS}

  def setup(self):
    # Here too: a model built without `validate` must not treat a mistyped
    # switch as one of the branches below.
    check_input_layers(self._input_layers())
    lay, e = self.layout, self.width
    embed = lambda n, name: nn.Embed(
        n, e, dtype=self.dtype, name=name,
        embedding_init=attention.init(('vocab', 'embed')))
    roles = [r or 'grain' for r in grain_lib.grain_role_names(lay.num_grains)]
    # One table serves every granularity (`_grain_lookup`), or one each.
    self.content_embs = (
        [embed(lay.content_vocab_size, 'content_emb')]
        if self.content_sharing == 'shared' else
        [embed(lay.content_vocab_size, f'content_{roles[k]}_emb')
         for k in range(lay.num_grains)])
    self.position_embs = (
        [embed(lay.position_logits_size, f'content_{roles[-1]}_pos_emb')]
        if self.position_sharing == 'shared' else
        [embed(lay.position_vocab_size(k), f'content_{roles[k]}_pos_emb')
         for k in range(lay.num_grains)])
    if self.granularity_embedding:
      self.seg_emb = embed(lay.num_grains, 'seg_emb')
    if self.absolute_position_embedding:
      self.pos_emb = self.param(
          'pos_emb',
          attention.init((None, 'length', 'embed'), nn.initializers.zeros),
          (1, self.block_size, e))
    # `train` (argument 3, counting self) is a Python bool: static.
    block_cls = (nn.remat(attention.Block, static_argnums=(3,)) if self.remat
                 else attention.Block)
    block = lambda name: block_cls(self.num_heads, self.mlp_ratio,
                                   self.attn_dropout, self.resid_dropout,
                                   self.dtype, name=name)
    self.position_blocks = [block(f'position_transformer_{i}')
                            for i in range(self.position_layers)]
    self.content_blocks = [block(f'content_transformer_{i}')
                           for i in range(self.content_layers)]
    self.position_head_ln = attention.layer_norm('position_head_ln', self.dtype)
    self.position_head = attention.dense(lay.position_logits_size, ('embed', 'vocab'),
                                'position_head', self.dtype, use_bias=False)
    self.content_head_ln = attention.layer_norm('content_head_ln', self.dtype)
    self.content_head = attention.dense(lay.content_vocab_size, ('embed', 'vocab'),
                               'content_head', self.dtype, use_bias=False)
    self.embed_drop = nn.Dropout(self.embed_dropout)

  def _grain_lookup(self, tables: list[nn.Embed], ids: Array,
                    grain: Array) -> Array:
    """Each token's id through its granularity's table (one table: all).

    Ids are clipped into the table, so an id of another granularity's
    vocabulary (only ever at a token whose row is then not selected, or a
    pad, which is zeroed) never reads out of range.
    """
    read = lambda table: table(jnp.clip(ids, 0, table.num_embeddings - 1))
    if len(tables) == 1:
      return read(tables[0])
    out = jnp.zeros(ids.shape + (self.width,), self.dtype or jnp.float32)
    for k, table in enumerate(tables):
      out = jnp.where((grain == k)[..., None], read(table), out)
    return out

  def position_embedding(self, position: Array, grain: Array) -> Array:
    """Each token's position through its granularity's table (or the
    shared one)."""
    return self._grain_lookup(self.position_embs, position, grain)

  def embed_tokens(self, content: Array, position: Array, grain: Array,
                   pad: Array | None, abs_index: Array) -> Array:
    """Input embedding of (B, T) tokens at rows `abs_index` of `pos_emb`.

    `abs_index` is `layout.absolute_index` of the slots (see
    `dqvq.sequence`). Pad slots embed to zero: they are hidden as attention
    keys, and a pad slot whose output is used (slot layouts: the last pad of
    a stream predicts the next stream's sos) then depends on no pad
    embedding either.
    """
    x = (self._grain_lookup(self.content_embs, content, grain)
         + self.position_embedding(position, grain))
    if self.granularity_embedding:
      x = x + self.seg_emb(grain)
    if self.absolute_position_embedding:
      abs_pos = jnp.take(self.pos_emb[0], abs_index, axis=0)
      x = x + abs_pos.astype(self.dtype or jnp.float32)
    return x if pad is None else jnp.where(pad[..., None], 0.0, x).astype(
        x.dtype)

  def next_position_embedding(self, next_position: Array, next_grain: Array,
                              next_pad: Array | None = None) -> Array:
    """What the content stack is told at slot t: where slot t+1 goes.

    Zero when slot t+1 is a pad (after an eos), so no pad row is ever read.
    """
    emb = self.position_embedding(next_position, next_grain)
    if next_pad is None:
      return emb
    return jnp.where(next_pad[..., None], 0.0, emb).astype(emb.dtype)

  def __call__(self, inputs: dict[str, Array], next_position: Array,
               next_grain: Array, train: bool = False,
               next_pad: Array | None = None) -> tuple[Array, Array]:
    """Teacher-forced logits for every input slot.

    Args:
      inputs: (B, T) 'content', 'position', 'grain', 'pad' (slots 0..T-1).
      next_position, next_grain: (B, T) the position token at slot t+1 and its
        granularity, which the content stack is given at slot t.
      train: dropout on.
      next_pad: (B, T) whether slot t+1 is a pad.

    Returns:
      (position_logits (B, T, position_logits_size),
       content_logits (B, T, content_vocab_size)), float32.
    """
    mask = attention.attention_mask(inputs['pad'])
    x = self.embed_tokens(inputs['content'], inputs['position'],
                          inputs['grain'], inputs['pad'],
                          self.layout.absolute_index(inputs['pad']))
    x = self.embed_drop(x, deterministic=not train)
    for blk in self.position_blocks:
      x = blk(x, mask, train)
    h = x + self.next_position_embedding(next_position, next_grain, next_pad)
    for blk in self.content_blocks:
      h = blk(h, mask, train)
    pos_logits = self.position_head(self.position_head_ln(x))
    con_logits = self.content_head(self.content_head_ln(h))
    return pos_logits.astype(jnp.float32), con_logits.astype(jnp.float32)

  # --------------------------------------------------------------------------
  # Decoding with a KV cache (sampling): one new slot per call, both stacks.
  # --------------------------------------------------------------------------

  def init_cache(self, batch: int, length: int | None = None
                 ) -> dict[str, list[tuple[Array, Array]]]:
    """Zero (keys, values) per block, (B, heads, length, head dim).

    `length` defaults to layout.length - 1 (every input slot); the decode
    calls attend over whatever length the cache has (a sampler may grow it).

    Explicit arrays rather than flax's 'cache' collection, so the sampler can
    carry them through `lax.while_loop` and index them by a traced slot.
    Which slots hold real keys is not stored here: the sampler passes the
    (B, T) key mask (written and not pad) to every decode call.
    """
    shape = (batch, self.num_heads, length or self.layout.length - 1,
             self.width // self.num_heads)
    dtype = self.dtype or jnp.float32
    zeros = lambda n: [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                       for _ in range(n)]
    return {'position': zeros(self.position_layers),
            'content': zeros(self.content_layers)}

  def decode_position(self, tokens: dict[str, Array], slot: Array,
                      key_valid: Array, cache: list[tuple[Array, Array]]
                      ) -> tuple[Array, Array, list[tuple[Array, Array]]]:
    """Position stack on the (B,) tokens at input slot `slot` (a scalar).

    `tokens` holds (B,) 'content', 'position', 'grain', 'pad' and
    'abs_index' (each sample's `layout.absolute_index` at `slot`).
    Returns (position logits (B, P) float32, H_p (B, E), new cache): what the
    full forward gives at that slot, at one token's cost.
    """
    x = self.embed_tokens(tokens['content'][:, None],
                          tokens['position'][:, None],
                          tokens['grain'][:, None], tokens['pad'][:, None],
                          tokens['abs_index'][:, None])
    new_cache = []
    for blk, layer_cache in zip(self.position_blocks, cache):
      x, layer_cache = blk(x, key_valid, False, layer_cache, slot)
      new_cache.append(layer_cache)
    logits = self.position_head(self.position_head_ln(x))
    return logits[:, 0].astype(jnp.float32), x[:, 0], new_cache

  def decode_content(self, h_p: Array, next_position: Array,
                     next_grain: Array, next_pad: Array, slot: Array,
                     key_valid: Array, cache: list[tuple[Array, Array]]
                     ) -> tuple[Array, list[tuple[Array, Array]]]:
    """Content stack at `slot` given H_p there and slot+1's (B,) position."""
    h = h_p[:, None] + self.next_position_embedding(
        next_position[:, None], next_grain[:, None], next_pad[:, None])
    new_cache = []
    for blk, layer_cache in zip(self.content_blocks, cache):
      h, layer_cache = blk(h, key_valid, False, layer_cache, slot)
      new_cache.append(layer_cache)
    logits = self.content_head(self.content_head_ln(h))
    return logits[:, 0].astype(jnp.float32), new_cache


def check_input_layers(switches: dict[str, Any]) -> None:
  """Refuses, naming the config field, a switch value that means nothing.

  Called by `DQTransformer.validate` and by `config_lib.validate_config`,
  which runs before a two-stage run trains its tokenizer.
  """
  for field in ('content_sharing', 'position_sharing'):
    value = switches[field]
    if value not in SHARING:
      raise ValueError(
          f'config.model.{field}={value!r}; choose one of {SHARING}: one '
          'table for every granularity, or one per granularity (paper '
          'Table 7).')
  for field in ('granularity_embedding', 'absolute_position_embedding'):
    value = switches[field]
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f'config.model.{field}={value!r}; it must be True or '
                       'False (paper Table 7).')


def input_layer_kwargs(model_config: Any = None) -> dict[str, Any]:
  """The input-layer switches of a `config.model` (or the defaults).

  A field the config lacks takes the module's default: configs saved before
  the switches existed trained the paper's input layers.
  """
  fields = DQTransformer.__dataclass_fields__
  return {f: (model_config or {}).get(f, fields[f].default)
          for f in INPUT_LAYER_FIELDS}


def paper_kwargs(size: str = 'base') -> dict[str, Any]:
  """The paper's DQ-Transformer widths: base (6 + 18) or large (6 + 42)."""
  if size not in ('base', 'large'):
    raise ValueError(f'size={size!r}; choose base or large.')
  return dict(width=1024, num_heads=8, position_layers=6,
              content_layers=18 if size == 'base' else 42, block_size=2048,
              mlp_ratio=4, embed_dropout=0.1, attn_dropout=0.1,
              resid_dropout=0.1)


def tiny_kwargs() -> dict[str, Any]:
  """Toy widths for CPU tests (`:runlocal`)."""
  return dict(width=32, num_heads=2, position_layers=1, content_layers=1,
              block_size=1024, mlp_ratio=4, embed_dropout=0.0,
              attn_dropout=0.0, resid_dropout=0.0)


def from_config(model_config: Any, layout: sequence.StreamLayout,
                dtype: Any = None) -> DQTransformer:
  """The DQTransformer of a `config.model` over `layout`, validated.

  The one way a config becomes this model: the trainer, the generator and
  the official converter all build it here.
  """
  m = model_config
  model = DQTransformer(
      layout, width=m.width, num_heads=m.num_heads,
      position_layers=m.position_layers, content_layers=m.content_layers,
      block_size=m.block_size, mlp_ratio=m.mlp_ratio,
      embed_dropout=m.embed_dropout, attn_dropout=m.attn_dropout,
      resid_dropout=m.resid_dropout, dtype=dtype,
      remat=bool(m.get('remat', False)), **input_layer_kwargs(m))
  model.validate()
  return model


def init_variables(model: DQTransformer, rng: Array) -> Any:
  """Boxed (logically partitioned) variables, from one dummy sequence."""
  t = model.layout.length - 1
  ints = jnp.zeros((1, t), jnp.int32)
  x = {'content': ints, 'position': ints, 'grain': ints,
       'pad': jnp.zeros((1, t), bool)}
  return model.init({'params': rng, 'dropout': rng}, x, x['position'],
                    x['grain'])


def abstract_params(model: DQTransformer) -> Any:
  """Shapes of the unboxed params (what a checkpoint restores into)."""
  return jax.eval_shape(
      lambda r: nn.unbox(init_variables(model, r)['params']),
      jax.random.key(0))
