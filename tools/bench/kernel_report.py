"""Static report of the Triton MLA decode kernel compiled for Hopper (sm_90) on a machine without a GPU.

    python -m tools.bench.kernel_report                      # every launch of GRID at every shape
    python -m tools.bench.kernel_report --launches 32,8,3 --shapes deepseek_h16
    python -m tools.bench.kernel_report --write-occupancy    # refresh research/kernels/mla_decode_occupancy.json

For each launch (block_t, num_warps, num_stages) and shape it lowers ``mla_decode`` for CUDA,
captures the Triton IR that jax hands to XLA, compiles it to PTX exactly as XLA's CUDA plugin does
(``compile_triton_to_asm``), and runs ``ptxas -arch=sm_90a -v`` on the PTX. It prints:
  smem      shared memory per CTA (bytes); a launch needs <= 232,448 (227 KB, the opt-in limit)
  regs      registers per thread; spills: spill stores + loads (bytes)
  ctas/SM   CTAs one SM holds: 228 KB of shared memory (1 KB reserved per CTA), 65,536 registers
            (allocated per warp in units of 256), 64 warps, 32 CTAs
  in flight the smallest N of ``cp.async.wait_group N`` inside the tile loop: 0 means every load is
            waited for before the math (no overlap); N >= 1 keeps N tile loads in flight. Read off
            the compiled kernel, it follows num_stages: 2 stages wait for everything, 3 keep 2
  rewrite   bytes the CTA stores to shared memory per loop iteration (``st.shared`` in the loop,
            per thread, times the threads) against the bytes of one c_kv + k_pe tile: a loaded
            tile rewritten before the dots (``where`` on it) goes through registers back into a
            second shared buffer: at least a tile's worth of stores, where the scores' conversion for
            the value dot alone stores less (4,096 B at H 16, block_t 32). It also costs that buffer and
            registers: 129,024 B and 205 registers against 93,184 and 101 at block_t 32 / 8 warps /
            3 stages)
A launch is accepted when it fits the per-block shared memory, spills nothing, keeps a tile in
flight and does not rewrite its tiles. ``--write-occupancy`` records the CTAs per SM of the accepted launches, which
``research.kernels.mla_decode`` reads to size its split count for one wave.

Needs jax's CUDA plugin (its version must equal jaxlib's) and a ptxas, kept out of the
environment in their own folder (``make sm90-tools`` puts them in ``.cache/sm90``, about 550 MB and
10 s; ``RESEARCH_SM90_TOOLS`` names another folder): installed beside jax, the plugin would make
every process log that it found no CUDA driver. Without them the report says what is missing and
exits 2, and the tests that need them skip with that line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

SMEM_PER_BLOCK = 232_448      # Hopper, with the opt-in attribute
SMEM_PER_SM = 233_472         # 228 KB
SMEM_RESERVED_PER_CTA = 1_024
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 64, 32

# The shapes of the targets: (B, H, r, d_r, R, S); the report depends on H (the head
# block), r, R d_r and the dtype, not on B or S.
SHAPES = {
    "deepseek_h16": (8, 16, 512, 64, 1, 4096),
    "deepseek_h128": (2, 128, 512, 64, 1, 4096),
    "smollm2_mla": (4, 9, 56, 4, 3, 4096),
}
GRID = [(bt, w, s) for bt in (16, 32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


@dataclasses.dataclass(frozen=True)
class KernelStats:
    smem: int
    registers: int
    spill_bytes: int
    wait_groups_in_loop: tuple[int, ...]
    num_warps: int
    loop_store_bytes: int = 0     # shared-memory bytes the CTA stores per loop iteration
    tile_bytes: int = 0           # bytes of one c_kv + k_pe tile

    @property
    def in_flight(self) -> int:
        return min(self.wait_groups_in_loop) if self.wait_groups_in_loop else 0

    @property
    def ctas_per_sm(self) -> int:
        by_smem = SMEM_PER_SM // (self.smem + SMEM_RESERVED_PER_CTA)
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = (REGS_PER_SM // regs_per_warp) // self.num_warps
        return min(by_smem, by_regs, MAX_WARPS_PER_SM // self.num_warps, MAX_CTAS_PER_SM)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.smem > SMEM_PER_BLOCK:
            found.append(f"shared memory {self.smem:,} B > {SMEM_PER_BLOCK:,}")
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B")
        if self.in_flight == 0:
            found.append("waits for every load each iteration")
        if self.tile_bytes and self.loop_store_bytes >= self.tile_bytes:
            found.append(f"rewrites its tiles ({self.loop_store_bytes:,} B stored to shared memory per "
                         f"iteration for a {self.tile_bytes:,} B tile)")
        return found


REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
INSTALL_HINT = "make sm90-tools"


def tools_dir() -> str:
    return os.environ.get("RESEARCH_SM90_TOOLS") or os.path.join(REPO, ".cache", "sm90")


def missing_tools() -> str | None:
    """None when the report can run (the tools' folder then on sys.path), else a line saying what to install."""
    folder = tools_dir()
    if not os.path.isdir(os.path.join(folder, "jax_cuda12_plugin")):
        return f"jax's CUDA plugin and ptxas are not in {folder} (run: {INSTALL_HINT})"
    if folder not in sys.path:
        sys.path.append(folder)
    from jax_cuda12_plugin import version as plugin_version
    from jaxlib import version as jaxlib_version
    if plugin_version.__version__ != jaxlib_version.__version__:
        return (f"jax-cuda12-plugin {plugin_version.__version__} does not match jaxlib {jaxlib_version.__version__}: "
                f"pip install jax-cuda12-plugin=={jaxlib_version.__version__}")
    if ptxas_path() is None:
        return f"no ptxas in {folder} or on the PATH (run: {INSTALL_HINT})"
    return None


def ptxas_path() -> str | None:
    """ptxas from nvidia-cuda-nvcc-cu12 in the tools' folder, else from the PATH."""
    candidate = os.path.join(tools_dir(), "nvidia", "cuda_nvcc", "bin", "ptxas")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("ptxas")


@functools.cache
def _cuda_plugin_api():
    """The CUDA plugin's C API, loaded under a name of its own: jax may have registered the plugin
    as "cuda" already (without a GPU it then fails to start it, which this does not need)."""
    import jax_plugins.xla_cuda12 as plugin
    from jaxlib import xla_client

    library = os.path.join(os.path.dirname(plugin.__file__), "xla_cuda_plugin.so")
    return xla_client.load_pjrt_plugin_dynamically("cuda_kernel_report", library)


def triton_modules(fn, *args) -> list[bytes]:
    """The Triton IR modules (bytecode) of every pallas_call in ``fn(*args)``, lowered for CUDA."""
    from jax._src.pallas.triton import lowering

    captured, original = [], lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        buffer = io.BytesIO()
        result.module.operation.write_bytecode(buffer)
        captured.append(buffer.getvalue())
        return result

    jax.clear_caches()  # a cached lowering would not pass through the capture
    lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return captured


def compile_stats(module: bytes, num_warps: int, num_stages: int, tile_bytes: int = 0) -> tuple[KernelStats, str]:
    """Compiles one Triton module for sm_90 as XLA would -> (stats, PTX)."""
    from jax_cuda12_plugin import cuda_plugin_extension

    result = cuda_plugin_extension.compile_triton_to_asm(_cuda_plugin_api(), module, "9.0", num_warps, 1, num_stages)
    ptx = result.asm if isinstance(result.asm, str) else result.asm.decode()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    info = done.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return KernelStats(result.smem_bytes, registers, spills, loop_wait_groups(ptx), num_warps,
                       32 * num_warps * loop_shared_store_bytes(ptx), tile_bytes), ptx


def _loop_lines(ptx: str) -> list[str]:
    """The PTX lines inside a loop: between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$\w+):", line.strip()))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", line)) and labels.get(m.group(1), i) < i]
    return [line for i, line in enumerate(lines) if any(start < i < end for start, end in loops)]


def loop_wait_groups(ptx: str) -> tuple[int, ...]:
    """N of each ``cp.async.wait_group N`` inside a loop."""
    return tuple(int(m.group(1)) for line in _loop_lines(ptx) if (m := re.search(r"cp\.async\.wait_group\s+(\d+)", line)))


def loop_shared_store_bytes(ptx: str) -> int:
    """Bytes one thread stores to shared memory per loop iteration with ``st.shared[::cta][.vN].bW``:
    how a tile loaded into registers goes back. ``stmatrix`` is left out: it stores MMA fragments
    (the scores converted for the value dot), never a loaded tile."""
    total = 0
    for line in _loop_lines(ptx):
        if m := re.search(r"\bst\.shared(?:::cta)?(?:\.v(\d))?\.[bfsu](\d+)", line):
            total += int(m.group(1) or 1) * int(m.group(2)) // 8
    return total


def decode_stats(shape: str, block_t: int, num_warps: int, num_stages: int, dtype=jnp.bfloat16,
                 block_h: int = 64) -> KernelStats:
    """The compiled dense decode kernel at one shape of SHAPES and one launch."""
    from research.kernels.mla_decode import block_dims, mla_decode

    b, h, r, d_r, rope_heads, s = SHAPES[shape]
    spec = lambda *shape, dtype=dtype: jax.ShapeDtypeStruct(shape, dtype)
    fn = functools.partial(mla_decode, scale=0.1, block_t=block_t, num_warps=num_warps, num_stages=num_stages,
                           block_h=block_h)
    [module] = triton_modules(fn, spec(b, h, r), spec(b, h, d_r), spec(b, s, r), spec(b, s, rope_heads, d_r),
                              spec(b, dtype=jnp.int32))
    _, r_pad, p_pad = block_dims(h, r, rope_heads * d_r, block_h)
    tile_bytes = block_t * (r_pad + p_pad) * jnp.dtype(dtype).itemsize
    return compile_stats(module, num_warps, num_stages, tile_bytes)[0]


def occupancy_key(shape: str, block_t: int, num_warps: int, num_stages: int, dtype, block_h: int = 64) -> str:
    """The key ``research.kernels.mla_decode.ctas_per_sm`` looks up for this launch and shape."""
    from research.kernels.mla_decode import block_dims, occupancy_key as key

    _, h, r, d_r, rope_heads, _ = SHAPES[shape]
    return key(block_t, num_warps, num_stages, *block_dims(h, r, rope_heads * d_r, block_h), dtype)


def report_rows(shapes, launches, dtype=jnp.bfloat16) -> list[dict]:
    rows = []
    for shape in shapes:
        for block_t, num_warps, num_stages in launches:
            row = {"shape": shape, "block_t": block_t, "num_warps": num_warps, "num_stages": num_stages,
                   "dtype": jnp.dtype(dtype).name, "key": occupancy_key(shape, block_t, num_warps, num_stages, dtype)}
            try:
                stats = decode_stats(shape, block_t, num_warps, num_stages, dtype)
            except Exception as e:  # noqa: BLE001 -- a launch the compiler rejects is a row, not a crash
                rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})
                continue
            rows.append({**row, "smem": stats.smem, "registers": stats.registers, "spill_bytes": stats.spill_bytes,
                         "ctas_per_sm": stats.ctas_per_sm, "in_flight": stats.in_flight,
                         "loop_store_bytes": stats.loop_store_bytes, "tile_bytes": stats.tile_bytes,
                         "accepted": not stats.problems, "problems": stats.problems})
    return rows


def format_row(row: dict) -> str:
    launch = f"{row['shape']:14s} bt {row['block_t']:3d} w {row['num_warps']} s {row['num_stages']}"
    if "error" in row:
        return f"{launch} | {row['error']}"
    verdict = "accepted" if row["accepted"] else "rejected: " + "; ".join(row["problems"])
    return (f"{launch} | smem {row['smem']:7,d} B | regs {row['registers']:3d} | spills {row['spill_bytes']:4d} B | "
            f"ctas/SM {row['ctas_per_sm']} | in flight {row['in_flight']} | "
            f"smem stores/iter {row['loop_store_bytes']:6,d} B of a {row['tile_bytes']:6,d} B tile | {verdict}")


OCCUPANCY_FILE = os.path.join(REPO, "research", "kernels", "mla_decode_occupancy.json")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--launches", default="", help="block_t,num_warps,num_stages triples joined by ';' (default: GRID)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    parser.add_argument("--write-occupancy", action="store_true",
                        help="record the accepted launches' CTAs per SM for research.kernels.mla_decode")
    args = parser.parse_args(argv)
    reason = missing_tools()
    if reason:
        print(f"kernel_report: {reason}", file=sys.stderr)
        raise SystemExit(2)
    shapes = args.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    try:
        launches = [tuple(int(v) for v in t.split(",")) for t in args.launches.split(";")] if args.launches else GRID
        assert all(len(t) == 3 for t in launches)
    except (ValueError, AssertionError):
        parser.error(f"--launches: {args.launches!r} is not block_t,num_warps,num_stages triples joined by ';'")
    print(f"Triton MLA decode compiled for sm_90a on {jax.devices()[0].platform} (jax {jax.__version__}), "
          f"{args.dtype}, head block <= 64", flush=True)
    rows = []
    for row in report_rows(shapes, launches, jnp.dtype(args.dtype)):
        print(format_row(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.write_occupancy:
        write_occupancy(rows)
    return rows


def write_occupancy(rows: list[dict]) -> None:
    """Merges the accepted rows' CTAs per SM into the kernel's occupancy table (atomically)."""
    path = OCCUPANCY_FILE
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = {r["key"]: r for r in json.load(f)["launches"]}
    for row in rows:  # a launch measured now replaces what was recorded of it, a rejected one goes
        table.pop(row["key"], None)
        if row.get("accepted"):
            table[row["key"]] = {"key": row["key"], "ctas_per_sm": row["ctas_per_sm"], "smem": row["smem"],
                                 "registers": row["registers"]}
    document = {"about": "CTAs per Hopper SM of each accepted launch of research.kernels.mla_decode, read off the "
                         "compiled kernel by tools/bench/kernel_report.py --write-occupancy (jax "
                         f"{jax.__version__})", "launches": sorted(table.values(), key=lambda r: r["key"])}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {len(table)} launches to {path}")


if __name__ == "__main__":
    main()
