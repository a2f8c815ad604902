"""The generation settings: one dataclass, from which the CLI's flags and their validation, each row's `sampling`
field, the run identity and the engine's `SamplingParams` all derive.

A sampling setting is one field declared with `sampling(...)`. Its name is the `SamplingParams` argument it feeds, and
that one declaration gives the flag --<name-with-dashes> (its type, default, metavar and help), the entry in each row's
`sampling` field (in declaration order), an identity entry and the argument to `SamplingParams`. `SamplingParams`
checks the values; `from_args` turns its errors into errors that name the flag.

Every field but those declared with identity=False decides the rows, so it is part of the run identity. A setting
added later must default to what runs made before it behaved as: a manifest written then lacks its entry and is
compared as if it held the default (`identity_defaults`), so such a run still resumes.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from stage1.data.errors import DataError
from stage1.data.filters import COPY_THRESHOLD, NEAR_DUP_THRESHOLD, SELECT_ALL, SELECT_CHOICES
from stage1.data.judge import DEFAULT_JUDGE_STYLE, load_judge_styles
from stage1.data.prompts import DEFAULT_STYLE
from stage1.engine.params import SamplingParams

_SAMPLING = "sampling"
_IDENTITY = "identity"


def sampling(default: Any, metavar: str, help: str) -> Any:
    """A sampling setting: a `SamplingParams` argument of that name, a CLI flag parsing the default's type."""
    return field(default=default, metadata={_SAMPLING: True, "metavar": metavar, "help": help})


def not_identity(default: Any) -> Any:
    """A setting that does not change the rows (a resumed run may change it)."""
    return field(default=default, metadata={_IDENTITY: False})


@dataclass(frozen=True)
class GenerationConfig:
    style: str = DEFAULT_STYLE
    # Sampling: declared once each (see the module docstring); rows list them in this order.
    temperature: float = sampling(0.7, "T", "0 is greedy")
    top_p: float = sampling(0.9, "P", "nucleus sampling")
    top_k: int = sampling(0, "K", "0 is off")
    min_p: float = sampling(0.0, "P", "drop tokens less likely than P times the most likely one; 0 is off")
    max_tokens: int = sampling(256, "N", "most new tokens per completion; longer ones are rejected as run_on")
    n: int = sampling(1, "N", "completions per instruction")
    seed: int = 0  # the run seed; each row's derives from it and the row's id
    batch_size: int = not_identity(64)  # rows are appended and fsynced each time this many more instructions are done
    allow_run_on: bool = False
    near_dedup: bool = True
    near_dup_threshold: float = NEAR_DUP_THRESHOLD
    copy_threshold: float = COPY_THRESHOLD
    # --decontaminate's eval files (as given) and --decontaminate-field's names; the identity records the files by
    # path, hash and text count instead (Run.identity's `decontaminate`)
    decontaminate: tuple[str, ...] = not_identity(())
    decontaminate_fields: tuple[str, ...] = not_identity(())
    select: str = SELECT_ALL  # which of an instruction's --n completions are kept (filters.BestLogprob)
    # --judge: the model rates each completion the selection kept (judge.py); --min-judge-score: LowJudgeScore
    judge: bool = False
    judge_style: str = DEFAULT_JUDGE_STYLE
    min_judge_score: float | None = None
    stop_token_ids: list[int] | None = not_identity(None)  # None: the model's EOS ids plus the Qwen control ids it has

    @classmethod
    def sampling_settings(cls) -> tuple[Field, ...]:
        return tuple(f for f in fields(cls) if f.metadata.get(_SAMPLING))

    def sampling_fields(self) -> dict[str, Any]:
        """What each row records of its sampling (the seed is a field of its own)."""
        return {f.name: getattr(self, f.name) for f in self.sampling_settings()}

    def sampling_params(self, seed: int, stop: Iterable[str], stop_token_ids: Iterable[int]) -> SamplingParams:
        """The engine's parameters for one row (raises SamplingParams' ValueError on a bad value). logprobs=0: each
        generated token's logprob under the raw distribution, for the rows' quality signals (rows.logprob_signals)."""
        return SamplingParams(**self.sampling_fields(), seed=seed, stop=list(stop), stop_token_ids=list(stop_token_ids),
                              logprobs=0)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the rows: two runs whose settings have equal identities write the same rows."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(_IDENTITY, True)}

    @classmethod
    def identity_defaults(cls) -> dict[str, Any]:
        """What an identity entry missing from an older manifest stands for: its setting's default."""
        return {f.name: f.default for f in fields(cls) if f.metadata.get(_IDENTITY, True)}

    def validated(self) -> GenerationConfig:
        """Checked by `SamplingParams` itself, with its normal form (top_k -1 is 0) taken back, so rows and identity
        record what the engine runs. A bad value is a DataError naming the CLI flag."""
        try:
            params = self.sampling_params(seed=0, stop=[], stop_token_ids=[])
        except ValueError as e:
            raise DataError(_flag_error(str(e))) from None
        if self.select not in SELECT_CHOICES:
            raise DataError(f"--select must be one of {', '.join(SELECT_CHOICES)}, got {self.select!r}")
        if self.judge_style not in load_judge_styles():
            raise DataError(f"--judge-style must be one of {', '.join(sorted(load_judge_styles()))}, got "
                            f"{self.judge_style!r}")
        lo, hi = load_judge_styles()[self.judge_style].scores
        if self.min_judge_score is not None and not lo <= self.min_judge_score <= hi:
            raise DataError(f"--min-judge-score must be in [{lo}, {hi}] (the rating scale), got {self.min_judge_score}")
        return replace(self, **{f.name: getattr(params, f.name) for f in self.sampling_settings()})


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_sampling_flags(group: argparse._ArgumentGroup) -> None:
    for f in GenerationConfig.sampling_settings():
        group.add_argument(flag(f), type=type(f.default), default=f.default, metavar=f.metadata["metavar"],
                           help=f"{f.metadata['help']} (default: %(default)s)")


def add_decontamination_flags(group: argparse._ArgumentGroup) -> None:
    """Both jobs' --decontaminate (filters.Decontaminated, stage1/data/decontaminate.py)."""
    group.add_argument("--decontaminate", nargs="+", metavar="FILE",
                       help="eval sets not to train on: reject rows whose instruction or response shares a word "
                            "13-gram with one of their texts, or equals one (under 13 words), after NFKC and "
                            "lower-casing (reason contaminated); JSONL (string fields), text (a text per line) or "
                            "parquet (string columns)")
    group.add_argument("--decontaminate-field", action="append", metavar="NAME",
                       help="the JSONL field / parquet column holding eval text (repeatable; default: every string "
                            "one)")


def from_args(args: argparse.Namespace) -> GenerationConfig:
    """The settings of a parsed command line, validated (DataError naming the flag)."""
    return GenerationConfig(
        style=args.style, **{f.name: getattr(args, f.name) for f in GenerationConfig.sampling_settings()},
        seed=args.seed, batch_size=args.batch_size, allow_run_on=args.allow_run_on, near_dedup=not args.no_near_dedup,
        near_dup_threshold=args.near_dup_threshold, copy_threshold=args.copy_threshold,
        decontaminate=tuple(args.decontaminate or ()), decontaminate_fields=tuple(args.decontaminate_field or ()),
        select=vars(args).get("select", SELECT_ALL),  # the instruction job offers no --select
        # nor a judge; --min-judge-score turns it on
        judge=vars(args).get("judge", False) or vars(args).get("min_judge_score") is not None,
        judge_style=vars(args).get("judge_style", DEFAULT_JUDGE_STYLE),
        min_judge_score=vars(args).get("min_judge_score"),
    ).validated()


def _flag_error(message: str) -> str:
    """'SamplingParams: top_p must be in (0, 1], got 1.5' -> '--top-p must be in (0, 1], got 1.5'."""
    m = re.fullmatch(r"SamplingParams: (\w+) (.*)", message, re.DOTALL)
    by_name = {f.name: f for f in GenerationConfig.sampling_settings()}
    if m and m.group(1) in by_name:
        return f"{flag(by_name[m.group(1)])} {m.group(2)}"
    return f"bad sampling settings: {message}"
