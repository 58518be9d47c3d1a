"""Stage-1 losses: VQGAN's reconstruction + GAN terms and the budget loss.

L_G = nll + lambda_adv * disc_factor * g + codebook_weight * L_q + L_budget
L_D = disc_factor * hinge(D(x), D(sg(x_hat)))

with nll = mean |x - x_hat| + perceptual_weight * mean LPIPS(x, x_hat) and
lambda_adv the adaptive weight of VQGAN (gradient-norm ratio at the decoder's
last layer). Numerics follow the official `vqperceptual_multidisc.py` and
`budget.py`; see the reference notes for where that differs from the paper.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from dqvq.models import grain as grain_lib

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
                     padding: int = 1) -> Array:
  """Gradient of a loss w.r.t. a stride-1 conv's kernel.

  A convolution is linear in its kernel, so d loss / d W depends only on the
  conv's input `features` and the cotangent `d_out` of its output; this lets
  the adaptive weight be formed without re-running the decoder.
  """
  c_in, c_out = features.shape[-1], d_out.shape[-1]

  def conv(kernel):
    return jax.lax.conv_general_dilated(
        features.astype(jnp.float32), kernel, (1, 1),
        ((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)

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


def adaptive_gan_weight(x_hat: Array, last_layer_input: Array,
                        nll_fn: Callable[[Array], Array],
                        g_fn: Callable[[Array], Array],
                        disc_weight: float = 1.0,
                        max_weight: float | None = 0.75) -> Array:
  """The adaptive weight from gradients at the decoder's conv_out kernel.

  Args:
    x_hat: the reconstruction (conv_out's output).
    last_layer_input: conv_out's input (see `Decoder`).
    nll_fn, g_fn: x_hat -> reconstruction loss / generator GAN loss.
  """
  x_hat = jax.lax.stop_gradient(x_hat)
  feats = jax.lax.stop_gradient(last_layer_input)
  nll_grad = conv_kernel_grad(feats, jax.grad(nll_fn)(x_hat))
  g_grad = conv_kernel_grad(feats, jax.grad(g_fn)(x_hat))
  return adaptive_weight(nll_grad, g_grad, disc_weight, max_weight)


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
