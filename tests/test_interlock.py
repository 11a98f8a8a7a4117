"""The gradient contract (docs/design.md): hand-worked cases, equivalences and the spec oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ilbp
from ilbp.interlock import plan_variants
from ilbp.strategy import Strategy

# --- Hand-worked cases -----------------------------------------------------------------------
# Scalar linear stages f_k(θ, a) = θ·a, heads h_k(φ, a) = φ·a and the identity loss L = z, so
# every gradient is a product of integers that we work out by hand from
#   a_k = θ_1···θ_k·x,  L_j = φ_j·a_j (j < K),  L_K = a_K.

lin = lambda p, a: p * a
ident = lambda z, y: z


def _hand(thetas, phis, strategy):
  K = len(thetas)
  sg, hg, metrics = ilbp.interlocking_grads(
    [lin] * K,
    [lin] * (K - 1),
    [jnp.float32(t) for t in thetas],
    [jnp.float32(p) for p in phis],
    jnp.float32(1.0),
    None,
    strategy=strategy,
    loss_fn=ident,
  )
  return [float(g) for g in sg], [float(g) for g in hg], metrics


# K = 4, θ = (2, 3, 5, 7), φ = (11, 13, 17), x = 1  →  a = (1, 2, 6, 30, 210).
#   global furthest: ∂L_4/∂θ_k = 210/θ_k                          = (105, 70, 42, 30)
#   local:           ∂L_k/∂θ_k with a_{k-1} fixed = φ_k·a_{k-1}    = (11, 26, 102, 30)
#   pairwise furth.: θ_1 ← L_2: φ_2θ_2a_0 = 39; θ_2 ← L_3: φ_3θ_3a_1 = 170; θ_3 ← L_4: θ_4a_2 = 42
#   pairwise sum:    local + pairwise furthest for k < K           = (50, 196, 144, 30)
#   3wise furthest:  θ_1 ← L_3: φ_3θ_3θ_2a_0 = 255; θ_2 ← L_4 (stages 2..4 only): θ_4θ_3a_1 = 70
#   3wise sum:       θ_1: 11+39+255; θ_2: 26+170+70; θ_3: 102+42  = (305, 266, 144, 30)
#   global sum:      θ_1 adds L_4: 305+105 = 410; others as 3wise sum
K4 = ((2, 3, 5, 7), (11, 13, 17))
K4_EXPECTED = {
  ("global", "furthest"): [105, 70, 42, 30],
  ("local", "furthest"): [11, 26, 102, 30],
  ("local", "sum"): [11, 26, 102, 30],
  ("pairwise", "furthest"): [39, 170, 42, 30],
  ("pairwise", "sum"): [50, 196, 144, 30],
  ("3wise", "furthest"): [255, 70, 42, 30],
  ("3wise", "sum"): [305, 266, 144, 30],
  ("global", "sum"): [410, 266, 144, 30],
}

# K = 3, θ = (2, 3, 5), φ = (7, 11), x = 1  →  a = (1, 2, 6, 30).
#   global: 30/θ_k = (15, 10, 6); local: (7, 22, 6); pairwise furthest: θ_1 ← L_2: φ_2θ_2 = 33,
#   θ_2 ← L_3: θ_3a_1 = 10; pairwise sum: (7+33, 22+10, 6).
K3 = ((2, 3, 5), (7, 11))
K3_EXPECTED = {
  ("global", "furthest"): [15, 10, 6],
  ("local", "furthest"): [7, 22, 6],
  ("pairwise", "furthest"): [33, 10, 6],
  ("pairwise", "sum"): [40, 32, 6],
  ("global", "sum"): [15 + 7 + 33, 22 + 10, 6],
}


@pytest.mark.parametrize("case, expected", [(K4, K4_EXPECTED), (K3, K3_EXPECTED)])
def test_hand_worked_gradients(case, expected):
  thetas, phis = case
  activations = np.cumprod(thetas)
  for (name, combine), want in expected.items():
    sg, hg, metrics = _hand(thetas, phis, ilbp.strategy(name, combine))
    assert sg == want, (name, combine)
    # A head always learns from its own loss only: ∂L_k/∂φ_k = a_k.
    assert hg == list(activations[:-1])
    losses = [metrics[f"head{k + 1}/loss"] for k in range(len(thetas))]
    np.testing.assert_allclose(losses, [*(np.array(phis) * activations[:-1]), activations[-1]])


def test_own_head_does_not_train_its_stage_under_furthest():
  # Pairwise furthest, K = 4: stage 2 learns from L_3 only, so φ_2 cannot change its gradient.
  a = _hand((2, 3, 5, 7), (11, 13, 17), ilbp.strategy("pairwise"))[0]
  b = _hand((2, 3, 5, 7), (11, 999, 17), ilbp.strategy("pairwise"))[0]
  assert a[1] == b[1] and a[0] != b[0]  # ... but φ_2 is what stage 1 learns from.


# --- Random heterogeneous networks -----------------------------------------------------------


def _xent(logits, y):
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def _mse(logits, y):
  return 0.5 * jnp.mean((logits - jax.nn.one_hot(y, logits.shape[-1])) ** 2)


def _random_net(K, seed, classes=4):
  """K stages of different kinds and widths, parameter trees of different structure."""
  rng = np.random.default_rng(seed)
  widths = [3, *rng.integers(2, 7, size=K - 1), classes]
  kinds = ["tanh", "gelu_res", "sin"]
  stage_fns, stage_params, head_fns, head_params = [], [], [], []
  for k in range(K):
    din, dout = int(widths[k]), int(widths[k + 1])
    w = rng.normal(size=(din, dout)).astype(np.float32) / np.sqrt(din)
    kind = "linear" if k == K - 1 else kinds[k % 3]
    if kind == "tanh":
      stage_params.append({"w": w, "b": rng.normal(size=dout).astype(np.float32)})
      stage_fns.append(lambda p, a: jnp.tanh(a @ p["w"] + p["b"]))
    elif kind == "gelu_res":
      v = rng.normal(size=(din, dout)).astype(np.float32) / np.sqrt(din)
      stage_params.append([w, v])
      stage_fns.append(lambda p, a: jax.nn.gelu(a @ p[0]) + jnp.sin(a @ p[1]))
    elif kind == "sin":
      stage_params.append({"w": w, "scale": np.float32(1.3)})
      stage_fns.append(lambda p, a: p["scale"] * jnp.sin(a @ p["w"]))
    else:
      stage_params.append({"w": w})
      stage_fns.append(lambda p, a: a @ p["w"])
    if k < K - 1:
      head_params.append({"w": rng.normal(size=(dout, classes)).astype(np.float32)})
      head_fns.append(lambda p, a: (a**2 + a) @ p["w"])
  x = rng.normal(size=(6, 3)).astype(np.float32)
  y = rng.integers(0, classes, size=6)
  return stage_fns, head_fns, stage_params, head_params, x, y


def _partial_grad(net, j, k, n, loss_fn, aux_loss_fn):
  """∂L_j/∂θ_k with L_j's view starting at a detached a_{lo-1}, lo = max(0, j-n+1): an oracle
  written from the contract alone, independent of the engine and of `loss_users`."""
  stage_fns, head_fns, sp, hp, x, y = net
  K = len(stage_fns)
  lo = max(0, j - n + 1)
  a = x
  for i in range(lo):
    a = stage_fns[i](sp[i], a)

  def loss_j(theta_k):
    z = a
    for i in range(lo, j + 1):
      z = stage_fns[i](theta_k if i == k else sp[i], z)
    return loss_fn(z, y) if j == K - 1 else aux_loss_fn(head_fns[j](hp[j], z), y)

  return jax.grad(loss_j)(sp[k])


def _oracle(net, strategy, loss_fn, aux_loss_fn):
  K = len(net[0])
  n = strategy.reach_for(K)
  grads = []
  for k in range(K):
    t = min(k + n - 1, K - 1)
    js = [t] if strategy.combine == "furthest" else range(k, t + 1)
    terms = [_partial_grad(net, j, k, n, loss_fn, aux_loss_fn) for j in js]
    grads.append(jax.tree.map(lambda *g: sum(g), *terms))
  return grads


def _assert_trees_close(a, b, tol=2e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_engine_equals_spec_and_oracle_every_reach(K):
  for n in range(1, K + 2):
    for combine in ("furthest", "sum"):
      net = _random_net(K, seed=10 * K + n)
      strategy = Strategy(n, combine)
      kw = dict(strategy=strategy, loss_fn=_xent, aux_loss_fn=_mse)
      stage_grads, head_grads, _ = ilbp.interlocking_grads(*net, **kw)
      spec = jax.grad(
        lambda s, h, net=net, kw=kw: ilbp.interlocking_loss(net[0], net[1], s, h, *net[4:], **kw),
        (0, 1),
      )(net[2], net[3])
      _assert_trees_close((stage_grads, head_grads), spec)
      _assert_trees_close(stage_grads, _oracle(net, strategy, _xent, _mse))


def test_global_is_end_to_end_backprop():
  net = _random_net(4, seed=1)
  stage_fns, _, sp, _, x, y = net

  def end_to_end(sp):
    a = x
    for f, p in zip(stage_fns, sp):
      a = f(p, a)
    return _xent(a, y)

  stage_grads, head_grads, _ = ilbp.interlocking_grads(
    *net, strategy=ilbp.strategy("global"), loss_fn=_xent
  )
  _assert_trees_close(stage_grads, jax.grad(end_to_end)(sp))
  # Heads train on their own losses from detached activations.
  baseline = ilbp.interlock.backprop_grads(*net, loss_fn=_xent)
  _assert_trees_close((stage_grads, head_grads), baseline)


def test_local_is_each_stage_alone_with_detached_input():
  net = _random_net(4, seed=2)
  stage_fns, head_fns, sp, hp, x, y = net
  acts = [x]
  for f, p in zip(stage_fns, sp):
    acts.append(f(p, acts[-1]))
  expected = []
  for k, f in enumerate(stage_fns):
    a_in = jax.lax.stop_gradient(acts[k])
    if k < 3:
      loss = lambda p, f=f, k=k, a_in=a_in: _xent(head_fns[k](hp[k], f(p, a_in)), y)
    else:
      loss = lambda p, f=f, a_in=a_in: _xent(f(p, a_in), y)
    expected.append(jax.grad(loss)(sp[k]))
  stage_grads, _, _ = ilbp.interlocking_grads(*net, strategy=ilbp.strategy("local"), loss_fn=_xent)
  _assert_trees_close(stage_grads, expected)


def test_reach_at_least_k_equals_global():
  net = _random_net(4, seed=3)
  ref = ilbp.interlocking_grads(*net, strategy=ilbp.strategy("global"), loss_fn=_xent)[:2]
  for n in (4, 5, 9):
    got = ilbp.interlocking_grads(*net, strategy=Strategy(n), loss_fn=_xent)[:2]
    _assert_trees_close(got, ref, tol=0)


def test_sum_minus_furthest_is_the_nearer_losses():
  # "sum" - "furthest" at stage k = Σ_{j=k..t(k)-1} ∂L_j/∂θ_k, exactly what the spec says.
  net = _random_net(5, seed=4)
  K, n = 5, 3
  kw = dict(loss_fn=_xent)
  furthest = ilbp.interlocking_grads(*net, strategy=Strategy(n, "furthest"), **kw)[0]
  summed = ilbp.interlocking_grads(*net, strategy=Strategy(n, "sum"), **kw)[0]
  for k in range(K):
    t = min(k + n - 1, K - 1)
    nearer = [_partial_grad(net, j, k, n, _xent, _xent) for j in range(k, t)]
    diff = jax.tree.map(lambda s, f: s - f, summed[k], furthest[k])
    want = (
      jax.tree.map(lambda *g: sum(g), *nearer) if nearer else jax.tree.map(jnp.zeros_like, diff)
    )
    _assert_trees_close(diff, want)


def test_jit_equals_eager():
  net = _random_net(4, seed=5)
  for name in ("local", "pairwise", "3wise", "global"):
    fn = functools.partial(
      ilbp.interlocking_grads, net[0], net[1], strategy=ilbp.strategy(name), loss_fn=_xent
    )
    eager = fn(*net[2:])
    jitted = jax.jit(fn)(*net[2:])
    _assert_trees_close(eager, jitted, tol=1e-5)


def test_mismatched_lengths_name_the_counts():
  net = _random_net(3, seed=6)
  stage_fns, head_fns, sp, hp, x, y = net
  kw = dict(strategy=ilbp.strategy("pairwise"), loss_fn=_xent)
  with pytest.raises(ValueError, match="3 stage functions and 1 head functions"):
    ilbp.interlocking_grads(stage_fns, head_fns[:1], sp, hp, x, y, **kw)
  with pytest.raises(ValueError, match="2 stage parameter trees"):
    ilbp.interlocking_grads(stage_fns, head_fns, sp[:2], hp, x, y, **kw)
  with pytest.raises(ValueError, match="1 head parameter trees"):
    ilbp.interlocking_loss(stage_fns, head_fns, sp, hp[:1], x, y, **kw)
  with pytest.raises(ValueError, match="Unknown strategy"):
    ilbp.interlocking_grads(*net, strategy="twowise", loss_fn=_xent)


def test_loss_users_table():
  # Which stages each loss trains (0-based), K = 4.
  assert ilbp.loss_users(ilbp.strategy("local"), 4) == [[0], [1], [2], [3]]
  assert ilbp.loss_users(ilbp.strategy("pairwise"), 4) == [[], [0], [1], [2, 3]]
  assert ilbp.loss_users(ilbp.strategy("global"), 4) == [[], [], [], [0, 1, 2, 3]]
  assert ilbp.loss_users(ilbp.strategy("pairwise", "sum"), 4) == [[0], [0, 1], [1, 2], [2, 3]]


def test_plan_variants_keep_one_of_each_plan_in_the_order_given():
  # Local has one plan under both rules; at K = 2 pairwise reaches every stage: it is global.
  assert plan_variants(2, ["local", "pairwise", "global"], ["sum", "furthest"]) == [
    ("local", "sum", False),
    ("global", "sum", True),
    ("global", "furthest", True),
  ]
  # One rule: nothing to tell apart, every strategy once.
  assert plan_variants(3, ["local", "pairwise"], ["furthest"]) == [
    ("local", "furthest", False),
    ("pairwise", "furthest", False),
  ]
