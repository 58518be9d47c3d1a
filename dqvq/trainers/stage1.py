"""Stage 1: training DQ-VAE with its GAN, one jitted step per batch.

One step = one generator forward, reused for both updates (the official
Lightning module runs the forward twice, so it draws the Gumbel noise and
updates the EMA codebook twice per batch; we do each once):

  1. generator loss nll + lambda_adv * g + L_q + L_budget, its gradient, Adam;
  2. the EMA codebook state that the same forward produced;
  3. discriminator hinge loss on (x, sg(x_hat)), its gradient, Adam.

The discriminator therefore sees the reconstruction of the pre-update
generator (the official sees the post-update one); both are valid GAN
alternations and this one halves the cost.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dqvq import config_lib
from dqvq.cpu import tuning as cpu_tuning
from dqvq import losses
from dqvq.models import discriminator as disc_lib
from dqvq.models import dqvae
from dqvq.models import perceptual
from dqvq.models import quantizer
from dqvq import sharding
from dqvq.trainers import optim
from dqvq.trainers import task as task_lib
from dqvq import visualize

Array = jax.Array


@flax.struct.dataclass
class Stage1State:
  """Everything a step changes; one pytree, donated to the step."""
  step: Array
  params: Any          # DQ-VAE 'params'
  codebook: Any        # DQ-VAE 'codebook' (the quantizer's state: the EMA
  #                      codebook, or FSQ's constant levels; not trained by
  #                      gradients)
  opt_state: Any
  disc_params: Any
  disc_batch_stats: Any
  disc_opt_state: Any
  rng: Array


@flax.struct.dataclass
class Stage1Setup:
  """What a stage-1 step closes over (not state): the modules, their
  optimizers, the schedule and the config."""
  vae: dqvae.DQVAE = flax.struct.field(pytree_node=False)
  disc: disc_lib.NLayerDiscriminator | None = flax.struct.field(
      pytree_node=False)
  lpips: perceptual.LPIPS | None = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  disc_tx: optax.GradientTransformation | None = flax.struct.field(
      pytree_node=False)
  schedule: Any = flax.struct.field(pytree_node=False)
  config: Any = flax.struct.field(pytree_node=False)


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  return config.loss.disc_weight > 0


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
  return config.loss.perceptual_weight > 0


def build_models(config: ml_collections.ConfigDict,
                 cpu_kernels: bool = False) -> Stage1Setup:
  """The step's modules; `cpu_kernels` from the mesh (dqvq.cpu.tuning)."""
  dtype = config_lib.compute_dtype(config)
  vae = dqvae.from_config(config.model, dtype, cpu_kernels=cpu_kernels)
  schedule = optim.learning_rate_schedule(config)
  tx = optim.adam(config, schedule)
  router_lr = config.optim.get('router_lr_multiplier', 1.0)
  if router_lr != 1.0 and vae.router == 'feature' and vae.num_grains > 1:
    # Only then: the optimizer state of other models keeps its tree.
    tx = optax.chain(tx, optax.masked(optax.scale(router_lr),
                                      optim.subtree_mask('grain_router')))
  disc = disc_tx = lpips = None
  if uses_gan(config):
    disc = disc_lib.NLayerDiscriminator(
        ndf=config.disc.ndf, n_layers=config.disc.n_layers, dtype=dtype,
        cpu_kernels=cpu_kernels)
    disc_tx = optim.adam(config, schedule)
  if uses_lpips(config):
    lpips = perceptual.LPIPS(dropout=config.loss.lpips_dropout, dtype=dtype,
                             cpu_kernels=cpu_kernels)
  return Stage1Setup(vae, disc, lpips, tx, disc_tx, schedule, config)


def init_state(models: Stage1Setup, rng: Array,
               image_shape: tuple[int, ...]) -> Stage1State:
  """Fresh state; jit it with out_shardings to create it sharded."""
  init_rng, disc_rng, state_rng = jax.random.split(rng, 3)
  x = jnp.zeros(image_shape, jnp.float32)
  variables = models.vae.init(
      {'params': init_rng, 'gumbel': init_rng, 'restart': init_rng,
       'router': init_rng, 'dropout': init_rng}, x)
  params = variables['params']
  disc_params = disc_stats = disc_opt = {}
  if models.disc is not None:
    dv = models.disc.init(disc_rng, x, train=False)
    disc_params, disc_stats = dv['params'], dv.get('batch_stats', {})
    disc_opt = models.disc_tx.init(disc_params)
  return Stage1State(
      step=jnp.zeros((), jnp.int32), params=params,
      codebook=variables['codebook'], opt_state=models.tx.init(params),
      disc_params=disc_params, disc_batch_stats=disc_stats,
      disc_opt_state=disc_opt, rng=state_rng)


def _rngs(state: Stage1State) -> dict[str, Array]:
  """Per-step named streams from one base key: fold_in(key, step)."""
  keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 4)
  return dict(zip(('gumbel', 'restart', 'router', 'dropout'), keys))


def _disc_logits(models: Stage1Setup, params: Any, stats: Any,
                 images: Array) -> tuple[Array, Any]:
  """Discriminator logits (float32) and its updated batch statistics."""
  logits, new = models.disc.apply(
      {'params': params, 'batch_stats': stats}, images, train=True,
      mutable=['batch_stats'])
  return logits.astype(jnp.float32), new['batch_stats']


def generator_gradients(models: Stage1Setup, state: Stage1State,
                        batch: dict[str, Array], lpips_params: Any
                        ) -> tuple[Any, Array, Any, dict[str, Array]]:
  """The generator loss's gradient from one forward: (grads, x_hat, codebook,
  metrics). `train_step` applies it; tests compare it with `jax.grad` of the
  loss written out plainly (tests/test_stage1_gradients.py)."""
  cfg = models.config
  x = batch['image']
  rngs = _rngs(state)
  gan = models.disc is not None
  factor = losses.disc_factor(state.step, cfg.loss.disc_start)

  def rec_loss(x_hat):
    nll = losses.l1_loss(x, x_hat)
    if models.lpips is not None:
      p = models.lpips.apply({'params': lpips_params}, x, x_hat,
                             train=cfg.loss.lpips_dropout > 0,
                             rngs={'dropout': rngs['dropout']})
      nll = nll + cfg.loss.perceptual_weight * jnp.mean(p)
    return nll

  def vae_forward(params):
    """x_hat and the loss terms that do not go through it (L_q, budget)."""
    out, new_vars = models.vae.apply(
        {'params': params, 'codebook': state.codebook}, x, train=True,
        rngs=rngs, mutable=['codebook'])
    budget = losses.budget_loss(
        out['gate'], models.vae.grain_factors, models.vae.grain_ratios,
        cfg.loss.budget_kind if models.vae.router == 'feature' else 'none',
        cfg.loss.budget_weight)
    own = cfg.loss.codebook_weight * out['q_loss'] + budget
    if 'router_loss' in out:  # config.model.router_target != 'none'
      own = own + cfg.loss.get('router_weight', 1.0) * out['router_loss']
    return (out['reconstruction'], own), (out, budget, new_vars['codebook'])

  # The generator loss is nll(x_hat) + lambda_adv * g(x_hat) + own, lambda_adv
  # held constant. Its gradient is taken as a VJP with the cotangent of x_hat
  # assembled by hand: the adaptive weight needs d nll / d x_hat and
  # d g / d x_hat anyway, so LPIPS and the discriminator each run one forward
  # and one backward (a plain jax.grad of the total would repeat both).
  (x_hat, own), vae_vjp, (out, budget, codebook) = jax.vjp(
      vae_forward, state.params, has_aux=True)
  nll, x_cot = jax.value_and_grad(rec_loss)(x_hat)
  total = nll + own
  metrics = {'rec_loss': nll, 'l1_loss': losses.l1_loss(x, x_hat),
             'q_loss': out['q_loss'], 'budget_loss': budget,
             'commitment_loss': out['commitment_loss'],
             'codebook_usage': out['codebook_usage'],
             'perplexity': out['perplexity'],
             'code_length': jnp.mean(out['code_length'].astype(jnp.float32))}
  if 'router_loss' in out:
    metrics['router_loss'] = out['router_loss']
  for k in range(1, models.vae.num_grains):
    metrics[f'ratio_grain{k}'] = jnp.mean(out['gate'][..., k])
  if gan:
    g, g_cot = jax.value_and_grad(lambda y: losses.hinge_g_loss(
        _disc_logits(models, state.disc_params, state.disc_batch_stats,
                     y)[0]))(x_hat)
    weight = losses.adaptive_gan_weight(
        out['decoder_features'], x_cot, g_cot, cfg.loss.disc_weight,
        cfg.loss.disc_weight_max, cpu_kernels=models.vae.cpu_kernels)
    x_cot = x_cot + (weight * factor).astype(g_cot.dtype) * g_cot
    total = total + weight * factor * g
    metrics.update(g_loss=g, adaptive_weight=weight)
  metrics['loss'] = total
  (grads,) = vae_vjp((x_cot, jnp.ones_like(own)))
  return grads, x_hat, codebook, metrics


def train_step(models: Stage1Setup, state: Stage1State,
               batch: dict[str, Array], lpips_params: Any
               ) -> tuple[Stage1State, dict[str, Array]]:
  """One generator + discriminator update from a single generator forward."""
  cfg = models.config
  x = batch['image']
  gan = models.disc is not None
  factor = losses.disc_factor(state.step, cfg.loss.disc_start)
  grads, x_hat, codebook, metrics = generator_gradients(
      models, state, batch, lpips_params)
  updates, opt_state = models.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['learning_rate'] = models.schedule(state.step)

  disc_params, disc_stats, disc_opt = (state.disc_params,
                                       state.disc_batch_stats,
                                       state.disc_opt_state)
  if gan:
    fake = jax.lax.stop_gradient(x_hat)

    def discriminator_loss(dp):
      # Real and fake go through separate calls (separate batch statistics),
      # as the official code does.
      real_logits, stats = _disc_logits(models, dp, disc_stats, x)
      fake_logits, stats = _disc_logits(models, dp, stats, fake)
      loss = factor * losses.hinge_d_loss(real_logits, fake_logits)
      return loss, (stats, jnp.mean(real_logits), jnp.mean(fake_logits))

    (d_loss, (disc_stats, real_mean, fake_mean)), d_grads = jax.value_and_grad(
        discriminator_loss, has_aux=True)(disc_params)
    d_updates, disc_opt = models.disc_tx.update(d_grads, disc_opt, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean)

  new_state = state.replace(
      step=state.step + 1, params=params, codebook=codebook,
      opt_state=opt_state, disc_params=disc_params,
      disc_batch_stats=disc_stats, disc_opt_state=disc_opt)
  return new_state, metrics


def eval_step(models: Stage1Setup, state: Stage1State,
              batch: dict[str, Array]) -> dict[str, Array]:
  """Per-batch sums over real (unpadded) examples; the loop divides."""
  x = batch['image']
  mask = batch['mask'].astype(jnp.float32)
  out = models.vae.apply({'params': state.params, 'codebook': state.codebook},
                         x, train=False, rngs=_rngs(state))
  x_hat = out['reconstruction']
  l1 = jnp.mean(jnp.abs(x - x_hat), axis=(1, 2, 3))
  mse = jnp.mean(((x - x_hat) / 2.0) ** 2, axis=(1, 2, 3))  # in [0, 1] units
  psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
  k = models.vae.codebook_size
  counts = jnp.zeros((k,), jnp.float32).at[out['codes'].reshape(x.shape[0], -1)
                                           ].add(mask[:, None])
  sums = {'l1_loss': jnp.sum(l1 * mask), 'psnr': jnp.sum(psnr * mask),
          'code_length': jnp.sum(out['code_length'] * mask),
          'count': jnp.sum(mask)}
  for g in range(1, models.vae.num_grains):
    sums[f'ratio_grain{g}'] = jnp.sum(
        jnp.mean(out['gate'][..., g], axis=(1, 2)) * mask)
  return {'sums': sums, 'code_counts': counts}


def reconstruct(models: Stage1Setup, state: Stage1State,
                images: Array) -> dict[str, Array]:
  """Reconstructions and grain maps for pictures (eval mode), and with
  several grains also the all-coarsest and all-finest reconstructions."""
  vae = models.vae
  variables = {'params': state.params, 'codebook': state.codebook}
  out = vae.apply(variables, images, train=False, rngs=_rngs(state))
  result = {'reconstruction': jnp.clip(out['reconstruction'], -1, 1),
            'grain_map': out['grain_map']}
  if vae.num_grains > 1:
    for name, grain in (('coarse_only', 0), ('fine_only', vae.num_grains - 1)):
      coded = vae.apply(variables, images, method=vae.encode,
                        grain_map=jnp.full_like(out['grain_map'], grain))
      result[name] = jnp.clip(
          vae.apply(variables, coded['quantized'], method=vae.decode), -1, 1)
  return result


def resolve_entropy_thresholds(config: ml_collections.ConfigDict,
                               workdir: str) -> None:
  """`model.entropy_thresholds='auto'`: a percentile table of the train split.

  Computed once by `dqvq.data.entropy_table` (the table of
  `python -m dqvq.tools.entropy_thresholds`: eval preprocessing at the
  training resolution) from the train split as training reads it, and kept
  in the workdir, so a resumed run routes exactly as before. In a multi-host
  run process 0 scans the split and the other hosts read its file
  (`write_once`).
  """
  m = config.model
  if m.router != 'entropy' or m.get('entropy_thresholds') != 'auto':
    return
  from dqvq.data import entropy_table  # pylint: disable=g-import-not-at-top
  from dqvq.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  default = dqvae.DQVAE.__dataclass_fields__
  field = lambda k: m.get(k, default[k].default)
  m.entropy_thresholds = entropy_table.write_once(
      os.path.join(workdir, 'entropy_thresholds.json'),
      lambda: sources_lib.load_sources(config.data).train,
      dataset=config.data.name, split=config.data.train_split,
      resolution=config.data.resolution, region_size=m.grain_factors[0],
      bin_range=tuple(field('entropy_bin_range')),
      num_bins=field('entropy_num_bins'), sigma=field('entropy_sigma'),
      num_images=config.get('entropy_num_images', 0))


def lpips_params_for(config: ml_collections.ConfigDict) -> Any:
  """Frozen LPIPS weights (or None when the perceptual loss is off)."""
  if not uses_lpips(config):
    return None
  return perceptual.load_lpips_params(config.lpips_weights or None)


def summarize(sums: dict[str, Any]) -> dict[str, float]:
  """Validation figures from the summed `eval_step` outputs of a split."""
  total = dict(sums['sums'])
  n = max(float(total.pop('count')), 1.0)
  result = {f'val/{k}': float(v) / n for k, v in total.items()}
  usage = jax.device_get(quantizer.usage_stats(jnp.asarray(
      sums['code_counts'])))
  result['val/codebook_usage'] = float(usage['codebook_usage'])
  result['val/perplexity'] = float(usage['perplexity'])
  return result


def make_task(config: ml_collections.ConfigDict, workdir: str,
              mesh: jax.sharding.Mesh) -> task_lib.Task:
  """Data, models and step functions of a stage-1 run."""
  # The data stack (grain, TFDS) only here: the step, its benchmarks and the
  # accelerator suite import this module without it.
  from dqvq.data import pipeline  # pylint: disable=g-import-not-at-top
  datasets = pipeline.create_datasets(  # prepares the demo data if needed
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      mesh=mesh, eval_batch_size=config.eval_batch_size)
  resolve_entropy_thresholds(config, workdir)
  models = build_models(config, cpu_tuning.cpu_kernels(mesh))
  res = config.data.resolution
  recon_fn = jax.jit(functools.partial(reconstruct, models))

  def pictures(state, host_batch, frozen, step):
    del frozen, step
    images = host_batch['image'][: config.num_images]
    out = jax.device_get(recon_fn(state, jnp.asarray(images)))
    return visualize.coding_panel(
        images, out['reconstruction'], out['grain_map'],
        models.vae.num_grains, grain_factors=models.vae.grain_factors,
        min_size=128, extra=[out[k] for k in ('coarse_only', 'fine_only')
                             if k in out])

  return task_lib.Task(
      datasets=datasets,
      init=functools.partial(init_state, models, image_shape=(1, res, res, 3)),
      state_shardings=lambda abstract: sharding.infer_state_shardings(
          abstract, mesh),
      train_step=functools.partial(train_step, models),
      eval_step=lambda state, batch, frozen: eval_step(models, state, batch),
      summarize=summarize, pictures=pictures,
      frozen=lpips_params_for(config), batch_keys=('image', 'label', 'mask'))


__all__ = ['Stage1State', 'Stage1Setup', 'build_models', 'init_state',
           'generator_gradients', 'train_step', 'eval_step', 'reconstruct',
           'lpips_params_for', 'make_task']
