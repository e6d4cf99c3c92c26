"""Problems for training and evaluation: JSONL / Parquet files, or the demo's built-in generator.

A dataset spec is a path to a ``.jsonl`` or ``.parquet`` file, or ``builtin:<name>``:

- ``builtin:demo-train`` / ``builtin:demo-eval``: the demo's synthetic integer-answer
  problems (:mod:`training.demo_tasks`), disjoint, deterministic in the seed.

File rows need a problem text and a reference answer. Column names (checked in this
order, the first present wins; override with ``problem_field`` / ``answer_field``):

- problem: ``problem``, ``question``, ``prompt``. A ``prompt`` that is a chat message
  list (verl / DAPO-Math-17k original layout) yields its last user message.
- answer: ``answer``, ``ground_truth``, ``reward_model.ground_truth`` (verl layout).
  ``solution`` is *not* taken automatically: in MATH-style sets it is a worked solution,
  in others (open-r1/DAPO-Math-17k-Processed) the bare answer; say
  ``answer_field="solution"`` when it is the answer.
- optional id: ``id``; otherwise ``<file stem>:<line or row>``.

Bad rows (unparsable JSON, missing or empty fields, wrong types, duplicate ids) are never
dropped silently: by default loading raises :class:`DataError` listing every one with
``file:line`` and the reason; with ``on_bad_row="skip"`` they are skipped and returned in
:attr:`Dataset.rejected` (and the caller reports them). The paper's integer-answer filter
(``integer_answers_only``) is a filter, not an error: what it removes is listed in
:attr:`Dataset.filtered_out`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "ground_truth", "reward_model.ground_truth")
BUILTINS = ("demo-train", "demo-eval")


@dataclass(frozen=True)
class Problem:
    """One problem: a stable id, the text shown to the model, and the reference answer (text)."""

    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class RowIssue:
    """A row that was not loaded: where it is (``file:line`` for JSONL, ``file:row N`` for Parquet) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class DataError(ValueError):
    """A dataset cannot be loaded as given; ``issues`` lists every bad row (or the one file problem)."""

    def __init__(self, message: str, issues: list[RowIssue] | None = None):
        self.issues = issues or []
        shown = "\n".join(f"  {i}" for i in self.issues[:20])
        more = f"\n  ... and {len(self.issues) - 20} more" if len(self.issues) > 20 else ""
        super().__init__(message + (f"\n{shown}{more}" if shown else ""))


@dataclass
class Dataset:
    """What :func:`load_dataset` returns: the problems, and every row it did not keep, with why."""

    problems: list[Problem]
    rejected: list[RowIssue] = field(default_factory=list)  # bad rows (only with on_bad_row="skip")
    filtered_out: list[RowIssue] = field(default_factory=list)  # good rows the integer filter removed


class DataConfig(BaseModel):
    """Where problems come from and how they are checked."""

    model_config = ConfigDict(extra="forbid")

    train: str = "builtin:demo-train"  # dataset spec: a .jsonl/.parquet path or builtin:<name>
    eval: str | None = "builtin:demo-eval"  # held-out spec; None = split eval_size off train
    eval_size: int = Field(64, ge=0)  # held-out problems split off train when eval is None
    integer_answers_only: bool = False  # the paper's filter: keep only problems with integer answers
    on_bad_row: Literal["error", "skip"] = "error"  # raise DataError listing bad rows, or skip and report them
    problem_field: str | None = None  # column holding the problem (None = auto, see module doc)
    answer_field: str | None = None  # column holding the answer (None = auto); dotted for nested, e.g. reward_model.ground_truth
    split_seed: int = 0  # seed of the deterministic train/eval split


_INT_RE = re.compile(r"^[+-]?\d+$")
_WRAPPERS = (re.compile(r"^\$(.*)\$$", re.S), re.compile(r"^\\boxed\{(.*)\}$", re.S))


def integer_answer(answer: str) -> int | None:
    """The integer an answer denotes, or None when it is not a plain integer.

    Accepts optional sign, surrounding ``$...$`` or ``\\boxed{...}``, and thousands
    separators (``1,000``); rejects fractions, decimals, expressions and ``3.0``.
    """
    s = answer.strip()
    for _ in range(2):
        for w in _WRAPPERS:
            m = w.match(s)
            if m:
                s = m.group(1).strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    return int(s) if _INT_RE.match(s) else None


def _get(row: dict[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; KeyError when any part is missing."""
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _has(row: dict[str, Any], dotted: str) -> bool:
    try:
        _get(row, dotted)
        return True
    except KeyError:
        return False


def _problem_text(value: Any) -> str:
    """Problem text from a string or a chat message list (last user message); ValueError says why not."""
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("prompt is a message list without a user message")
        value = users[-1]
    if not isinstance(value, str):
        raise ValueError(f"problem must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("problem is empty")
    return value


def _answer_text(value: Any) -> str:
    """Answer text from a string or an integer; ValueError says why not."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"answer must be a string or an integer, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():  # Parquet/pandas often store integer answers as floats
            return str(int(value))
        return repr(value)
    if not isinstance(value, str):
        raise ValueError(f"answer must be a string or an integer, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("answer is empty")
    return value.strip()


def _pick(row: dict[str, Any], explicit: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to read ``what`` from; ValueError names the columns present and the fix."""
    if explicit is not None:
        if not _has(row, explicit):
            raise ValueError(f"no {what} column {explicit!r} (columns: {sorted(row)})")
        return explicit
    for c in candidates:
        if _has(row, c):
            return c
    raise ValueError(
        f"no {what} column: looked for {list(candidates)}, found {sorted(row)}; set {what}_field to the right column"
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowIssue]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():  # blank lines (e.g. a trailing newline) are not rows
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowIssue(where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield where, RowIssue(where, f"a row must be a JSON object, got {type(row).__name__}")
                continue
            yield where, row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowIssue]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


def _load_file(path: Path, cfg: DataConfig) -> Dataset:
    if not path.exists():
        raise DataError(f"dataset file {path} does not exist; give a .jsonl or .parquet path or builtin:<name> ({', '.join(BUILTINS)})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _iter_jsonl(path)
    elif suffix == ".parquet":
        rows = _iter_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .parquet")

    problems: list[Problem] = []
    bad: list[RowIssue] = []
    filtered: list[RowIssue] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        if isinstance(row, RowIssue):
            bad.append(row)
            continue
        try:
            problem = _problem_text(_get(row, _pick(row, cfg.problem_field, PROBLEM_FIELDS, "problem")))
            answer = _answer_text(_get(row, _pick(row, cfg.answer_field, ANSWER_FIELDS, "answer")))
            pid = row.get("id")
            pid = str(pid) if pid is not None else f"{path.stem}:{where.rsplit(':', 1)[1].replace('row ', '')}"
            if pid in seen:
                raise ValueError(f"duplicate id {pid!r} (first at {seen[pid]})")
        except ValueError as e:
            bad.append(RowIssue(where, str(e)))
            continue
        seen[pid] = where
        if cfg.integer_answers_only and integer_answer(answer) is None:
            filtered.append(RowIssue(where, f"answer {answer!r} is not an integer"))
            continue
        problems.append(Problem(pid, problem, answer))

    if bad and cfg.on_bad_row == "error":
        raise DataError(
            f"{path}: {len(bad)} bad row(s); fix them, or set on_bad_row='skip' to skip and report them", bad
        )
    return Dataset(problems, bad, filtered)


def _load_builtin(name: str, cfg: DataConfig, demo: Any) -> Dataset:
    from training.demo_tasks import DemoConfig, demo_splits

    if name not in BUILTINS:
        raise DataError(f"unknown builtin dataset {name!r}; choose from {[f'builtin:{b}' for b in BUILTINS]}")
    demo = demo or DemoConfig()
    train, held = demo_splits(demo.n_train, demo.n_eval, seed=demo.seed, families=demo.families)
    chosen = train if name == "demo-train" else held
    return Dataset([Problem(p.id, p.problem, str(p.answer)) for p in chosen])


def load_dataset(spec: str, cfg: DataConfig | None = None, *, demo: Any = None) -> Dataset:
    """Load ``spec`` (a .jsonl/.parquet path or ``builtin:<name>``) with the checks in ``cfg``.

    ``demo``: a :class:`training.demo_tasks.DemoConfig` for builtin specs (default settings
    if None). Raises :class:`DataError` for a missing/unsupported file, an unknown builtin,
    bad rows when ``cfg.on_bad_row == "error"``, or when nothing is left to train on.
    """
    cfg = cfg or DataConfig()
    if spec.startswith("builtin:"):
        ds = _load_builtin(spec.removeprefix("builtin:"), cfg, demo)
    else:
        ds = _load_file(Path(spec).expanduser(), cfg)
    if not ds.problems:
        detail = (
            f" ({len(ds.filtered_out)} removed by integer_answers_only, {len(ds.rejected)} bad)"
            if ds.filtered_out or ds.rejected
            else ""
        )
        raise DataError(f"{spec}: no problems left to use{detail}", ds.rejected + ds.filtered_out)
    return ds


def load_problems(spec: str, cfg: DataConfig | None = None, *, demo: Any = None) -> list[Problem]:
    """The problems of :func:`load_dataset`; bad rows raise :class:`DataError` unless ``cfg`` says skip."""
    return load_dataset(spec, cfg, demo=demo).problems


def split_problems(problems: list[Problem], eval_size: int, *, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Deterministic (train, eval) split: eval = the ``eval_size`` problems with the smallest seeded hash of id.

    Depends only on ids and ``seed`` (not on row order), so adding rows to a file moves
    few problems between the sides. Raises ValueError when ``eval_size`` leaves no training problem.
    """
    if eval_size >= len(problems):
        raise ValueError(f"eval_size ({eval_size}) must be smaller than the number of problems ({len(problems)})")

    def key(p: Problem) -> bytes:
        return hashlib.sha256(f"{seed}:{p.id}".encode()).digest()

    held = {p.id for p in sorted(problems, key=key)[:eval_size]}
    return [p for p in problems if p.id not in held], [p for p in problems if p.id in held]


def load_train_eval(cfg: DataConfig, *, demo: Any = None) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems as ``cfg`` says: two specs, or one split by :func:`split_problems`."""
    train = load_problems(cfg.train, cfg, demo=demo)
    if cfg.eval is not None:
        return train, load_problems(cfg.eval, cfg, demo=demo)
    return split_problems(train, cfg.eval_size, seed=cfg.split_seed)
