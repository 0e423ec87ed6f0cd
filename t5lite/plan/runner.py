"""What `t5lite plan` does once its inputs are parsed: choose the configurations to compile
(one recipe, every recipe, or a search), compile them and format the result."""

from __future__ import annotations

import dataclasses

from t5lite.config import ModelConfig
from t5lite.errors import UserError
from t5lite.parallel.mesh import MeshConfig
from t5lite.parallel.rules import RECIPES
from t5lite.plan import report
from t5lite.plan.meshes import default_mesh
from t5lite.plan.search import cheapest_fitting_remat, largest_fitting_batch
from t5lite.plan.topologies import Topology, target_devices
from t5lite.plan.train import PlanResult, plan_train
from t5lite.train.config import TrainConfig

_GiB = 2**30


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    model_config: ModelConfig
    train_config: TrainConfig
    mesh_config: MeshConfig
    feature_lengths: dict[str, int]
    topology: Topology
    partitioning: str | None = None  # None: gin's; a recipe; or "all"
    search: str | None = None  # None | "batch_size" | "remat"
    mode: str = "train"
    hbm_gib: float | None = None
    decode_batch: int = 8
    decode_input_len: int | None = None
    decode_len: int | None = None
    decode_method: str = "greedy"
    decode_beams: int = 4
    hlo_dir: str | None = None  # also write each compiled module's HLO text here
    # train: answer "no" without compiling when the state alone exceeds HBM (plan_train)
    skip_if_arguments_exceed_hbm: bool = False


def _configs(req: PlanRequest) -> list[tuple[str, MeshConfig]]:
    topo = req.topology
    if req.partitioning is None:
        return [(req.train_config.partitioning, req.mesh_config)]
    recipes = sorted(RECIPES) if req.partitioning == "all" else [req.partitioning]
    return [(r, default_mesh(r, topo.chips, req.model_config, topo.num_slices)) for r in recipes]


def _hbm(req: PlanRequest) -> int | None:
    """The chip's nominal memory (--hbm_gib wins)."""
    if req.hbm_gib is not None:
        return int(req.hbm_gib * _GiB)
    return req.topology.hbm_bytes


def _usable(req: PlanRequest, devices: list) -> tuple[int | None, str]:
    """(bytes one program may use per device, their source): --hbm_gib as given, else what the
    TPU compiler reports as available (`t5lite.plan.hbm`); None for cpu:N without --hbm_gib."""
    if req.hbm_gib is not None:
        return int(req.hbm_gib * _GiB), "--hbm_gib"
    if not req.topology.is_tpu:
        return None, ""
    from t5lite.plan.hbm import usable_hbm_bytes

    return usable_hbm_bytes(req.topology.generation, devices)


def _one(req: PlanRequest, devices: list, recipe: str, mesh_config: MeshConfig,
         train_config: TrainConfig | None = None,
         model_config: ModelConfig | None = None) -> PlanResult:
    tc = dataclasses.replace(train_config or req.train_config, partitioning=recipe)
    mc = model_config or req.model_config
    usable, source = _usable(req, devices)
    if req.mode == "decode":
        from t5lite.plan.decode import plan_decode

        lengths = req.feature_lengths
        inputs = req.decode_input_len or lengths.get("encoder_input_tokens") or 512
        targets = req.decode_len or lengths.get("decoder_target_tokens") or 64
        return plan_decode(mc, recipe, mesh_config, req.topology, devices, _hbm(req),
                           batch_size=req.decode_batch, input_length=inputs,
                           max_decode_len=targets, method=req.decode_method,
                           beam_size=req.decode_beams, hlo_dir=req.hlo_dir,
                           usable_hbm_bytes=usable, usable_hbm_source=source)
    return plan_train(mc, tc, mesh_config, req.feature_lengths, req.topology, devices, _hbm(req),
                      hlo_dir=req.hlo_dir,
                      skip_if_arguments_exceed_hbm=req.skip_if_arguments_exceed_hbm,
                      usable_hbm_bytes=usable, usable_hbm_source=source)


def compile_plans(req: PlanRequest, devices: list | None = None,
                  ) -> tuple[list[PlanResult], list[tuple[str, str]]]:
    """Compile every configuration `req` names (one recipe or all; no search): the results and
    the (recipe, reason) pairs skipped because their mesh or batch split does not work here
    (with one recipe, that reason is raised as a UserError instead)."""
    devices = target_devices(req.topology) if devices is None else devices
    configs = _configs(req)
    results: list[PlanResult] = []
    skipped: list[tuple[str, str]] = []
    for recipe, mesh_config in configs:
        try:
            results.append(_one(req, devices, recipe, mesh_config))
        except UserError as e:
            if len(configs) == 1:
                raise
            skipped.append((recipe, str(e)))
    return results, skipped


def run_plan(req: PlanRequest, fmt: str = "text") -> str:
    """Compile what `req` asks for; the text or JSON-lines output."""
    if req.search:
        return _search(req, target_devices(req.topology), *_configs(req)[0], fmt)
    results, skipped = compile_plans(req)
    if fmt == "json":
        return report.to_json_lines(report.sort_rows(results))
    if len(results) == 1 and not skipped:
        return report.detail(results[0])
    return report.table(results, skipped)


def _search(req: PlanRequest, devices: list, recipe: str, mesh_config: MeshConfig,
            fmt: str) -> str:
    if _hbm(req) is None:
        raise UserError("--search needs a memory size: pass --hbm_gib=N with cpu:N topologies.")
    tc = req.train_config
    plans: dict = {}
    if req.search == "batch_size":
        from t5lite.parallel.mesh import make_mesh
        from t5lite.parallel.rules import get_rules
        from t5lite.train.setup import batch_axes_size

        mesh = make_mesh(mesh_config, devices=devices)
        unit = batch_axes_size(mesh, get_rules(recipe)) * tc.microbatches

        def fits(b: int) -> bool:
            plans[b] = _one(req, devices, recipe, mesh_config, dataclasses.replace(
                tc, batch_size=b))
            return bool(plans[b].fits)

        best, compiles = largest_fitting_batch(fits, start=tc.batch_size, unit=unit,
                                               limit=max(tc.batch_size, unit) * 4096)
        found = f"largest global batch that fits: {best}" if best else (
            f"no batch fits (not even {unit}, the smallest the mesh allows)")
    else:
        def fits(policy: str) -> bool:  # type: ignore[no-redef]
            plans[policy] = _one(req, devices, recipe, mesh_config,
                                 model_config=req.model_config.replace(remat_policy=policy))
            return bool(plans[policy].fits)

        best, compiles = cheapest_fitting_remat(fits)
        found = (f"cheapest remat policy that fits: {best}" if best else
                 "no remat policy fits (not even 'full')")
    summary = f"search {req.search}: {found} ({compiles} compiles)"
    tried = list(plans.values())
    if fmt == "json":
        import json

        lines = [json.dumps({"search": req.search, "result": best, "compiles": compiles})]
        return "\n".join(lines + [report.to_json_lines(tried)])
    body = report.detail(plans[best]) if best is not None else report.table(tried)
    tried_text = ", ".join(f"{k}: {'fits' if p.fits else 'no'}" for k, p in plans.items())
    return f"{body}\n{summary}\n  tried (in order): {tried_text}"
