"""SAE architectures in one process: what each loss and gradient must be, the sparse kernels
against their dense references, deterministic sharded initialisation, and export/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, UserError
from pipeline.parallel import ParallelDims
from pipeline.sae import ARCHITECTURES, SAEConfig, SparseCode, create, load, save
from pipeline.sae.checkpoint import CheckpointFormatError, save_config, save_shard
from pipeline.sae.sparse import dense_decode, dense_gather_linear, gather_dot, gather_linear, sparse_decode
from pipeline.sae.topk import SCAN_EXTRA

D, N = 16, 40


def make(arch: str, features: range | None = None, seed: int = 0, **kw):
    cfg = SAEConfig(architecture=arch, n_features=N, d_model=D, k=4, k_aux=6, dead_tokens=64, **kw)
    sae = create(cfg, features)
    sae.reset_parameters(seed, mean=torch.linspace(-1, 1, D))
    return sae


def data(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_backward(arch):
    sae = make(arch).train()
    out = sae(data())
    assert out.x_hat.shape == (32, D) and out.fired.shape == (N,)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, out.mse + out.sparsity + out.aux)
    torch.testing.assert_close(out.mse, (data() - out.x_hat).pow(2).sum(-1).mean())
    assert out.l0 == out.fired.sum() / 32
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_relu_l1_loss_is_anthropics():
    sae = make("relu_l1", sparsity_coef=5.0)
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # make some latents fire
    x = data()
    f = F.relu(x @ sae.W_enc.T + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    expected = (x - x_hat).pow(2).sum(-1).mean() + 5.0 * 0.5 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(sae(x, sparsity_scale=0.5).loss, expected)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((N,), 0.1))  # small decoder norms
    assert torch.equal(sae.W_enc, sae.W_dec)                               # W_enc = W_dec^T


def dense_topk_reference(sae, x):
    """TopK written the obvious dense way, for comparing values and gradients."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    x_hat = z @ W + sae.b_dec
    return (x - x_hat).pow(2).sum(-1).mean(), z


def test_topk_sparse_path_equals_dense_reference():
    sae = make("topk").eval()  # eval: no AuxK, compare the main loss
    x = data()
    out = sae(x)
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))
    ref, z = dense_topk_reference(sae, x)
    ref_grads = torch.autograd.grad(ref, list(sae.parameters()))
    torch.testing.assert_close(out.loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert out.l0 == (z > 0).sum(1).float().mean() <= 4


def test_unit_norm_decoder_gradient_is_orthogonal_to_rows():
    sae = make("topk").train()
    sae(data()).loss.backward()
    W = sae.W_dec.detach()
    assert torch.allclose(W.norm(dim=1), torch.ones(N))
    parallel = (sae.W_dec.grad * W).sum(1)
    assert parallel.abs().max() < 1e-5 * sae.W_dec.grad.norm()


def test_auxk_uses_dead_latents_only():
    sae = make("topk").train()
    x = data()
    assert sae(x).aux == 0  # nothing dead yet
    with torch.no_grad():
        sae.tokens_since_fired[:10] = 1000  # latents 0..9 dead
    out = sae(x)
    assert out.aux > 0
    g = torch.autograd.grad(out.aux, sae.W_enc)[0]
    live = g[10:].abs().sum(1)
    assert (live == 0).all() and g[:10].abs().sum() > 0


def test_dead_counter():
    sae = make("topk").train()
    out = sae(data())
    assert torch.equal(sae.tokens_since_fired, torch.where(out.fired > 0, 0, 32))


def test_jumprelu_straight_through_gradients():
    sae = make("jumprelu", threshold_init=0.5, bandwidth=0.4, sparsity_coef=0.0)
    theta = sae.log_threshold.exp().detach()
    z = (data() @ sae.W_enc.T + sae.b_enc).detach()
    f = sae.dense_code(data())
    torch.testing.assert_close(f, z * (z > theta))
    torch.testing.assert_close(sae.encode(data()).dense(N), f)
    # d/dtheta sum(f) = -(theta/eps) * #(|z - theta| < eps/2); times theta for log_threshold
    g = torch.autograd.grad(f.sum(), sae.log_threshold)[0]
    near = ((z - theta).abs() < 0.2).sum(0).float()
    torch.testing.assert_close(g, -(theta / 0.4) * near * theta)
    # the L0 penalty's gradient reaches the threshold only through the estimator
    sae.cfg.sparsity_coef = 1.0
    out = sae(data())
    g0 = torch.autograd.grad(out.sparsity, sae.log_threshold)[0]
    torch.testing.assert_close(g0, -(1 / 0.4) * near / 32 * theta)


def test_jumprelu_starts_near_k_active_latents_and_its_lambda_reaches_the_thresholds():
    """Default thresholds on inputs normalised as the trainer does (E||x||^2 = d_model): about k
    latents fire per token at init; and in 150 Adam steps a larger L0 weight ends far sparser (with
    thresholds far below the pre-activations' scale, as Gemma Scope's 0.001 is here, both stay dense)."""
    d, n, k = 64, 512, 16
    x = torch.randn(4096, d, generator=torch.Generator().manual_seed(0))

    def train(lam: float) -> tuple[float, float]:
        sae = create(SAEConfig(architecture="jumprelu", n_features=n, d_model=d, k=k, sparsity_coef=lam))
        sae.reset_parameters(0, mean=torch.zeros(d))
        with torch.no_grad():
            start = float(sae(x).l0)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for step in range(150):
            out = sae(x[step % 16 * 256:][:256])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            return start, float(sae(x).l0)

    start, weak = train(0.01)
    _, strong = train(3.0)
    assert k / 2 < start < 2 * k
    assert strong < weak / 2, (weak, strong)


def test_jumprelu_data_init_starts_every_latent_at_the_same_density_tiled_or_not():
    """On anisotropic input one global threshold leaves the latents along low-variance directions
    silent; init_from_data puts each latent's threshold where it fires on k / n of the sample's rows."""
    d, n, k, rows = 32, 256, 8, 4096
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g) * torch.tensor([6.0] * 2 + [0.3] * (d - 2))  # two dominant directions
    x = x * (d / x.pow(2).sum(1).mean()).sqrt()  # normalised as the trainer does: E||x||^2 = d
    fired = {}
    for tile in (0, 96):
        sae = create(SAEConfig(architecture="jumprelu", n_features=n, d_model=d, k=k, feature_tile=tile))
        sae.reset_parameters(0, mean=torch.zeros(d))
        with torch.no_grad():
            before = sae(x).fired
            sae.init_from_data(lambda: x)
            fired[tile] = sae(x).fired
    assert (before == 0).float().mean() > 0.1  # the global threshold: many latents never fire
    assert fired[0].min() >= rows * k / n - 1 and fired[0].max() <= rows * k / n + 1
    torch.testing.assert_close(fired[0], fired[96])
    sae = create(SAEConfig(architecture="jumprelu", n_features=n, d_model=d, k=k, threshold_init=0.5))
    sae.reset_parameters(0)
    sae.init_from_data(lambda: 1 / 0)  # a set threshold_init is kept, nothing is read
    assert torch.allclose(sae.log_threshold.exp(), torch.full((n,), 0.5))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_gives_a_sparse_code_that_decodes_to_the_forward(arch):
    sae = make(arch).eval()
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # relu_l1, jumprelu: make some latents fire
        code = sae.encode(data())
        assert isinstance(code, SparseCode) and code.indices.dtype == torch.int64
        assert code.values.shape == code.indices.shape and code.values.shape[0] == 32
        f = code.dense(N)
        assert (f > 0).sum(1).max() == code.values.shape[1] or arch == "topk"  # dense codes: no extra padding
        torch.testing.assert_close(f @ sae.decoder_weight() + sae.b_dec, sae(data()).x_hat)


def test_sparse_code_from_dense_keeps_each_rows_non_zeros_in_feature_order():
    f = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    code = SparseCode.from_dense(f)
    assert code.indices.tolist()[0] == [1, 3] and code.values.tolist() == [[2.0, 1.0], [0.0, 0.0], [3.0, 0.0]]
    assert torch.equal(code.dense(4), f)
    code.values.sum().backward()
    assert torch.equal(f.grad, (f != 0).float())  # gradients reach the kept entries only
    empty = SparseCode.from_dense(torch.zeros(0, 4))
    assert empty.values.shape == (0, 1) and empty.dense(4).shape == (0, 4)


def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    sae = make("batchtopk").train()
    out = sae(data())
    assert out.fired.sum() == 4 * 32  # k * batch active in total
    assert sae.threshold > 0 and sae.threshold_steps == 1
    sae.eval()
    per_token = sae(data()).l0
    assert 0 < per_token <= N


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sharded_init_equals_rows_of_unsharded(arch):
    full = make(arch, seed=7)
    dims = ParallelDims(1, 3)
    for r in range(3):
        part = make(arch, dims.feature_range(N, r), seed=7)
        for name in part.feature_tensors:
            torch.testing.assert_close(getattr(part, name), getattr(full, name)[part.features.start:part.features.stop])
        torch.testing.assert_close(part.b_dec, full.b_dec)


@pytest.mark.parametrize("unit_norm", [False, True])
def test_sparse_kernels_equal_dense_references(unit_norm):
    g = torch.Generator().manual_seed(0)
    x, W, b, c = torch.randn(8, D, generator=g), torch.randn(N, D, generator=g), torch.randn(N, generator=g), torch.randn(D, generator=g)
    idx = torch.stack([torch.randperm(N, generator=g)[:5] for _ in range(8)])
    idx[1, 0] = idx[0, 0]  # a row used twice
    vals = torch.randn(8, 5, generator=g)
    ts = [t.clone().requires_grad_() for t in (x, W, b, c)]
    tr = [t.clone().requires_grad_() for t in (x, W, b, c)]
    pre = F.linear(ts[0] - ts[3], ts[1], ts[2]).detach()
    a, r = gather_linear(*ts, idx, pre.gather(1, idx)), dense_gather_linear(*tr, idx)
    torch.testing.assert_close(a, r)
    a.pow(2).sum().backward(), r.pow(2).sum().backward()
    for p, q in zip(ts, tr):
        torch.testing.assert_close(p.grad, q.grad)
    v1, W1 = vals.clone().requires_grad_(), W.clone().requires_grad_()
    v2, W2 = vals.clone().requires_grad_(), W.clone().requires_grad_()
    a, r = sparse_decode(v1, idx, W1, unit_norm), dense_decode(v2, idx, W2, unit_norm)
    torch.testing.assert_close(a, r)
    a.pow(2).sum().backward(), r.pow(2).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(W1.grad, W2.grad)
    assert (W1.grad.abs().sum(1) > 0).sum() == len(idx.unique())  # only the rows used have gradients


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_folds_the_input_scale(tmp_path, arch):
    sae = make(arch).train()
    sae(data())  # batchtopk: learn a threshold
    sae.eval()
    scale = 0.37
    raw = data(seed=5)
    trained = sae(raw * scale)
    save(sae, tmp_path, input_scale=scale, meta={"hook": "blocks.0", "model": {"id": "m"}})
    loaded = load(tmp_path)
    doc = json.loads((tmp_path / "cfg.json").read_text())
    assert doc["architecture"] == arch and doc["d_model"] == D and doc["n_features"] == N
    assert doc["hook"] == "blocks.0" and doc["normalization"]["input_scale"] == scale
    assert not loaded.training and loaded.meta["model"]["id"] == "m"
    out = loaded(raw)
    torch.testing.assert_close(out.x_hat, trained.x_hat / scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.l0, trained.l0)


def test_export_shard_by_shard_loads_as_one(tmp_path):
    full = make("jumprelu", seed=3)
    dims = ParallelDims(1, 3)
    ranges = [dims.feature_range(N, r) for r in range(3)]
    for r, rng in enumerate(ranges):
        save_shard(make("jumprelu", rng, seed=3), tmp_path, 2.0, r, 3)
    save_config(tmp_path, full.cfg, ranges, 2.0, {})
    assert len(list(tmp_path.glob("sae_weights-*-of-00003.safetensors"))) == 3
    loaded = load(tmp_path)
    x = data()
    torch.testing.assert_close(loaded(x).x_hat, full.eval()(x * 2.0).x_hat / 2.0, rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load(tmp_path)
    # a cfg.json of another format or version, or weights that do not match it: one line, no traceback
    save(make("relu_l1"), tmp_path / "old")
    doc = json.loads((tmp_path / "old" / "cfg.json").read_text())
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(CheckpointFormatError, match=r"old/cfg\.json.*version=99.*Fix: .*re-export") as e:
        load(tmp_path / "old")
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    save(make("relu_l1"), tmp_path / "mixed")
    save_config(tmp_path / "mixed", make("jumprelu").cfg, [range(N)], 1.0, {})  # cfg.json of another export
    with pytest.raises(CheckpointFormatError, match=r"mixed.*jumprelu.*missing \['log_threshold'\].*Fix: .*re-export"):
        load(tmp_path / "mixed")


def test_feature_ranges_cover_any_n_features():
    for n, fp in [(31, 3), (32, 3), (5, 5), (7, 2), (1, 1)]:
        dims = ParallelDims(1, fp)
        ranges = [dims.feature_range(n, r) for r in range(fp)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_parallel_dims_errors():
    with pytest.raises(ConfigError, match=r"data_parallel=2 x parallel.feature_parallel=2 = 4 ranks.*WORLD_SIZE=3"):
        ParallelDims(2, 2).validate(3)
    with pytest.raises(ConfigError, match="feature_parallel=8 is larger than sae.n_features=5"):
        ParallelDims(1, 8).validate(8, n_features=5)
    with pytest.raises(ConfigError, match="must both be >= 1"):
        ParallelDims(0, 1)
    ParallelDims(2, 3).validate(6, n_features=31)


def test_config_errors():
    with pytest.raises(ConfigError, match="architecture"):
        SAEConfig(architecture="gated")
    with pytest.raises(ConfigError, match="sae.k=99"):
        SAEConfig(architecture="topk", n_features=40, k=99)


def test_auxk_with_no_dead_latent_in_a_shard():
    """A shard without dead latents still takes part in AuxK's global selection (empty code)."""
    sae = make("topk", range(0, 20)).train()
    with torch.no_grad():
        sae.tokens_since_fired.fill_(0)
    sae.comm.sum_features = lambda t: t + 5  # as if another shard held 5 dead latents
    out = sae(data())
    assert out.aux > 0  # e_hat = 0 here: the aux loss is the residual's energy
    out.loss.backward()


def _step(sae, x):
    """Forward in training mode and the gradients of the loss: everything a step depends on."""
    out = sae(x)
    names = [n for n, p in sae.named_parameters()]
    grads = torch.autograd.grad(out.loss, list(sae.parameters()), allow_unused=True)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("dead", [None, slice(0, 2), slice(None, None, 3)])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_feature_tiles_equal_the_untiled_step(arch, dead):
    """Tiles of 7 (not dividing the 40 features, nor the 13 of a shard of 3): same outputs,
    gradients, dead-latent counters and batchtopk threshold as one tile, to float rounding; with
    no dead latent, a few (AuxK copies their columns out) and many (AuxK masks the tile in place)."""
    kw = dict(sparsity_coef=0.5, threshold_init=0.05, bandwidth=0.1, decoder_init_norm=0.5)
    for features in (None, range(13, 26)):
        ref, tiled = make(arch, features, **kw).train(), make(arch, features, feature_tile=7, **kw).train()
        for sae in (ref, tiled):
            with torch.no_grad():
                sae.b_enc.fill_(0.2)  # some relu_l1 latents fire
                if dead:
                    sae.tokens_since_fired[dead] = 1000
        assert tiled.tile() == 7 and ref.tile() == len(ref.features)
        x = data(64)
        (a, ga), (b, gb) = _step(ref, x), _step(tiled, x)
        for field in a._fields:
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-6, msg=field)
        assert (a.aux > 0) == (dead is not None and arch in ("topk", "batchtopk", "jumprelu"))  # AuxK, pre-act loss
        assert a.fired.sum() > 0
        for name in ga:
            assert gb[name] is not None and ga[name].abs().sum() > 0, name
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(dict(tiled.named_buffers())[name], buf, msg=name)
        ref.eval(), tiled.eval()
        torch.testing.assert_close(tiled(x).x_hat, ref(x).x_hat, rtol=1e-5, atol=1e-6)


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest number of elements of any dense tensor an op produced (forward and backward;
    a sparse tensor's numel is its logical size, not what it holds)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiled_step_never_forms_the_batch_by_features_matrix(arch):
    batch = 128
    sizes = {}
    for tile in (0, 7):
        sae = make(arch, feature_tile=tile).train()
        with torch.no_grad():
            sae.tokens_since_fired[::3] = 1000  # AuxK on
        x = data(batch)
        with _LargestOutput() as mode:
            sae(x).loss.backward()
        sizes[tile] = mode.largest
    assert sizes[0] >= batch * N       # the untiled step does form it
    # tiled: nothing larger than [batch, d_model (+ relu_l1's penalty column and padding)] or than
    # a bf16 scan's running candidates (k_aux = 6 + SCAN_EXTRA, merged with a tile); the tiles
    # and gradients are smaller still
    assert sizes[7] <= batch * max(D + 8, 6 + SCAN_EXTRA + 7) < batch * N


@pytest.mark.parametrize("dead_every", [0, 50, 2])  # AuxK off, few dead latents per tile, many
def test_a_bf16_scan_keeps_the_exact_code_and_gradients(dead_every):
    """scan_precision=bf16 proposes candidates in bf16 and keeps the exact top k among them: the
    same latents, values and gradients as the exact scan, where bf16's own top k differs."""
    d, n, k, batch = 64, 512, 8, 256
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(3)) * 3 + 1
    out = {}
    for p in ("exact", "bf16"):
        sae = create(SAEConfig(n_features=n, d_model=d, k=k, k_aux=16, dead_tokens=64, feature_tile=100,
                               scan_precision=p))
        sae.reset_parameters(0, mean=x.mean(0))
        sae.train()
        if dead_every:
            with torch.no_grad():
                sae.tokens_since_fired[::dead_every] = 1000
        assert (sae.scan_dtype(x) is None) == (p == "exact")
        code = sae.encode(x)
        res = sae(x)
        res.loss.backward()
        out[p] = code, res, {name: q.grad for name, q in sae.named_parameters()}
    (ce, re, ge), (cb, rb, gb) = out["exact"], out["bf16"]
    assert torch.equal(ce.indices.sort(1).values, cb.indices.sort(1).values)
    torch.testing.assert_close(ce.values.sort(1).values, cb.values.sort(1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rb.loss, re.loss, rtol=1e-6, atol=0)
    assert (rb.aux > 0) == bool(dead_every) and torch.isclose(rb.aux, re.aux, rtol=1e-5)
    for name in ge:
        torch.testing.assert_close(gb[name], ge[name], rtol=1e-5, atol=1e-6, msg=name)
    # the refinement is what makes them equal: bf16's own top k picks other latents on some rows
    bias = sae.encoder_bias()
    raw = torch.addmm(bias.bfloat16(), x.bfloat16(), sae.W_enc.bfloat16().t()).topk(k, dim=1).indices
    assert (raw.sort(1).values != ce.indices.sort(1).values).any(1).sum() > 0


def test_gather_dot_is_each_selected_rows_dot_product():
    x, W = torch.randn(33, 20), torch.randn(50, 20)
    idx = torch.stack([torch.randperm(50)[:7] for _ in range(33)])
    torch.testing.assert_close(gather_dot(idx, W, x), (W[idx] * x[:, None]).sum(-1), rtol=1e-5, atol=1e-5)
    assert gather_dot(idx[:, :0], W, x).shape == (33, 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_param_groups_hold_every_parameter_once(arch):
    """The optimizer's groups (pipeline/train/engine.py): every parameter in exactly one; jumprelu's
    thresholds alone at threshold_lr_scale, everything else at the recipe's rate."""
    sae = make(arch, threshold_lr_scale=7.0)
    groups = sae.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in sae.parameters())
    scaled = {id(p) for g in groups if g["lr_scale"] != 1 for p in g["params"]}
    assert scaled == ({id(sae.log_threshold)} if arch == "jumprelu" else set())
    assert all(g["lr_scale"] == 7.0 for g in groups if g["lr_scale"] != 1)
    with pytest.raises(ConfigError, match="sae.threshold_lr_scale=0"):
        SAEConfig(threshold_lr_scale=0)


def test_jumprelu_starts_with_positive_thresholds_at_any_k():
    """k >= n_features / 2 puts the normal quantile at or below 0: the threshold floors, never log(0)."""
    sae = create(SAEConfig(architecture="jumprelu", n_features=8, d_model=4, k=4))
    sae.reset_parameters(0)
    assert torch.isfinite(sae.log_threshold).all() and (sae.log_threshold.exp() > 0).all()


def test_scan_precision_must_be_a_known_one():
    with pytest.raises(ConfigError, match="sae.scan_precision='fp16'"):
        SAEConfig(scan_precision="fp16")


def test_feature_tile_must_not_be_negative():
    with pytest.raises(ConfigError, match="sae.feature_tile=-1"):
        SAEConfig(feature_tile=-1)


class _CountBackward(torch.autograd.Function):
    """Identity that counts its backward calls: stands in for FeatureComm.enter's all-reduce."""
    calls = 0

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


@pytest.mark.parametrize("dead_here", [True, False])
def test_b_dec_gradient_is_reduced_once_per_step_on_every_shard(dead_here):
    """Every shard must run the same collectives: b_dec's gradient all-reduce (enter's backward)
    runs once per step whether or not this shard has dead latents for AuxK."""
    sae = make("topk", range(0, 20)).train()
    with torch.no_grad():
        sae.tokens_since_fired.fill_(0)
        if dead_here:
            sae.tokens_since_fired[:5] = 1000
    sae.comm.sum_features = lambda t: t + 5  # another shard holds 5 dead latents
    sae.comm.enter = _CountBackward.apply
    _CountBackward.calls = 0
    out = sae(data())
    assert out.aux > 0
    out.loss.backward()
    assert _CountBackward.calls == 1
