"""How much code each phase of a segment kernel carries, from its SASS: bytes, instructions and opcode mix per phase.

    PYTHONPATH=. python experiments/sass_phases.py --segment 0-14 --attention [--dtype fp16] [--kernel resident]
    PYTHONPATH=. python experiments/sass_phases.py --cubin unit.cubin --kernel resident

Needs nvdisasm (CUDA toolkit, or `pip install nvidia-cuda-nvdisasm`; $NVDISASM names it) and, with --segment, nvcc:
the segment is rendered for sm_90a and compiled with the library build's flags. No GPU.

A stage that runs once per block fetches its code from L2 on every SM, so at few rows a kernel can wait on
instruction fetch more than on data (ncu_stalls.py shows it as `no_inst`). Phases are cut where ncu_stalls.py cuts
them: at grid-barrier arrivals and resident-weight waits, in address order.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ncu_stalls import PHASE_MARKS, opcode  # noqa: E402

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")


@dataclass
class Phase:
    start: int
    end: int = 0  # address after the phase's last instruction
    mark: str = ""  # the instruction that ends it
    opcodes: Counter = field(default_factory=Counter)

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """(address, instruction) of each kernel in an nvdisasm listing, by kernel name."""
    found, current = {}, None
    for line in sass.splitlines():
        section = SECTION.match(line)
        if section:
            current = found.setdefault(section.group(1), [])
            continue
        match = INSTRUCTION.search(line)
        if match and current is not None:
            current.append((int(match.group(1), 16), match.group(2)))
    return found


def phases(code: list[tuple[int, str]]) -> list[Phase]:
    """The kernel's code cut after every phase mark; the last phase runs to the end."""
    result, phase = [], None
    for address, instruction in code:
        phase = phase or Phase(start=address)
        phase.opcodes[opcode(instruction)] += 1
        phase.end = address + 16
        if any(mark in instruction for mark in PHASE_MARKS):
            phase.mark = instruction
            result.append(phase)
            phase = None
    if phase:
        result.append(phase)
    return result


def pick(found: dict[str, list], pattern: str) -> str:
    names = [name for name in found if re.search(pattern, name)]
    if len(names) != 1:
        raise SystemExit(f"sass_phases: kernel pattern {pattern!r} matches {len(names)} of: {', '.join(found)}; "
                         "give one that matches exactly one kernel")
    return names[0]


def nvdisasm() -> str:
    candidates = [os.environ.get("NVDISASM"), shutil.which("nvdisasm")]
    try:  # the pip wheel nvidia-cuda-nvdisasm
        import nvidia
        candidates += [str(p) for root in nvidia.__path__ for p in Path(root).glob("*/bin/nvdisasm")]
    except ImportError:
        pass
    for path in candidates:
        if path and Path(path).is_file():
            return path
    raise SystemExit("sass_phases: nvdisasm not found; install the CUDA toolkit or `pip install "
                     "nvidia-cuda-nvdisasm`, or set NVDISASM to its path")


def compile_segment(spec: str, attention: bool, dtype: str, folder: Path) -> Path:
    """The segment (first-last operator) rendered for sm_90a and compiled to a cubin with the build's flags."""
    from fusionsearch.build import unit_cubin_command
    from fusionsearch.codegen import render_segment
    from fusionsearch.config import LayerConfig
    from fusionsearch.plan import Segment

    first, _, last = spec.partition("-")
    unit = render_segment(Segment(int(first), int(last or first), attention), LayerConfig(dtype=dtype), "90a")
    source, cubin = folder / unit.filename, folder / "unit.cubin"
    source.write_text(unit.source)
    result = subprocess.run(unit_cubin_command(source, cubin), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sass_phases: nvcc failed on {unit.filename}:\n{result.stderr[-3000:]}")
    return cubin


def report(name: str, code: list[tuple[int, str]], top: int) -> str:
    total = len(code) * 16
    lines = [f"{name}: {total} bytes, {len(code)} instructions", "",
             "phase (ends at)                                    bytes  share  instr  HMMA  top opcodes"]
    for phase in phases(code):
        size = phase.end - phase.start
        mix = " ".join(f"{op}:{count}" for op, count in phase.opcodes.most_common(top))
        lines.append(f"{phase.end - 16:6x} {(phase.mark or 'end')[:40]:40s} {size:7d} {size / total:6.1%} "
                     f"{phase.instructions:6d} {phase.opcodes['HMMA.16816.F32']:5d}  {mix}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cubin", type=Path)
    source.add_argument("--segment", help="first-last operator, e.g. 0-14")
    parser.add_argument("--attention", action="store_true", help="the segment with the attention kernel")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--kernel", default="resident", help="regular expression matching one kernel's name")
    parser.add_argument("--top", type=int, default=8, help="opcodes listed per phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cubin = args.cubin or compile_segment(args.segment, args.attention, args.dtype, Path(folder))
        sass = subprocess.run([nvdisasm(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = kernels(sass)
    name = pick(found, args.kernel)
    print(report(name, found[name], args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
