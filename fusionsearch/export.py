"""Export one plan as a self-contained Python module (CUDA sources, headers and runtime embedded)."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

from . import __version__
from .build import library_spec, needs_cutlass, toolchain_versions
from .codegen import environment
from .config import LayerConfig
from .errors import FusionSearchError
from .plan import Plan
from .resources import CUTLASS_REQUIREMENT, kernels_dir, sources_hash

_PACKAGE_DIR = Path(__file__).resolve().parent
# The modules a plan needs at run time; none of them imports jinja2, pandas or xgboost.
RUNTIME_MODULES = ("errors", "settings", "config", "ops", "plan", "schedule", "layout", "weights", "build",
                   "resources", "runtime")
_RUNTIME_INIT = ('"""fusionsearch runtime embedded in an exported layer module."""\n__version__ = "{version}"\n'
                 f"from . import {', '.join(RUNTIME_MODULES)}  # noqa: E401,F401\n")


def plan_record(plan: Plan) -> dict:
    return {"mask": plan.mask, "bits": plan.bits, "attention": plan.attention, "describe": plan.describe(),
            "kernel_count": plan.kernel_count,
            "segments": [{"first": s.first, "last": s.last, "attention": s.attention, "ops": list(s.op_names)}
                         for s in plan.segments]}


def default_provenance(arch: str) -> dict:
    """Where the plan was tuned: this GPU if one is visible, else only the target arch."""
    versions = toolchain_versions()
    gpu = "no GPU (exported without measurement)"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except ImportError:
        pass
    return {"gpu": gpu, "arch": arch, "torch": versions["torch"], "cuda": versions["cuda"],
            "fusionsearch": __version__, "sources_hash": sources_hash(),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def render_module(plan: Plan, cfg: LayerConfig, arch: str, module_stem: str, provenance: dict | None = None) -> str:
    """The exported module's source text for `plan` (only the plan's segment kernels are embedded)."""
    spec = library_spec(cfg, plan.segments, arch=arch)
    provenance = provenance or default_provenance(arch)
    library = {"module_name": spec.module_name, "key": spec.key, "arch": spec.arch,
               "signature": [list(item) for item in spec.signature], "segment_names": list(spec.segment_names),
               "units": [vars(u) for u in spec.units], "binding": vars(spec.binding)}
    headers = {p.name: p.read_text() for p in sorted(kernels_dir().iterdir()) if p.suffix in (".cuh", ".h")}
    runtime = {f"{name}.py": (_PACKAGE_DIR / f"{name}.py").read_text() for name in RUNTIME_MODULES}
    runtime["__init__.py"] = _RUNTIME_INIT.format(version=__version__)
    config = {**cfg.to_dict(), "hidden": cfg.hidden}
    bundle = hashlib.sha256(json.dumps([library, headers, runtime], sort_keys=True).encode()).hexdigest()
    env = environment().overlay()
    env.filters["pyrepr"] = repr
    return env.get_template("export_module.py.j2").render(
        version=__version__, plan=plan_record(plan), config=config, provenance=provenance, module_stem=module_stem,
        plan_json=json.dumps(plan_record(plan)), config_json=json.dumps(config),
        provenance_json=json.dumps(provenance), library_json=json.dumps(library), headers=headers,
        runtime=runtime, bundle_hash=bundle, needs_cutlass=needs_cutlass(spec),
        cutlass_requirement=CUTLASS_REQUIREMENT)


def export_plan(plan: Plan, cfg: LayerConfig, output: "str | Path", arch: str, provenance: dict | None = None) -> Path:
    """Write the module for `plan` to `output` (a .py path whose stem is a valid module name)."""
    output = Path(output)
    if output.suffix != ".py" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", output.stem):
        raise FusionSearchError(f"output {str(output)!r} must be NAME.py with NAME a Python identifier, so it can be "
                                "imported; e.g. -o bert_fused.py")
    text = render_module(plan, cfg, arch, output.stem, provenance)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".py.tmp")
    tmp.write_text(text)
    tmp.replace(output)
    return output
