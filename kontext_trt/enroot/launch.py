"""Submit one Slurm engine-build job per (partition -> SKU) entry of a fleet matrix into a shared engine cache.

    python -m kontext_trt.enroot.launch enroot/fleet.example.toml --image /shared/kontext-trt-25.12-py3.sqsh \\
        --onnx /shared/kontext/onnx --engines /shared/kontext/engines [--dry-run]

Each job runs enroot/build_engines.sbatch, which runs `kontext-trt build` in the enroot image through pyxis.
Precisions whose ENGINES/<sku>-sm<cc>/*/<precision>/manifest.json exists are skipped. The whole matrix is
checked before anything is submitted: a bad entry is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kontext_trt.engines.skus import SKUS, Sku

PRECISIONS = ("bf16", "fp8", "nvfp4")
KEYS = ("partition", "sku", "precision", "precisions", "sizes", "gres", "account", "time")
SIZE = re.compile(r"[1-9][0-9]*x[1-9][0-9]*")
SCRIPT = Path(__file__).with_name("build_engines.sbatch")


class MatrixError(ValueError):
    """A fleet matrix that must not be submitted; the message is the whole error line."""


@dataclass(frozen=True)
class Entry:
    """One checked matrix entry: a SKU built on one partition."""

    number: int
    partition: str
    sku: Sku
    precisions: tuple[str, ...]
    sizes: str
    gres: str
    account: str | None
    time: str | None


def text(table: dict, key: str, default: str | None = None) -> str | None:
    """The string value of key, or default when absent."""
    value = table.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise MatrixError(f"{key} must be a non-empty string")
    return value


def precisions_of(table: dict, sku: Sku) -> tuple[str, ...]:
    """The precisions an entry asks for, each known and supported by its SKU."""
    if "precision" in table and "precisions" in table:
        raise MatrixError("give precision or precisions, not both")
    value = table.get("precision", table.get("precisions"))
    if value is None:
        raise MatrixError("missing precision")
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(p, str) for p in values):
        raise MatrixError("precisions must be a non-empty list of strings")
    for p in values:
        if p not in PRECISIONS:
            raise MatrixError(f"unknown precision '{p}'; known: {', '.join(PRECISIONS)}")
        if p not in sku.peak_tflops:
            raise MatrixError(f"sku '{sku.name}' has no {p}; it supports {', '.join(sku.peak_tflops)}")
    return tuple(dict.fromkeys(values))


def sizes_of(table: dict) -> str:
    """The --sizes argument: "all" or comma-joined WxH sizes."""
    value = table.get("sizes", "all")
    if value == "all":
        return value
    if not isinstance(value, list) or not value:
        raise MatrixError("sizes must be \"all\" or a list of \"WxH\" strings")
    for size in value:
        if not isinstance(size, str) or not SIZE.fullmatch(size):
            raise MatrixError(f"bad size {size!r}; want \"WxH\" like \"1024x1024\"")
    return ",".join(value)


def parse_entry(number: int, table: object) -> Entry:
    """One matrix table checked and turned into an Entry."""
    if not isinstance(table, dict):
        raise MatrixError("not a table")
    for key in table:
        if key not in KEYS:
            raise MatrixError(f"unknown key '{key}'; known: {', '.join(KEYS)}")
    for key in ("partition", "sku"):
        if key not in table:
            raise MatrixError(f"missing {key}")
    name = text(table, "sku")
    if name not in SKUS:
        raise MatrixError(f"unknown sku '{name}'; known: {', '.join(SKUS)}")
    sku = SKUS[name]
    return Entry(
        number=number,
        partition=text(table, "partition"),
        sku=sku,
        precisions=precisions_of(table, sku),
        sizes=sizes_of(table),
        gres=text(table, "gres", "gpu:1"),
        account=text(table, "account"),
        time=text(table, "time"),
    )


def load_matrix(path: Path) -> list[Entry]:
    """Every entry of the fleet matrix at path, or MatrixError naming the first bad one."""
    try:
        matrix = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise MatrixError(f"{path.name}: {err}") from err
    tables = matrix.get("build")
    if not isinstance(tables, list) or not tables:
        raise MatrixError(f"{path.name}: no [[build]] entries")
    entries, seen = [], {}
    for number, table in enumerate(tables, start=1):
        try:
            entry = parse_entry(number, table)
        except MatrixError as err:
            raise MatrixError(f"{path.name} entry {number}: {err}") from err
        for p in entry.precisions:
            first = seen.setdefault((entry.sku.name, p), number)
            if first != number:
                raise MatrixError(f"{path.name} entry {number}: sku '{entry.sku.name}' {p} is already in entry {first}")
        entries.append(entry)
    return entries


def is_built(engines: Path, sku: Sku, precision: str) -> bool:
    """Whether the cache holds a manifest for this SKU and precision, for any TensorRT version."""
    return any((engines / sku.tag).glob(f"*/{precision}/manifest.json"))


def script_args(entry: Entry, precisions: list[str], args: argparse.Namespace) -> list[str]:
    """The arguments build_engines.sbatch gets for this entry."""
    return [
        "--image", args.image, "--onnx", args.onnx, "--out", args.engines,
        "--sku", entry.sku.name, "--backend", entry.sku.flavor,
        "--precision", ",".join(precisions), "--sizes", entry.sizes,
    ]


def sbatch_command(entry: Entry, precisions: list[str], args: argparse.Namespace) -> list[str]:
    """The sbatch command line that submits this entry's job."""
    cmd = [args.sbatch, "--parsable", f"--partition={entry.partition}",
           f"--job-name=kontext-trt-{entry.sku.name}", f"--gres={entry.gres}"]
    if entry.account:
        cmd.append(f"--account={entry.account}")
    if entry.time:
        cmd.append(f"--time={entry.time}")
    return [*cmd, args.script, *script_args(entry, precisions, args)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options, with paths made absolute for the compute nodes."""
    parser = argparse.ArgumentParser(prog="kontext_trt.enroot.launch", description=__doc__.splitlines()[0])
    parser.add_argument("fleet", type=Path, help="fleet matrix (TOML), see enroot/fleet.example.toml")
    parser.add_argument("--image", required=True, help="kontext-trt .sqsh image on a shared filesystem")
    parser.add_argument("--onnx", required=True, help="ONNX export folder on a shared filesystem")
    parser.add_argument("--engines", required=True, help="shared engine cache folder")
    parser.add_argument("--script", default=str(SCRIPT), help="batch script (default: %(default)s)")
    parser.add_argument("--sbatch", default=os.environ.get("SBATCH", "sbatch"),
                        help="sbatch executable (default: $SBATCH or sbatch)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch and container commands only")
    args = parser.parse_args(argv)
    for name in ("image", "onnx", "engines", "script"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def show_job(entry: Entry, precisions: list[str], args: argparse.Namespace) -> None:
    """Print the sbatch line and, indented, the commands the job would run."""
    print(shlex.join(sbatch_command(entry, precisions, args)))
    job = subprocess.run(["bash", args.script, "--dry-run", *script_args(entry, precisions, args)],
                         capture_output=True, text=True, check=True)
    for line in job.stdout.splitlines():
        print(f"  {line}")


def submit_job(entry: Entry, precisions: list[str], args: argparse.Namespace) -> None:
    """Submit the entry's job and print its id."""
    job = subprocess.run(sbatch_command(entry, precisions, args), capture_output=True, text=True, check=True)
    print(f"entry {entry.number}: {entry.sku.name} on {entry.partition}: job {job.stdout.strip().split(';')[0]}")


def main(argv: list[str] | None = None) -> int:
    """Check the fleet matrix, then submit (or print) one job per entry that still lacks engines."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        entries = load_matrix(args.fleet)
    except MatrixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engines = Path(args.engines)
    for entry in entries:
        built = [p for p in entry.precisions if is_built(engines, entry.sku, p)]
        todo = [p for p in entry.precisions if p not in built]
        if built:
            print(f"skip entry {entry.number}: {entry.sku.name} {', '.join(built)} already in {engines / entry.sku.tag}")
        if not todo:
            continue
        try:
            if args.dry_run:
                show_job(entry, todo, args)
            else:
                submit_job(entry, todo, args)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            print(f"error: entry {entry.number}: {detail.strip()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
