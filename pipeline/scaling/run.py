"""Read a sweep, fit its scaling laws, write scaling.json and the plots, answer for a budget.

Compute of a run is its training FLOPs from the planner's model (pipeline.cost_model.training_flops):
per token ~10 d N for a dense step (relu_l1, jumprelu: encoder and decoder forward, both weight
gradients, the gradient w.r.t. the code) and ~2 d N + 8 k d for the sparse topk/batchtopk step
(the dense encoder forward plus what only the k active latents need), times the tokens trained.
The held-out evaluation is not counted.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path

import numpy as np

from pipeline import heldout
from pipeline.cost_model import PlanConfig, best_plan, training_flops
from pipeline.errors import ScalingFitError
from pipeline.sae import CLASSES, SAEConfig, sae_class
from pipeline.scaling import fit as F
from pipeline.scaling.config import FITTED, ScalingConfig

RESULT_FILE = "scaling.json"
RUN_OUTPUTS = (heldout.HELDOUT_FILE, heldout.METRICS_LOG_FILE, heldout.CHECKPOINTS_DIR, heldout.EXPORT_DIR)
"""What makes a folder a training run's out_dir (pipeline/heldout.py names them)."""
PLOTS = {"loss": "loss_vs_compute.png", "optimal": "optimal_vs_compute.png", "joint": "joint_fit.png"}


def flop_model() -> str:
    """How a run's compute is counted (written to scaling.json), naming the architectures of each step."""
    dense, sparse = ([a for a, c in CLASSES.items() if c.sparse_step == s] for s in (False, True))
    return ("training FLOPs = tokens x per-token step FLOPs of pipeline.cost_model.step_flops: "
            f"10 d N (dense step: {', '.join(dense)}) or 2 d N + 8 k d (sparse step: {', '.join(sparse)})")


def uses_k(architecture: str) -> bool:
    """Whether runs of `architecture` are set by k (fits compare them at one k, state it, plan with it)."""
    return sae_class(architecture).uses_k


def flops_per_token(architecture: str, d_model: int, n_features, k: int):
    """Training FLOPs per token at n_features (a number or an array): the planner's step count."""
    slope, intercept = _step_flops_line(architecture, d_model, k)
    return intercept + slope * n_features


@functools.lru_cache(maxsize=None)
def _step_flops_line(architecture: str, d_model: int, k: int) -> tuple[float, float]:
    """training_flops per token is linear in n_features: (slope, intercept)."""
    n = max(k, 1)  # a dictionary of at least k features (no n_features=0)
    at = [training_flops(PlanConfig(sae=SAEConfig(architecture=architecture, d_model=d_model, n_features=size, k=k),
                                    batch_size=1)) for size in (n, n + 1)]
    return at[1] - at[0], at[0] - (at[1] - at[0]) * n


@dataclass
class Point:
    dir: str
    architecture: str
    n_features: int
    k: int
    d_model: int
    tokens: int
    loss: float
    flops: float
    heldout_url: str
    metrics: dict = field(repr=False, default_factory=dict)


@dataclass
class Excluded:
    dir: str
    status: str
    """failed or unfinished"""
    reason: str


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Folders that look like training runs (heldout.json, metrics.jsonl, checkpoints/ or a Hydra
    job's .hydra/), not descending into a run."""
    found = []

    def walk(d: Path):
        if any((d / name).exists() for name in RUN_OUTPUTS) or \
                (d / ".hydra" / "config.yaml").exists() and d != sweep_dir:
            found.append(d)
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(sub)
    walk(sweep_dir)
    return found


def _last_metrics(d: Path) -> dict | None:
    path = d / heldout.METRICS_LOG_FILE
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _planned_steps(d: Path) -> int | None:
    cfg = d / ".hydra" / "config.yaml"
    if not cfg.exists():
        return None
    try:
        from omegaconf import OmegaConf
        c = OmegaConf.load(cfg)
        return int(c.n_tokens) // int(c.batch_size)
    except Exception:  # noqa: BLE001 - interpolations that need Hydra's resolvers: the count is only a hint
        return None


def _status(d: Path, loss_key: str) -> Point | Excluded:
    try:
        h = heldout.read(d)
    except ValueError as e:
        return Excluded(str(d), "failed", f"unreadable {heldout.HELDOUT_FILE}: {e}")
    if h is None:
        last = _last_metrics(d)
        steps = _planned_steps(d)
        of = f" of {steps}" if steps else ""
        if last is not None and not all(math.isfinite(v) for k, v in last.items() if isinstance(v, float)):
            return Excluded(str(d), "failed", f"non-finite training loss by step {last['step']}{of} (NaN stop)")
        if last is not None and steps and last["step"] >= steps and (d / heldout.EXPORT_DIR).exists():
            return Excluded(str(d), "unfinished", f"trained, but no {heldout.HELDOUT_FILE}: it ran without heldout_url. "
                            "Fix: rerun it with heldout_url=<held-out store> (it resumes at its end and only evaluates)")
        where = f"logged step {last['step']}{of}" if last else "no training step logged"
        return Excluded(str(d), "unfinished", f"no {heldout.HELDOUT_FILE} ({where}): still running, killed or "
                        "crashed. Fix: rerun the sweep command (finished points are skipped, the others resume)")
    if loss_key not in h:
        return Excluded(str(d), "failed", f"{heldout.HELDOUT_FILE} has no {loss_key!r} (keys: {sorted(h)})")
    value = h[loss_key]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return Excluded(str(d), "failed", f"held-out {loss_key} is {value!r} (not a positive finite number)")
    a, n, k, dm = h["architecture"], int(h["n_features"]), int(h.get("k") or 0), int(h["d_model"])
    return Point(str(d), a, n, k, dm, int(h["tokens"]), float(value), flops_per_token(a, dm, n, k) * int(h["tokens"]),
                 h.get("heldout_url", ""), h)


def loss_key(cfg: ScalingConfig, architectures: set[str]) -> str:
    if cfg.loss != "auto":
        return cfg.loss
    return "fvu" if all(uses_k(a) for a in architectures) else "proxy_loss"


def read_sweep(cfg: ScalingConfig) -> tuple[list[Point], list[Excluded], str]:
    """The finished runs of cfg.sweep_dir (all comparable), the excluded ones, the loss key."""
    root = Path(cfg.sweep_dir)
    if not root.is_dir():
        raise ScalingFitError(f"sweep_dir={cfg.sweep_dir!r} is not a folder. Fix: pass the sweep's output folder "
                              "(hydra.sweep.dir of the multirun, e.g. runs/sweep/gao)")
    dirs = run_dirs(root)
    archs = set()
    for d in dirs:
        try:
            h = heldout.read(d)
        except ValueError:
            continue
        if h:
            archs.add(h.get("architecture"))
    key = loss_key(cfg, archs)
    results = [_status(d, key) for d in dirs]
    points = [r for r in results if isinstance(r, Point)]
    excluded = [r for r in results if isinstance(r, Excluded)]
    for what, values in (("architecture", {p.architecture for p in points}), ("d_model", {p.d_model for p in points}),
                         ("k", {p.k for p in points if uses_k(p.architecture)}),
                         ("heldout_url", {p.heldout_url for p in points})):
        if len(values) > 1:
            by = {v: [Path(p.dir).name for p in points if getattr(p, what) == v][:4] for v in values}
            raise ScalingFitError(f"the runs in {cfg.sweep_dir!r} differ in {what}: {by}. A fit compares runs that "
                                  f"differ only in size and tokens. Fix: fit one {what} at a time (one sweep folder "
                                  "each)")
    return points, excluded, key


def _ci(values: list[float]) -> list[float] | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 10 else None


def analyse(points: list[Point], cfg: ScalingConfig) -> tuple[dict, dict]:
    """All fits of the finished points (the math of fit.py plus bootstrap and hold-out)."""
    if len(points) < F.MIN_FRONTIER:
        raise ScalingFitError(f"{len(points)} finished runs in {cfg.sweep_dir!r}; a scaling fit needs at least "
                              f"{F.MIN_JOINT} (L(N, D): {F.MIN_DISTINCT}+ sizes x {F.MIN_DISTINCT}+ token budgets; "
                              f"L(C): {F.MIN_FRONTIER}+ runs on the compute frontier). Fix: finish or extend the sweep")
    arch, d_model, k = points[0].architecture, points[0].d_model, points[0].k
    fpt = lambda n: flops_per_token(arch, d_model, n, k)  # noqa: E731
    N = np.array([p.n_features for p in points], dtype=float)
    D = np.array([p.tokens for p in points], dtype=float)
    C = np.array([p.flops for p in points])
    L = np.array([p.loss for p in points])
    delta = cfg.huber_delta

    front = F.pareto_frontier(C, L)
    ff = F.fit_frontier(C[front], L[front], delta)
    n_opt, d_opt = F.fit_power(C[front], N[front]), F.fit_power(C[front], D[front])
    joint = F.fit_joint(N, D, L, delta)
    implied = F.implied_exponents(joint, C.min(), C.max(), fpt)

    out = {"architecture": arch, "d_model": d_model, "k": k if uses_k(arch) else None,
           "n_points": len(points), "flop_model": flop_model(),
           "frontier": {"form": "L(C) = E + A * C^-a", "points": [points[i].dir for i in front],
                        "fit": F.as_dict(ff),
                        "n_opt": {"form": "N_opt(C) = k * C^b", "k": n_opt.k, "b": n_opt.exponent},
                        "d_opt": {"form": "D_opt(C) = k * C^c", "k": d_opt.k, "c": d_opt.exponent}},
           "joint": {"form": "L(N, D) = E + A / N^alpha + B / D^beta", "fit": F.as_dict(joint),
                     "implied": None if implied is None else {"b": implied[0], "c": implied[1],
                                                              "over_compute": [float(C.min()), float(C.max())]}}}
    fits = {"frontier": ff, "n_opt": n_opt, "d_opt": d_opt, "joint": joint, "fpt": fpt}

    # bootstrap over runs: each resample refits from the full fit's optimum (and the start grid's
    # best few); resamples without enough points for a form are skipped and counted
    if cfg.bootstrap:
        rng = np.random.default_rng(cfg.seed)
        samples = {k: [] for k in ("E", "A", "a", "b", "c", "jE", "jA", "alpha", "jB", "beta", "ib", "ic")}
        ok = {"frontier": 0, "joint": 0}
        for _ in range(cfg.bootstrap):
            idx = rng.integers(0, len(points), len(points))
            c, l, n, d = C[idx], L[idx], N[idx], D[idx]
            fr = F.pareto_frontier(c, l)
            try:
                f = F.fit_frontier(c[fr], l[fr], delta, starts=F.frontier_starts(ff, c[fr]))
                samples["E"].append(f.E), samples["A"].append(f.A), samples["a"].append(f.a)
                samples["b"].append(F.fit_power(c[fr], n[fr]).exponent)
                samples["c"].append(F.fit_power(c[fr], d[fr]).exponent)
                ok["frontier"] += 1
            except ScalingFitError:
                pass
            try:
                j = F.fit_joint(n, d, l, delta, starts=F.joint_starts(joint, n, d))
                for key, v in (("jE", j.E), ("jA", j.A), ("alpha", j.alpha), ("jB", j.B), ("beta", j.beta)):
                    samples[key].append(v)
                imp = F.implied_exponents(j, C.min(), C.max(), fpt)
                if imp:
                    samples["ib"].append(imp[0]), samples["ic"].append(imp[1])
                ok["joint"] += 1
            except ScalingFitError:
                pass
        out["bootstrap"] = {"resamples": cfg.bootstrap, "fitted": ok, "interval": "2.5th-97.5th percentile"}
        out["frontier"]["ci95"] = {k: _ci(samples[k]) for k in ("E", "A", "a")}
        out["frontier"]["n_opt"]["b_ci95"] = _ci(samples["b"])
        out["frontier"]["d_opt"]["c_ci95"] = _ci(samples["c"])
        out["joint"]["ci95"] = {"E": _ci(samples["jE"]), "A": _ci(samples["jA"]), "alpha": _ci(samples["alpha"]),
                                "B": _ci(samples["jB"]), "beta": _ci(samples["beta"])}
        if out["joint"]["implied"]:
            out["joint"]["implied"]["b_ci95"] = _ci(samples["ib"])
            out["joint"]["implied"]["c_ci95"] = _ci(samples["ic"])
    out["extrapolation"] = extrapolation(points, C, L, N, D, cfg)
    return out, fits


def extrapolation(points, C, L, N, D, cfg: ScalingConfig) -> dict:
    """Refit without the runs of the largest `holdout_largest` sizes and predict them."""
    sizes = sorted(set(N.tolist()))
    if not cfg.holdout_largest:
        return {"skipped": "holdout_largest=0"}
    held = set(sizes[-cfg.holdout_largest:])
    test = np.array([n in held for n in N])
    out = {"held_out_sizes": sorted(int(s) for s in held), "n_held_out": int(test.sum())}
    train = ~test
    try:
        j = F.fit_joint(N[train], D[train], L[train], cfg.huber_delta)
        pred = j.predict(N[test], D[test])
        rel = (pred - L[test]) / L[test]
        out["joint"] = {"fit": F.as_dict(j), "mean_abs_rel_error": float(np.mean(np.abs(rel))),
                        "points": [{"dir": points[i].dir, "n_features": int(N[i]), "tokens": int(D[i]),
                                    "observed": float(L[i]), "predicted": float(p), "rel_error": float(r)}
                                   for i, p, r in zip(np.flatnonzero(test), pred, rel)]}
    except ScalingFitError as e:
        out["joint"] = {"skipped": str(e)}
    full_front = set(F.pareto_frontier(C, L).tolist())
    targets = [i for i in np.flatnonzero(test) if i in full_front]
    try:
        fr = np.flatnonzero(train)[F.pareto_frontier(C[train], L[train])]
        f = F.fit_frontier(C[fr], L[fr], cfg.huber_delta)
        if not targets:
            out["frontier"] = {"fit": F.as_dict(f), "skipped": "no held-out run is on the full sweep's frontier"}
        else:
            pred = f.predict(C[targets])
            rel = (pred - L[targets]) / L[targets]
            out["frontier"] = {"fit": F.as_dict(f), "mean_abs_rel_error": float(np.mean(np.abs(rel))),
                               "points": [{"dir": points[i].dir, "flops": float(C[i]), "observed": float(L[i]),
                                           "predicted": float(p), "rel_error": float(r)}
                                          for i, p, r in zip(targets, pred, rel)]}
    except ScalingFitError as e:
        out["frontier"] = {"skipped": str(e)}
    return out


def nearest_pow2(n: float) -> int:
    return int(2 ** round(math.log2(max(n, 1.0))))


def predict_budget(budget: float, result: dict, fits: dict, cfg: ScalingConfig) -> dict:
    """The optimal size and tokens at `budget` FLOPs, rounded to a power-of-two size, and the plan."""
    fpt = fits["fpt"]
    env = {"loss": float(fits["frontier"].predict(budget)), "n_features": float(fits["n_opt"].predict(budget)),
           "tokens": float(fits["d_opt"].predict(budget))}
    opt = F.compute_optimal(fits["joint"], budget, fpt)
    joint = None if opt is None else {"n_features": opt[0], "tokens": opt[1],
                                      "loss": float(fits["joint"].predict(*opt))}
    source = "joint" if joint else "frontier"
    n = nearest_pow2((joint or env)["n_features"])
    tokens = budget / fpt(n)
    pred = {"flops": budget, "frontier_power_laws": env, "joint_fit": joint, "recommended_from": source,
            "recommended": {"n_features": n, "tokens": int(tokens), "flops_per_token": fpt(n),
                            "loss_joint_fit": float(fits["joint"].predict(n, tokens))}}
    arch, d, k = result["architecture"], result["d_model"], result["k"] or 32
    fitted = dict(zip(FITTED, (d, n, arch, k)))
    plan_args = [f"sae.{key}={v}" for key, v in fitted.items() if key != "k" or uses_k(arch)] + \
        [f"{key}={v}" for key, v in _dotted(cfg.plan)]
    pred["plan_command"] = f"make plan ARGS={shlex.quote(' '.join(plan_args))}"
    try:
        plan = best_plan(_with(PlanConfig(), {**cfg.plan, "sae": {**cfg.plan.get("sae", {}), **fitted}}))
        pred["plan"] = {"gpus": plan.gpus, "data_parallel": plan.data_parallel,
                        "feature_parallel": plan.feature_parallel, "nodes": plan.nodes,
                        "tokens_per_second": plan.tokens_per_second,
                        "hours": tokens / plan.tokens_per_second / 3600,
                        "assumes": {"gpu_memory_gb": plan.cfg.gpu_memory_gb, "tflops": plan.cfg.tflops,
                                    "batch_size": plan.cfg.batch_size, "param_dtype": plan.cfg.param_dtype}}
    except (ValueError, TypeError) as e:
        pred["plan"] = {"error": str(e)}
    return pred


def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a nested mapping, as a command line spells them."""
    return [kv for key, v in tree.items()
            for kv in (_dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else [(f"{prefix}{key}", v)])]


def _with(obj, tree: dict):
    """The dataclass `obj` with the values of the nested mapping `tree` in place of its own (its
    sections replaced the same way, recursively)."""
    return replace(obj, **{key: _with(getattr(obj, key), v) if isinstance(v, dict) and is_dataclass(getattr(obj, key))
                           else v for key, v in tree.items()})


def run(cfg: ScalingConfig) -> dict:
    points, excluded, key = read_sweep(cfg)
    for e in excluded:
        print(f"excluded ({e.status}): {e.dir}: {e.reason}", flush=True)
    # the fits are thousands of tiny L-BFGS-B problems: multi-threaded BLAS only adds overhead
    # (50x slower on a busy 2-core machine)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        result, fits = analyse(points, cfg)
    result = {"sweep_dir": cfg.sweep_dir, "loss": key, **result,
              "points": [{"dir": p.dir, "n_features": p.n_features, "tokens": p.tokens, "flops": p.flops,
                          "loss": p.loss, "l0": p.metrics.get("l0"), "dead_fraction": p.metrics.get("dead_fraction")}
                         for p in points],
              "excluded": [e.__dict__ for e in excluded]}
    if cfg.budget:
        result["budget"] = predict_budget(cfg.budget, result, fits, cfg)
    out = Path(cfg.out_dir or cfg.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    from pipeline.scaling.plots import plot_all
    result["plots"] = [str(out / name) for name in PLOTS.values()]
    plot_all(points, result, fits, out, PLOTS, cfg.budget)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result), flush=True)
    print(f"wrote {out / RESULT_FILE} and {', '.join(PLOTS.values())}", flush=True)
    return result


def _fmt_ci(ci) -> str:
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def summary(r: dict) -> str:
    f, j = r["frontier"], r["joint"]
    ff, jf = f["fit"], j["fit"]
    fci, jci = f.get("ci95", {}), j.get("ci95", {})
    lines = [f"{r['n_points']} runs ({r['architecture']}, d_model={r['d_model']}"
             + (f", k={r['k']}" if r["k"] else "") + f"), loss = held-out {r['loss']}, "
             f"{len(r['excluded'])} excluded; {len(f['points'])} on the compute frontier",
             f"  frontier  L(C) = {ff['E']:.4g} + {ff['A']:.4g} * C^-{ff['a']:.4f}   a{_fmt_ci(fci.get('a'))}",
             f"            N_opt ~ C^{f['n_opt']['b']:.3f}{_fmt_ci(f['n_opt'].get('b_ci95'))}   "
             f"D_opt ~ C^{f['d_opt']['c']:.3f}{_fmt_ci(f['d_opt'].get('c_ci95'))}",
             f"  joint     L(N, D) = {jf['E']:.4g} + {jf['A']:.4g} / N^{jf['alpha']:.4f} + {jf['B']:.4g} / "
             f"D^{jf['beta']:.4f}   alpha{_fmt_ci(jci.get('alpha'))} beta{_fmt_ci(jci.get('beta'))}"]
    if j.get("implied"):
        i = j["implied"]
        lines.append(f"            compute-optimal from the joint fit: N_opt ~ C^{i['b']:.3f}{_fmt_ci(i.get('b_ci95'))}"
                     f"   D_opt ~ C^{i['c']:.3f}{_fmt_ci(i.get('c_ci95'))}")
    x = r["extrapolation"]
    for form in ("joint", "frontier"):
        if "mean_abs_rel_error" in x.get(form, {}):
            lines.append(f"  extrapolation ({form} fit without size(s) {x['held_out_sizes']}): mean |error| "
                         f"{x[form]['mean_abs_rel_error']:.2%} on {len(x[form]['points'])} held-out run(s)")
        elif "skipped" in x.get(form, {}):
            lines.append(f"  extrapolation ({form} fit without size(s) {x['held_out_sizes']}): not measured: "
                         f"{x[form]['skipped']}")
    if "budget" in r:
        b = r["budget"]
        rec = b["recommended"]
        lines.append(f"  budget {b['flops']:.3g} FLOPs:")
        if b["joint_fit"]:
            lines.append(f"    joint fit optimum      N = {b['joint_fit']['n_features']:,.0f} features, "
                         f"D = {b['joint_fit']['tokens']:,.0f} tokens, loss {b['joint_fit']['loss']:.4g}")
        e = b["frontier_power_laws"]
        lines.append(f"    frontier power laws    N = {e['n_features']:,.0f} features, D = {e['tokens']:,.0f} tokens, "
                     f"loss {e['loss']:.4g}")
        lines.append(f"    recommended            n_features={rec['n_features']} (power of two), "
                     f"n_tokens={rec['tokens']:,} (the budget at that size)")
        p = b.get("plan", {})
        if "gpus" in p:
            lines.append(f"    plan                   {p['gpus']} GPU(s) (data_parallel={p['data_parallel']} x "
                         f"feature_parallel={p['feature_parallel']}), {p['tokens_per_second']:,.0f} tokens/s, "
                         f"~{p['hours']:,.2f} h at {p['assumes']['tflops']} TFLOP/s per GPU")
        lines.append(f"    {b['plan_command']}")
    return "\n".join(lines)
