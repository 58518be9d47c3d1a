"""DQ-VAE: the dynamic-grained tokenizer (paper Sec. 3.1).

    x -> HierarchicalEncoder -> per-grain features
      -> router (feature / entropy / random) -> grain map
      -> merge on the finest grid (x gate_scale) -> quant_conv
      -> quantizer (EMA, cosine or FSQ) -> post_quant_conv -> Decoder -> x_hat

Call `apply` with `method=DQVAE.encode`, `DQVAE.decode`, `DQVAE.decode_codes`
or the full forward. Variable collections: 'params' (trainable), 'codebook'
(the quantizer's state: the EMA codebook, mutable in training; FSQ's level
grid, constant). RNG streams in training: 'gumbel'
(feature router), 'restart' (dead codes), 'dropout'; 'router' for the random
router at any time.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dqvq.models import decoder as decoder_lib
from dqvq.models import encoder as encoder_lib
from dqvq.models import entropy as entropy_lib
from dqvq.models import fsq as fsq_lib
from dqvq.models import granularity as grain_lib
from dqvq.models import layers
from dqvq.models import quantizer as quantizer_lib
from dqvq.models import router as router_lib

Array = jax.Array


GATE_GRADIENTS = ('scale', 'mixture', 'codes')
ROUTER_TARGETS = ('none', 'gain', 'error')
# Over what the router target's quota is taken: every image gets the target
# shares ('image'), or the batch as a whole does ('batch').
ROUTER_TARGET_SCOPES = ('image', 'batch')
# config.model.quantizer: 'ema' (official: nearest neighbour, EMA codebook,
# dead-code restart), 'cosine' (the same on l2-normalised features and codes,
# quantizer.CosineQuantizer), 'fsq' (finite scalar quantisation, fsq.py).
QUANTIZERS = ('ema', 'cosine', 'fsq')

# DQVAE fields that are not `config.model` fields: Flax's own, and the run's
# platform choices (set by whoever builds the model, not by a config).
NON_CONFIG_FIELDS = ('parent', 'name', 'dtype', 'cpu_kernels')


class DQVAE(nn.Module):
  """Dynamic-grained VQ autoencoder; one grain is plain VQGAN.

  Attributes are the `config.model` fields (see `paper_kwargs`). Every
  per-grain tuple is ordered coarse to fine; grain id 0 is the coarsest.
  """
  grain_factors: tuple[int, ...] = (16, 8)
  grain_ratios: tuple[float, ...] = (0.5, 0.5)
  # Encoder.
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_factors: tuple[int, ...] = (8, 16)
  z_channels: int = 256
  dropout: float = 0.0
  # GroupNorm groups everywhere (paper and official: 32). A group normalises
  # away its per-image mean and scale, so with one or two channels per group
  # (32 groups at widths 32-64) absolute colour and brightness cannot pass
  # the encoder, and the decoder learns to paint blobs and border streaks to
  # recover them (the StyleGAN "droplet" artifact). Small models want >= 4
  # channels per group; parameter shapes do not depend on it.
  norm_groups: int = 32
  # Decoder.
  dec_ch: int = 128
  dec_ch_mult: tuple[int, ...] = (1, 1, 2, 2)
  dec_num_res_blocks: int = 2
  dec_attn_factors: tuple[int, ...] = (8,)
  position_embedding: str = 'fourier+learned'
  # Quantizer (QUANTIZERS). codebook_size is the vocabulary of stage 2 for
  # every choice; with 'fsq' it must equal prod(fsq_levels).
  quantizer: str = 'ema'
  codebook_size: int = 1024
  # The latent width at the quantizer for 'ema' and 'cosine'. FSQ's latent
  # has one channel per level count instead (`latent_dim`): quant_conv is the
  # projection to it that the FSQ paper puts in front of the rounding.
  codebook_dim: int = 256
  # 'ema' and 'cosine': commitment weight, EMA decay, dead-code restart.
  beta: float = 0.25
  ema_decay: float = 0.99
  restart_unused: bool = True
  # 'fsq': levels per latent channel; (8, 8, 4) is 256 codes, (8, 8, 4, 4)
  # 1024, (8, 5, 5, 5) the paper's 1000.
  fsq_levels: tuple[int, ...] = (8, 8, 4)
  # Router.
  router: str = 'feature'
  gate_type: str = 'mlp'
  gumbel_tau: float = 1.0
  # How the reconstruction loss reaches the feature router in training (the
  # forward pass is the same hard choice either way). 'scale': the paper's
  # Eq. 6 and the official code, the merged features times the chosen soft
  # score; its gradient only says whether the chosen branch should grow, not
  # whether the other branch would do better, so the gate learns the budget
  # but hardly a ranking (benchmarks/README.md, the study). 'mixture': the
  # merged features are the straight-through mix sum_k gate_k * features_k,
  # whose gradient on the logits is <dL/dz, features_fine - features_coarse>:
  # which branch would lower the loss, region by region. 'codes': the same
  # comparison on what the decoder receives, each grain's *quantized* features
  # <dL/dq, q_fine - q_coarse>: a coarse region's one code replicated over
  # its cells against the fine codes, which is where the grains differ (the
  # continuous features of both can be close while their codes are not).
  gate_gradient: str = 'scale'
  # The feature router's inference decision (router.INFERENCE_MODES):
  # 'argmax' (paper, official) or 'expected' (each image's expected count of
  # fine regions, given to its top-ranked ones).
  router_inference: str = 'argmax'
  # What else trains the feature router (ROUTER_TARGETS). 'none': only the
  # reconstruction gradient (`gate_gradient`) and the budget loss, as in the
  # paper. 'gain': also a cross-entropy towards the allocation a greedy
  # oracle would make of this batch at the target shares: every region coded
  # coarse and fine (two extra decoder passes, no gradient), the regions whose
  # error drops most go fine (`grain.region_gain`). 'error': the same
  # cross-entropy towards the regions the all-coarse reconstruction gets
  # most wrong (L1 per region, the paper's Fig. 5 error map; one extra
  # decoder pass): information density, not the fine branch's own gain,
  # which the fine branch's training shapes. Outputs 'router_loss'. The
  # router then reads the encoder's features without back-propagating into
  # them.
  router_target: str = 'none'
  # ROUTER_TARGET_SCOPES: where the target's quota holds. 'image': each image
  # gets the shares exactly (lengths hardly vary); 'batch': the batch's
  # highest-scoring regions, so detailed images get more fine codes, as the
  # official batch-mean budget loss allows.
  router_target_scope: str = 'image'
  # What the feature router reads (router.ROUTER_INPUTS): 'mean' (paper,
  # official), 'mean_std' (also each finer grain's spread in the region) or
  # 'mean_logstd' (that spread before the per-image norm, log-compressed).
  router_inputs: str = 'mean'
  # How the feature router routes in training (router.TRAIN_ROUTINGS):
  # 'gumbel' (paper, official) or 'inference' (its own inference decision,
  # for router_target='gain').
  router_train_routing: str = 'gumbel'
  entropy_thresholds: str | tuple[float, ...] | None = None
  entropy_bin_range: tuple[float, float] = (-1.0, 1.0)
  entropy_num_bins: int = 32
  entropy_sigma: float = 0.01
  dtype: Any = None
  # XLA:CPU's fast convolution gradients (layers.Conv). Not a config field:
  # the trainer sets it from the mesh's platform (dqvq.cpu.tuning), so an
  # accelerator run or export never traces the CPU code.
  cpu_kernels: bool = False

  def setup(self):
    self.validate()
    factors = tuple(self.grain_factors)
    self.encoder = encoder_lib.HierarchicalEncoder(
        factors, self.ch, tuple(self.ch_mult), self.num_res_blocks,
        tuple(self.attn_factors), self.z_channels, self.dropout, self.dtype,
        self.norm_groups, self.cpu_kernels)
    if self.router == 'feature' and len(factors) > 1:
      self.grain_router = router_lib.FeatureRouter(
          factors, self.gate_type, self.gumbel_tau, self.norm_groups,
          self.router_inference, self.router_inputs,
          self.router_train_routing)
    elif self.router == 'entropy':
      self.grain_router = router_lib.EntropyRouter(
          factors, tuple(self.grain_ratios), self.entropy_thresholds,
          tuple(self.entropy_bin_range), self.entropy_num_bins,
          self.entropy_sigma)
    elif self.router == 'random':
      self.grain_router = router_lib.RandomRouter(
          factors, tuple(self.grain_ratios))
    self.quant_conv = layers.Conv(self.latent_dim, 1, padding=0,
                                  cpu_kernels=self.cpu_kernels)
    if self.quantizer == 'fsq':
      self.quantize = fsq_lib.FiniteScalarQuantizer(tuple(self.fsq_levels))
    else:
      cls = {'ema': quantizer_lib.VectorQuantizer,
             'cosine': quantizer_lib.CosineQuantizer}[self.quantizer]
      self.quantize = cls(self.codebook_size, self.codebook_dim, self.beta,
                          self.ema_decay, self.restart_unused)
    self.post_quant_conv = layers.Conv(self.z_channels, 1, padding=0,
                                       cpu_kernels=self.cpu_kernels)
    self.decoder = decoder_lib.Decoder(
        self.dec_ch, tuple(self.dec_ch_mult), self.dec_num_res_blocks,
        tuple(self.dec_attn_factors), 3, self.position_embedding, self.dropout,
        self.dtype, self.norm_groups, self.cpu_kernels)

  def validate(self) -> None:
    """Clear errors for configurations that cannot work, before compiling."""
    factors = tuple(self.grain_factors)
    encoder_lib.validate_grain_factors(factors, len(self.ch_mult))
    grain_lib.validate_grain_ratios(tuple(self.grain_ratios), len(factors))
    if self.router not in router_lib.ROUTERS:
      raise ValueError(f'Unknown router {self.router!r}; choose one of '
                       f'{router_lib.ROUTERS}.')
    if self.gate_gradient not in GATE_GRADIENTS:
      raise ValueError(f'Unknown gate_gradient {self.gate_gradient!r}; choose '
                       f'one of {GATE_GRADIENTS}.')
    if self.router_target not in ROUTER_TARGETS:
      raise ValueError(f'Unknown router_target {self.router_target!r}; choose '
                       f'one of {ROUTER_TARGETS}.')
    if self.router_target_scope not in ROUTER_TARGET_SCOPES:
      raise ValueError('Unknown router_target_scope '
                       f'{self.router_target_scope!r}; choose one of '
                       f'{ROUTER_TARGET_SCOPES}.')
    if self.router_inputs not in router_lib.ROUTER_INPUTS:
      raise ValueError(f'Unknown router_inputs {self.router_inputs!r}; '
                       f'choose one of {router_lib.ROUTER_INPUTS}.')
    if self.router_train_routing not in router_lib.TRAIN_ROUTINGS:
      raise ValueError('Unknown router_train_routing '
                       f'{self.router_train_routing!r}; choose one of '
                       f'{router_lib.TRAIN_ROUTINGS}.')
    if self.router_inference not in router_lib.INFERENCE_MODES:
      raise ValueError(f'Unknown router_inference {self.router_inference!r}; '
                       f'choose one of {router_lib.INFERENCE_MODES}.')
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f'Unknown quantizer {self.quantizer!r}; choose one of '
                       f'{QUANTIZERS}.')
    if self.quantizer == 'fsq':
      fsq_lib.validate_levels(tuple(self.fsq_levels), self.codebook_size)
    if self.router == 'none' and len(factors) > 1:
      raise ValueError("router='none' needs a single grain (plain VQGAN); "
                       'with several grains choose feature, entropy or random.')
    if 2 ** (len(self.dec_ch_mult) - 1) != factors[-1]:
      raise ValueError(
          f'The decoder upsamples by 2^(len(dec_ch_mult) - 1) = '
          f'{2 ** (len(self.dec_ch_mult) - 1)} but the finest grain factor is '
          f'{factors[-1]}; use len(dec_ch_mult) = '
          f'{int(math.log2(factors[-1])) + 1}.')

  @property
  def num_grains(self) -> int:
    return len(self.grain_factors)

  @property
  def latent_dim(self) -> int:
    """Channels of the quantized latents (what decode takes)."""
    return (len(self.fsq_levels) if self.quantizer == 'fsq'
            else self.codebook_dim)

  def route(self, x: Array, features: Sequence[Array], train: bool,
            grain_ratios: Sequence[float] | None) -> router_lib.Routing:
    grid = features[0].shape[1:3]
    if grain_ratios is not None and self.router == 'none':
      raise ValueError('grain_ratios needs a router; this model codes every '
                       'region at one granularity.')
    if self.num_grains == 1 or self.router == 'none':
      return router_lib.fixed_routing(x.shape[0], grid, self.num_grains)
    if self.router == 'feature':
      if self.router_target != 'none':
        # The gate is a predictor trained by its own losses; its
        # cross-entropy must not reshape the encoder's features (it cost the
        # reconstruction 0.8 dB on the demo: 19.44 against 20.22 dB).
        features = [jax.lax.stop_gradient(f) for f in features]
      return self.grain_router(features, train, grain_ratios)
    if self.router == 'entropy':
      return self.grain_router(x, grain_ratios)
    return self.grain_router(x.shape[0], grid, grain_ratios)

  def encode(self, x: Array, train: bool = False,
             grain_ratios: Sequence[float] | None = None,
             grain_map: Array | None = None) -> dict[str, Any]:
    """Images (B, H, W, 3) in [-1, 1] -> codes, grain map, quantized latents.

    `grain_map` (B, H/f_0, W/f_0) bypasses the router: the regions are coded
    at the given grains. That is how the study compares the router's choice
    with random and oracle allocations on one trained model.

    Returns a dict with 'codes' (B, H/f_fine, W/f_fine) on the finest grid
    (a coarse region's code repeated over its cells), 'grain_map' (B, H/f_0,
    W/f_0), 'quantized' (straight-through latents for the decoder), 'gate',
    'logits', 'entropy', 'code_length' (codes per image) and the quantizer's
    losses and usage statistics.
    """
    layers.check_divisible(x.shape[1:3], self.grain_factors[0], 'DQVAE')
    features = self.encoder(x.astype(self.dtype or x.dtype), train)
    if grain_map is not None:
      if grain_ratios is not None:
        raise ValueError('Pass grain_map or grain_ratios, not both.')
      grain_map = jnp.asarray(grain_map, jnp.int32)
      routing = router_lib.Routing(
          grain_map, jax.nn.one_hot(grain_map, self.num_grains))
    else:
      routing = self.route(x, features, train, grain_ratios)
    if routing.gate_scale is not None and self.gate_gradient == 'mixture':
      merged = grain_lib.mix_grains(features, routing.gate, self.grain_factors)
    else:
      merged = grain_lib.merge_grains(features, routing.grain_map,
                                      self.grain_factors)
    if routing.gate_scale is not None and self.gate_gradient == 'scale':
      scale = layers.nearest_upsample(
          routing.gate_scale[..., None],
          self.grain_factors[0] // self.grain_factors[-1])
      merged = merged * scale.astype(merged.dtype)
    mask = grain_lib.code_weight_mask(routing.grain_map, self.grain_factors)
    z = self.quant_conv(merged)
    learned = routing.gate_scale is not None  # feature router, training
    if learned and (self.gate_gradient == 'codes' or
                    self.router_target != 'none'):
      # Every grain's own codes, taken before this step's EMA update like the
      # chosen ones; no gradient.
      coded = [self.quantize.nearest(self.quant_conv(f)) for f in features]
    if learned and self.gate_gradient == 'codes':
      # Zero in the forward pass; on the gate, the gradient of mixing them.
      code_gradient = (
          grain_lib.mix_grains(coded, routing.gate, self.grain_factors) -
          grain_lib.mix_grains(coded, jax.lax.stop_gradient(routing.gate),
                               self.grain_factors))
    quantized, codes, aux = self.quantize(z, mask, train)
    if learned and self.gate_gradient == 'codes':
      quantized = quantized + code_gradient
    if learned and self.router_target != 'none':
      aux['grain_quantized'] = coded
    return {
        'codes': codes, 'grain_map': routing.grain_map, 'quantized': quantized,
        'gate': routing.gate, 'logits': routing.logits,
        'entropy': routing.entropy,
        'code_length': grain_lib.code_length(routing.grain_map,
                                             self.grain_factors),
        **aux,
    }

  def decode(self, quantized: Array, train: bool = False,
             return_features: bool = False) -> Array | tuple[Array, Array]:
    """Quantized latents (B, h, w, D) -> images (B, h*f, w*f, 3).

    With return_features, also returns the input of the decoder's conv_out,
    which the adaptive GAN weight differentiates against.
    """
    h = self.post_quant_conv(quantized.astype(self.dtype or quantized.dtype))
    image, last = self.decoder(h, train)
    image = image.astype(jnp.float32)
    return (image, last) if return_features else image

  def decode_codes(self, codes: Array) -> Array:
    """Code ids on the finest grid (B, h, w) -> images."""
    return self.decode(self.quantize.lookup(codes))

  def __call__(self, x: Array, train: bool = False,
               grain_ratios: Sequence[float] | None = None) -> dict[str, Any]:
    """Full forward: `encode` outputs plus 'reconstruction' and
    'decoder_features' (conv_out's input)."""
    out = self.encode(x, train, grain_ratios)
    recon, last = self.decode(out['quantized'], train, return_features=True)
    out = {**out, 'reconstruction': recon, 'decoder_features': last}
    if 'grain_quantized' in out:
      out['router_loss'] = self.router_target_loss(
          x, out.pop('grain_quantized'), out['logits'])
    return out

  def router_target_loss(self, x: Array, coded: Sequence[Array],
                         logits: Array) -> Array:
    """Cross-entropy of the gate towards an allocation of this batch.

    'gain': the batch is decoded with every region coarse and with every
    region at the finest grain (no gradient); the regions whose squared
    error drops most get the finer grains, in the configured shares
    (`entropy.assign_grains_by_quota`): the allocation the study's greedy
    oracle makes. 'error': decoded all coarse only; the regions with the
    largest L1 error get the finer grains. With scope 'batch' the shares
    hold over the whole batch instead of in every image.
    """
    def decode_all_at(k):
      q = layers.nearest_upsample(
          coded[k], self.grain_factors[k] // self.grain_factors[-1])
      return jax.lax.stop_gradient(self.decode(q))

    region = self.grain_factors[0]
    coarse = decode_all_at(0)
    if self.router_target == 'gain':
      score = grain_lib.region_gain(x, coarse,
                                    decode_all_at(self.num_grains - 1), region)
    else:
      score = grain_lib.region_error(x, coarse, region)
    ratios = tuple(self.grain_ratios)
    if self.router_target_scope == 'batch':
      b, h, w = score.shape
      target = entropy_lib.assign_grains_by_quota(
          score.reshape(1, b * h, w), ratios).reshape(b, h, w)
    else:
      target = entropy_lib.assign_grains_by_quota(score, ratios)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None], -1))


def paper_kwargs(variant: str = 'feature_dual') -> dict[str, Any]:
  """`DQVAE` fields of the official ImageNet models.

  Variants: 'feature_dual' (paper, F={8,16}, r_fine 0.5), 'entropy_dual' (the
  released "better version"), 'triple' (F={8,16,32}, official r-03-03 shares
  coarse 0.4 / median 0.3 / fine 0.3), 'vqgan' (one grain, f=16, the
  fixed-length baseline).
  """
  base = dict(grain_factors=(16, 8), grain_ratios=(0.5, 0.5), ch=128,
              ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_factors=(8, 16),
              z_channels=256, dec_ch=128, dec_ch_mult=(1, 1, 2, 2),
              dec_num_res_blocks=2, dec_attn_factors=(8,),
              codebook_size=1024, codebook_dim=256, router='feature')
  if variant == 'feature_dual':
    return base
  if variant == 'entropy_dual':
    return {**base, 'router': 'entropy'}
  if variant == 'triple':
    return {**base, 'grain_factors': (32, 16, 8), 'grain_ratios': (0.4, 0.3, 0.3),
            'ch_mult': (1, 1, 2, 2, 4, 4), 'attn_factors': (8, 16, 32)}
  if variant == 'vqgan':
    return {**base, 'grain_factors': (16,), 'grain_ratios': (1.0,),
            'router': 'none', 'attn_factors': (16,), 'dec_ch_mult': (1, 1, 2, 2, 4),
            'dec_attn_factors': (16,)}
  raise ValueError(f'Unknown variant {variant!r}; choose feature_dual, '
                   'entropy_dual, triple or vqgan.')


def tiny_kwargs(variant: str = 'feature_dual') -> dict[str, Any]:
  """A paper topology at toy widths, for `:runlocal` configs and tests.

  Same levels, heads, attention placement and routers as `paper_kwargs`, so
  every code path runs, at a cost that fits a laptop CPU.
  """
  kw = paper_kwargs(variant)
  return {**kw, 'ch': 32, 'num_res_blocks': 1, 'z_channels': 32,
          'dec_ch': 32, 'dec_num_res_blocks': 0, 'codebook_size': 64,
          'codebook_dim': 32}


def from_config(model_config: ml_collections.ConfigDict, dtype: Any = None,
                cpu_kernels: bool = False) -> DQVAE:
  """The DQVAE of a `config.model`, validated; unknown fields named.

  The one way a config becomes this model (trainer, tokenizer, converter).
  `cpu_kernels` is the run's platform decision (`dqvq.cpu.tuning`), not a
  config field: a config means the same model on every platform.
  """
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in model_config.to_dict().items()}
  known = set(DQVAE.__dataclass_fields__) - set(NON_CONFIG_FIELDS)
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f'Unknown config.model fields {unknown}; DQVAE takes '
                     f'{sorted(known)}.')
  model = DQVAE(**kwargs, dtype=dtype, cpu_kernels=cpu_kernels)
  model.validate()
  return model
