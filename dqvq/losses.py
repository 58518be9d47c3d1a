"""Losses: stage 1 (VQGAN reconstruction + GAN terms, budget) and stage 2.

L_G = nll + lambda_adv * disc_factor * g + codebook_weight * L_q + L_budget
L_D = disc_factor * hinge(D(x), D(sg(x_hat)))

with nll = mean |x - x_hat| + perceptual_weight * mean LPIPS(x, x_hat) and
lambda_adv the adaptive weight of VQGAN (gradient-norm ratio at the decoder's
last layer). Numerics follow the official `vqperceptual_multidisc.py` and
`budget.py`; see the reference notes for where that differs from the paper.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dqvq.cpu import fast_conv
from dqvq.models import granularity as grain_lib

Array = jax.Array

BUDGET_KINDS = ('official', 'per_image', 'none')


def l1_loss(x: Array, x_hat: Array) -> Array:
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (E relu(1 - D(x)) + E relu(1 + D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: Array) -> Array:
  """-E D(x_hat): the generator side of the hinge GAN."""
  return -jnp.mean(logits_fake)


def disc_factor(step: Array | int, disc_start: int) -> Array:
  """1 once `step >= disc_start`, else 0 (the official counts epochs; we
  count optimizer steps, which is what a config can state unambiguously)."""
  return jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0)


def conv_kernel_grad(features: Array, d_out: Array, kernel_size: int = 3,
                     padding: int = 1, cpu_kernels: bool = False) -> Array:
  """Gradient of a loss w.r.t. a stride-1 conv's kernel.

  A convolution is linear in its kernel, so d loss / d W depends only on the
  conv's input `features` and the cotangent `d_out` of its output; this lets
  the adaptive weight be formed without re-running the decoder.
  `cpu_kernels`: as the decoder's (XLA:CPU's own kernel gradient is several
  times slower than fast_conv's matmuls; accelerators keep XLA's).
  """
  c_in, c_out = features.shape[-1], d_out.shape[-1]

  def conv(kernel):
    return fast_conv.conv2d(
        features.astype(jnp.float32), kernel, (1, 1),
        ((padding, padding), (padding, padding)),
        precision=jax.lax.Precision.HIGHEST, cpu_kernels=cpu_kernels)

  zero = jnp.zeros((kernel_size, kernel_size, c_in, c_out), jnp.float32)
  _, vjp = jax.vjp(conv, zero)
  return vjp(d_out.astype(jnp.float32))[0]


def adaptive_weight(nll_grad: Array, g_grad: Array, disc_weight: float = 1.0,
                    max_weight: float | None = 0.75) -> Array:
  """VQGAN's lambda = ||grad nll|| / (||grad g|| + 1e-4), clamped.

  Clamped to [0, 1e4], times disc_weight, then to at most `max_weight` (the
  official `disc_weight_max`). No gradient flows through it.
  """
  ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  weight = jnp.clip(ratio, 0.0, 1e4) * disc_weight
  if max_weight is not None:
    weight = jnp.minimum(weight, max_weight)
  return jax.lax.stop_gradient(weight)


def adaptive_gan_weight(last_layer_input: Array, nll_grad: Array,
                        g_grad: Array, disc_weight: float = 1.0,
                        max_weight: float | None = 0.75,
                        cpu_kernels: bool = False) -> Array:
  """The adaptive weight from gradients at the decoder's conv_out kernel.

  Takes the two losses' gradients w.r.t. the reconstruction (conv_out's
  output) rather than the losses themselves: the generator update needs
  exactly those cotangents to backpropagate through the decoder, so the
  step computes each once (one LPIPS and one discriminator backward) and
  hands them to both this weight and the decoder's VJP.

  Args:
    last_layer_input: conv_out's input (see `Decoder`).
    nll_grad, g_grad: d loss / d x_hat of the reconstruction loss and of
      the generator's GAN loss.
    disc_weight, max_weight: see `adaptive_weight`.
    cpu_kernels: the decoder's (see `conv_kernel_grad`).
  """
  feats = jax.lax.stop_gradient(last_layer_input)
  grad = lambda d: conv_kernel_grad(feats, d, cpu_kernels=cpu_kernels)
  return adaptive_weight(grad(nll_grad), grad(g_grad), disc_weight,
                         max_weight)


def budget_loss_official(gate: Array, grain_factors: Sequence[int],
                         grain_ratios: Sequence[float],
                         gamma: float) -> Array:
  """The official batch-mean budget losses, exactly as written.

  Dual (`BudgetConstraint_RatioMSE_DualGrain`, calculate_all=True): with n0
  regions, r = (E_b sum(g0 + 4 g1) - n0) / (4 n0 - n0), loss 2 gamma
  (r - t_fine)^2 (the official adds the same term twice: effective weight
  2 gamma). Triple (`..._NormedSeperateRatioMSE_TripleGrain`):
  (r_med - t_med)^2 + gamma (r_fine - t_fine)^2 with
  r_med = (E_b sum(g0 + 4 g1 + g2) - n0) / (4 n0 - n0),
  r_fine = (E_b sum(g0 + g1 + 16 g2) - n0) / (16 n0 - n0).
  Gradients flow through every gate channel, as in the official code.
  """
  gate = gate.astype(jnp.float32)
  batch = gate.shape[0]
  n0 = gate.shape[1] * gate.shape[2]
  per = grain_lib.codes_per_region(grain_factors)
  sums = gate.sum(axis=(0, 1, 2)) / batch  # expected regions per grain.
  if len(grain_factors) == 2:
    r = (sums[0] + per[1] * sums[1] - n0) / (per[1] * n0 - n0)
    return 2.0 * gamma * (r - grain_ratios[1]) ** 2
  if len(grain_factors) == 3:
    r_med = (sums[0] + per[1] * sums[1] + sums[2] - n0) / (per[1] * n0 - n0)
    r_fine = (sums[0] + sums[1] + per[2] * sums[2] - n0) / (per[2] * n0 - n0)
    return ((r_med - grain_ratios[1]) ** 2 +
            gamma * (r_fine - grain_ratios[2]) ** 2)
  raise ValueError(f'The official budget loss exists for 2 or 3 grains, not '
                   f"{len(grain_factors)}; use budget kind 'per_image'.")


def budget_loss_per_image(gate: Array, grain_ratios: Sequence[float],
                          weight: float) -> Array:
  """Paper Eq. 7: lambda * sum_{k<K} (r_k - r'_k)^2 with per-image shares r'.

  The coarsest grain is left out of the sum (its share is implied); the loss
  is averaged over images.
  """
  shares = gate.astype(jnp.float32).mean(axis=(1, 2))  # (B, K)
  target = jnp.asarray(grain_ratios, jnp.float32)
  return weight * jnp.mean(jnp.sum((shares - target)[:, 1:] ** 2, axis=-1))


def budget_loss(gate: Array, grain_factors: Sequence[int],
                grain_ratios: Sequence[float], kind: str,
                weight: float) -> Array:
  """Dispatches on `kind` in BUDGET_KINDS."""
  if kind == 'official':
    return budget_loss_official(gate, grain_factors, grain_ratios, weight)
  if kind == 'per_image':
    return budget_loss_per_image(gate, grain_ratios, weight)
  if kind == 'none':
    return jnp.zeros((), jnp.float32)
  raise ValueError(f'Unknown budget loss kind {kind!r}; choose one of '
                   f'{BUDGET_KINDS}.')


# -- Stage 2 ------------------------------------------------------------------


def _cross_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
  """Per-token CE and top-1 correctness; targets must index the logits."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return nll, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def token_loss_sums(position_logits: Array, content_logits: Array,
                    targets: dict[str, Array], num_grains: int,
                    example_mask: Array | None = None) -> dict[str, Array]:
  """Summed CE / correct / counts per stream and granularity (no division).

  Sums rather than means so that validation can add batches exactly and
  `token_losses` divides once. Pad targets count nowhere; each position CE
  is grouped by the granularity of the token it predicts (so the boundary
  slot, whose target is the next stream's sos, belongs to the finer stream,
  as in the official split at L_c - 1).
  """
  valid = ~targets['pad']
  if example_mask is not None:
    valid &= example_mask[:, None].astype(bool)
  valid = valid.astype(jnp.float32)
  pos_nll, pos_ok = _cross_entropy(position_logits, targets['position'])
  con_nll, con_ok = _cross_entropy(content_logits, targets['content'])
  sums = {'content_nll': jnp.sum(con_nll * valid),
          'content_correct': jnp.sum(con_ok * valid),
          'content_count': jnp.sum(valid)}
  for k in range(num_grains):
    vk = valid * (targets['grain'] == k)
    sums[f'position_nll_{k}'] = jnp.sum(pos_nll * vk)
    sums[f'position_correct_{k}'] = jnp.sum(pos_ok * vk)
    sums[f'content_nll_{k}'] = jnp.sum(con_nll * vk)
    sums[f'content_correct_{k}'] = jnp.sum(con_ok * vk)
    sums[f'count_{k}'] = jnp.sum(vk)
  return sums


def token_losses(sums: dict[str, Array], num_grains: int,
                 content_weight: float = 1.0,
                 position_weight: float = 1.0) -> dict[str, Array]:
  """The official stage-2 objective and its parts, from `token_loss_sums`.

  loss = content_weight * CE_content (mean over all non-pad targets)
       + position_weight * mean_k CE_position_k (each averaged over its own
         targets, so every granularity weighs the same whatever its length).
  """
  div = lambda a, b: a / jnp.maximum(b, 1.0)
  out = {'content_loss': div(sums['content_nll'], sums['content_count']),
         'content_accuracy': div(sums['content_correct'],
                                 sums['content_count'])}
  per_grain = []
  for k in range(num_grains):
    n = sums[f'count_{k}']
    per_grain.append(div(sums[f'position_nll_{k}'], n))
    out[f'position_loss_{k}'] = per_grain[-1]
    out[f'position_accuracy_{k}'] = div(sums[f'position_correct_{k}'], n)
    out[f'content_loss_{k}'] = div(sums[f'content_nll_{k}'], n)
    out[f'content_accuracy_{k}'] = div(sums[f'content_correct_{k}'], n)
  out['position_loss'] = sum(per_grain) / num_grains
  out['loss'] = (content_weight * out['content_loss'] +
                 position_weight * out['position_loss'])
  return out
