"""The run manifest (manifest.json beside the data): what made this dataset, and whether an output directory already
holds another run. The manifests a run writes are built here, from its description (run.py): a running one, then
complete with each session's record, and the merge's.

`identity` is the part of the arguments that decides the rows (model files, input, prompt data, sampling, filters);
`--resume` needs it to match, batch size and --limit may differ.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage1.data.decontaminate import eval_source
from stage1.data.errors import DataError
from stage1.data.filters import Decontaminated
from stage1.data.hashing import sha256_file
from stage1.data.judge import judge_cost
from stage1.data.writer import CARD_FILE, DATA_FILE, REJECTS_FILE, REPORT_FILE, replaced_whole

if TYPE_CHECKING:
    from stage1.data.engine import Engine
    from stage1.data.pipeline import Pipeline, SessionStats
    from stage1.data.run import Run

MANIFEST_FILE = "manifest.json"
FORMAT = "stage1-sft-manifest/1"


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    return {
        "path": str(model_dir.resolve()),
        "config_sha256": sha256_file(model_dir / "config.json"),
        "tokenizer_sha256": sha256_file(model_dir / "tokenizer.json"),
    }


def code_version() -> dict[str, Any]:
    """The stage1 version and git commit (with a dirty flag) when there is one; None where unknown."""
    version = None
    try:
        import stage1
        version = getattr(stage1, "__version__", None)
    except ImportError:
        pass
    repo = Path(__file__).resolve().parents[2]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # the installed torch's version, read without importing it (the merge runs without torch)
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"stage1_version": version, "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "torch": torch_version}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class Started:
    """When this process's run began: the manifests' times and its wall time."""
    at: str = field(default_factory=now)
    t0: float = field(default_factory=time.perf_counter)

    def wall_s(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


ROW_SEED = "int.from_bytes(sha256(f'{seed}:{id}')[:8], 'big') >> 1"


def _described(run: Run, identity: dict[str, Any]) -> dict[str, Any]:
    """What every manifest of a run says of the command that made it."""
    return {"command": shlex.join(["python", "-m", run.job.cli, *run.argv]), "args": dict(run.flags),
            "identity": identity}


def running_manifest(run: Run, identity: dict[str, Any], model: dict[str, Any], llm: Engine, pipeline: Pipeline,
                     previous: dict[str, Any] | None, started: Started) -> dict[str, Any]:
    """Written before the data files exist, so a crashed run is always recognised and resumable. `previous`: the
    manifest of the run being resumed."""
    from stage1.data.shards import shard_name  # shards.py reads manifests: imported here, when needed

    shard = {} if run.shard is None else {"shard": {"index": run.shard[0], "count": run.shard[1],
                                                    "name": shard_name(*run.shard)}}
    return {
        "format": FORMAT, "status": "running", **shard, "running_on": this_process(),
        "created_at": previous["created_at"] if previous else started.at, "updated_at": started.at,
        **_described(run, identity),
        "model": {**model, "max_model_len": llm.max_model_len, "eos_token_ids": list(llm.eos_token_ids),
                  "vocab_size": llm.vocab_size},
        "code": code_version(),
        "generation": {"style": run.settings.style, "stop": list(pipeline.prompts.style.stop),
                       "stop_token_ids": pipeline.stop_token_ids, **run.settings.sampling_fields(),
                       "seed": run.settings.seed, "row_seed": ROW_SEED},
        **({"judge": pipeline.rating.manifest_entry(run.settings.min_judge_score)} if pipeline.rating else {}),
        "files": {"data": DATA_FILE, "rejects": REJECTS_FILE},
        **_instructions_from(run),
        "sessions": list(previous.get("sessions", [])) if previous else [],
    }


def _instructions_from(run: Run) -> dict[str, Any]:
    """Where the input came from when a `python -m stage1.instructions` run wrote it: that run's manifest."""
    from stage1.data.readers import instruction_run_manifest

    made = instruction_run_manifest(run.instructions)
    if made is None:
        return {}
    manifest = Path(run.instructions).parent / MANIFEST_FILE
    return {"instructions_from": {"manifest": str(manifest), "manifest_sha256": sha256_file(manifest),
                                  "data_sha256": sha256_file(run.instructions), "command": made.get("command"),
                                  "identity": made.get("identity"), "kept": made.get("counts", {}).get("kept")}}


def session_record(run: Run, resumed: bool, engine_info: dict[str, Any], stats: SessionStats,
                   started: Started) -> dict[str, Any]:
    """One session of a run (a run resumed N times has N + 1): where, how fast, and its tail."""
    return {"started_at": started.at, "finished_at": now(), "resumed": resumed, **this_process(),
            "engine": engine_info, "wall_s": started.wall_s(), **stats.as_dict()}


def completed_manifest(manifest: dict[str, Any], summary: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """The running manifest, complete: the whole dataset's counts and this session added (and, with --judge, the
    judge's cost over all sessions)."""
    sessions = manifest["sessions"] + [session]
    judge = {"judge": {**manifest["judge"], "cost": judge_cost(sessions)}} if "judge" in manifest else {}
    return {**manifest, "status": "complete", "updated_at": now(), **summary, **judge, "sessions": sessions}


def merged_manifest(run: Run, identity: dict[str, Any], first_shard: dict[str, Any], summary: dict[str, Any],
                    shard_reports: list[dict[str, Any]], dataset_filter_rejected: int,
                    started: Started) -> dict[str, Any]:
    """The merge's: the model and generation its shards ran with, each shard's report (merge.shard_report)."""
    return {
        "format": FORMAT, "status": "complete", "created_at": started.at, "updated_at": now(),
        **_described(run, identity), "model": first_shard.get("model"), "code": code_version(),
        "generation": first_shard.get("generation"),
        **({"judge": {**first_shard["judge"], "cost": {k: sum(r["judge"][k] for r in shard_reports)
                                                       for k in shard_reports[0]["judge"]}}}
           if "judge" in first_shard else {}),
        "files": {"data": DATA_FILE, "rejects": REJECTS_FILE},
        **summary,
        "merge": {**this_process(), "wall_s": started.wall_s(), "dataset_filter_rejected": dataset_filter_rejected},
        "merged_shards": shard_reports,
    }


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not a valid manifest; pass --overwrite to start a new run there, or choose "
                        "another --out") from None


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Atomic: a kill leaves either the old manifest or the new one."""
    with replaced_whole(Path(out_dir) / MANIFEST_FILE) as f:
        f.write((json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def prepare_out_dir(out_dir: str | Path, identity: dict[str, Any], *, resume: bool, overwrite: bool,
                    implicit: dict[str, Any] | None = None) -> dict | None:
    """Checks that `out_dir` is free, or holds this very run when resuming; --overwrite clears our files.
    Returns the existing manifest when resuming one. `implicit`: what an identity entry stands for where a manifest
    lacks it (one written before that setting existed)."""
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise DataError("--resume and --overwrite contradict each other; pass one of them")
    ours = [out_dir / name for name in (MANIFEST_FILE, DATA_FILE, REJECTS_FILE)]
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; choose another --out")
    if not any(p.exists() for p in ours):
        return None
    if overwrite:  # and the card and report of the run replaced, which would describe it until the new one ends
        for p in ours + ([out_dir / CARD_FILE, out_dir / REPORT_FILE] if (out_dir / MANIFEST_FILE).exists() else []):
            p.unlink(missing_ok=True)
        return None
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise DataError(f"{out_dir} holds {DATA_FILE}/{REJECTS_FILE} but no {MANIFEST_FILE}, so it can't be resumed; "
                        "pass --overwrite to replace it, or choose another --out")
    diff = identity_diff(manifest.get("identity", {}), identity, implicit)
    if diff:
        raise DataError(f"{out_dir} holds a different run ({diff}); pass --overwrite to replace it, or choose "
                        "another --out")
    if not resume:
        raise DataError(f"{out_dir} already holds this run ({manifest.get('status', 'unknown')}); pass --resume to "
                        "continue it, --overwrite to start again, or choose another --out")
    return manifest


def identity_diff(old: dict[str, Any], new: dict[str, Any], implicit: dict[str, Any] | None = None) -> str:
    """The entries that differ, as one line ('' if none); an entry missing from either side is its `implicit`
    value (None if it has none)."""
    implicit = implicit or {}
    old, new = {**implicit, **old}, {**implicit, **new}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


class DatasetSummary:
    """The counts of a dataset, taken one row at a time, so a dataset of any size is summarised without holding it.
    Keeps the instruction ids (to count them) and the histograms, never a row. `eval_files`: --decontaminate's, whose
    contaminated rows it counts by the file their detail names (each file listed, 0 included)."""

    def __init__(self, eval_files: Iterable[str] = ()) -> None:
        self._ids: set[str] = set()
        self._completions = self._kept = self._rejected = 0
        self._finish_reasons: Counter[str] = Counter()
        self._stop_reasons: Counter[str] = Counter()
        self._rejected_by_reason: Counter[str] = Counter()
        self._contaminated_by_file: Counter[str] = Counter(dict.fromkeys(eval_files, 0))
        self._judge: Counter[str] | None = None  # --judge: rows rated, and of those without a score; None: no judge

    def add(self, row: dict[str, Any], *, kept: bool) -> None:
        self._ids.add(row["id"])
        if kept:
            self._kept += 1
        else:
            self._rejected += 1
            self._rejected_by_reason[row["reason"]] += 1
            if row["reason"] == Decontaminated.name:
                source = eval_source(row.get("detail"))
                self._contaminated_by_file[source[0] if source else str(row.get("detail"))] += 1
        if "judge_score" in row:
            self._judge = self._judge if self._judge is not None else Counter(rated=0, no_score=0)
            rated = row.get("judge_prompt_sha256") is not None
            self._judge["rated"] += rated
            self._judge["no_score"] += rated and row["judge_score"] is None
        if row.get("index") is not None:  # a completion (index None: an instruction rejected before generation)
            self._completions += 1
            self._finish_reasons[str(row.get("finish_reason"))] += 1
            self._stop_reasons[_stop_label(row)] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": {"instructions": len(self._ids), "completions": self._completions, "kept": self._kept,
                       "rejected": self._rejected},
            "finish_reasons": _histogram(self._finish_reasons),
            "stop_reasons": _histogram(self._stop_reasons),
            "rejected_by_reason": _histogram(self._rejected_by_reason),
            **({"contaminated_by_eval_file": dict(self._contaminated_by_file)} if self._contaminated_by_file else {}),
            **({"judged": dict(self._judge)} if self._judge is not None else {}),
        }


def _stop_label(row: dict[str, Any]) -> str:
    if row.get("stop_reason") is not None:
        return str(row["stop_reason"])
    return "length" if row.get("finish_reason") == "length" else "eos"


def _histogram(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def dataset_summary(kept: Iterable[dict[str, Any]], rejected: Iterable[dict[str, Any]],
                    eval_files: Iterable[str] = ()) -> dict[str, Any]:
    """Counts over the whole dataset on disk (all sessions of a resumed run); the rows may come one at a time."""
    summary = DatasetSummary(eval_files)
    for row in kept:
        summary.add(row, kept=True)
    for row in rejected:
        summary.add(row, kept=False)
    return summary.as_dict()
