"""GlobalOpinionQA as the paper uses it (arXiv 2405.20304 §5.2; Durmus et al. 2023).

Two input formats become one *source table* (one row per question × country):

    question_id, group, question, options (list[str]), shares (list[float]), where

``question_id`` identifies the question by its content (:func:`question_key` of the question text
and the options), in both formats: the offline files' ``id`` is unique per *row* (the same
question asked in several countries has several ids), so it cannot keep a question in one split.

- the Hub's ``Anthropic/llm_global_opinions`` (a CSV with columns ``question``, ``selections`` —
  a *string* holding ``defaultdict(<class 'list'>, {country: [share, ...], ...})`` —, ``options``
  — a string holding a Python list — and ``source``), read through ``datasets``: from the Hub when
  online, or from a local copy of that file;
- the "distributional" JSON of ``../shared/data/globalopinionqa/`` (a list of objects with
  ``question`` = ``"Question: …\\nOptions: A. … B. …\\nAnswer:"``, ``options``, ``attribute`` =
  the country, ``gold_distribution`` = the shares, ``id`` = a row id, not used).

Pairs (:func:`build_pairs`): one per (question, country): the paper's prompt
``Opinion of people in {country} on: {question}\\nPlease select the best response:`` and the
lettered options; chosen = the letter of the country's most frequent answer (argmax of the shares,
the first on ties); rejected = a uniformly drawn other letter, from a generator seeded by
(seed, question_id, country) so a pair does not change when other countries are added.
Splits by question (:func:`grpo.data.splits.split_by_question`), 80/10/10 by default.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from grpo.data.prompts import LETTERS, format_prompt
from grpo.data.schema import (
    COLUMNS,
    DataFormatError,
    parse_json_document,
    parse_json_lines,
    read_text,
)
from grpo.data.splits import check_fractions, split_by_question

PAPER_COUNTRIES: tuple[str, ...] = (
    "Nigeria",
    "Egypt",
    "India (Current national sample)",
    "China",
    "Japan",
)
HUB_ID = "Anthropic/llm_global_opinions"
SOURCE_COLUMNS = ("question_id", "group", "question", "options", "shares", "where")
FORMATS = ("auto", "hub", "distributional")


@dataclass
class GlobalOpinionQAConfig:
    """Settings of the GlobalOpinionQA source (``params.yaml`` → ``data.globalopinionqa``)."""

    path: str | None = "../shared/data/globalopinionqa/goqa_subset.json"  # None: the Hub
    format: str = "auto"  # auto | hub | distributional (auto: by the file's columns)
    hub_id: str = HUB_ID
    groups: tuple[str, ...] = PAPER_COUNTRIES
    splits: tuple[float, ...] = (0.8, 0.1, 0.1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: must be one of {list(FORMATS)}, got {self.format!r}")
        self.groups = tuple(str(g) for g in self.groups)
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups: need distinct country names, got {list(self.groups)}")
        self.splits = check_fractions(self.splits)
        if self.path in ("", "null", "None"):
            self.path = None


def question_key(question: str, options: Sequence[str]) -> str:
    """A question's id from its content: ``"q"`` + the first 12 hex digits of the sha256 of

        normalise(question) + "\x1f" + "\x1e".join(normalise(o) for o in options)

    where ``normalise`` collapses runs of whitespace to one space, strips and case-folds. The
    same question (text and options) gets the same id in every country and in either file
    format; a question with other options is another question. 48 bits: for the Hub's ~2,600
    questions the chance of any collision is about 1e-8.
    """

    def normalise(text: str) -> str:
        return " ".join(str(text).split()).casefold()

    canonical = normalise(question) + "\x1f" + "\x1e".join(normalise(o) for o in options)
    return "q" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


# --- the distributional JSON ------------------------------------------------------------------

_QUESTION = re.compile(r"^\s*Question:\s*(?P<q>.*?)\s*\n\s*Options:.*$", re.DOTALL)


def bare_question(text: str) -> str:
    """``"Question: Q\\nOptions: A. … B. …\\nAnswer:"`` → ``"Q"``; other text is returned stripped."""
    match = _QUESTION.match(text)
    return match.group("q").strip() if match else text.strip()


def read_distributional(path: str | Path) -> pd.DataFrame:
    """Read the distributional JSON (a list, or JSON lines) into the source table.

    Errors (:class:`DataFormatError`) name the file, the item and the field.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        items = parse_json_document(text, path)
        wheres = [f"{path}: item {i}" for i in range(len(items))]
    else:
        items, lines = parse_json_lines(text, path)
        wheres = [f"{path}: line {n}" for n in lines]
    if not items:
        raise DataFormatError(f"{path}: no rows")
    rows = []
    for item, where in zip(items, wheres, strict=True):
        missing = [
            k
            for k in ("question", "options", "attribute", "gold_distribution", "id")
            if k not in item
        ]
        if missing:
            raise DataFormatError(
                f"{where}: missing field(s) {missing} of the distributional format "
                "(question, options, attribute, gold_distribution, id)"
            )
        _string(item["id"], f"{where}, field 'id'")  # checked, not used: ids are per row
        question = bare_question(_string(item["question"], f"{where}, field 'question'"))
        options = _string_list(item["options"], f"{where}, field 'options'")
        rows.append(
            {
                "question_id": question_key(question, options),
                "group": _string(item["attribute"], f"{where}, field 'attribute'"),
                "question": question,
                "options": options,
                "shares": _number_list(
                    item["gold_distribution"], f"{where}, field 'gold_distribution'"
                ),
                "where": where,
            }
        )
    return pd.DataFrame(rows, columns=list(SOURCE_COLUMNS))


# --- the Hub format ---------------------------------------------------------------------------

_DEFAULTDICT = re.compile(
    r"^\s*defaultdict\(\s*<class '[A-Za-z_]+'>\s*,\s*(?P<body>.*)\)\s*$", re.DOTALL
)
_NAN = re.compile(r"(?<![A-Za-z_'\"])nan(?![A-Za-z_'\"])")


def parse_literal(text: Any, where: str) -> Any:
    """A Hub cell holding a Python literal (``"['a', 'b']"``, ``"defaultdict(<class 'list'>, {...})"``).

    Already-parsed values pass through. A bare ``nan`` (not a valid literal) is read as a missing
    share (NaN, which the validation suite reports); only tried when the text does not parse as it
    is, so an answer text containing "nan" is never touched.
    """
    if not isinstance(text, str):
        return text
    body = text.strip()
    match = _DEFAULTDICT.match(body)
    if match:
        body = match.group("body").strip()
    try:
        return ast.literal_eval(body)
    except (ValueError, SyntaxError) as exc:
        first = exc
    try:
        return ast.literal_eval(_NAN.sub("None", body))
    except (ValueError, SyntaxError):
        raise DataFormatError(
            f"{where}: not a Python literal ({first.__class__.__name__}: {first})"
        ) from None


def hub_records(rows: Iterable[Mapping[str, Any]], origin: str) -> pd.DataFrame:
    """Rows in the Hub's format → the source table (one row per question × country).

    ``question_id`` is :func:`question_key` of the row's question and options, so a question
    repeated in another row of the file is still one question.
    """
    out = []
    for i, row in enumerate(rows):
        where = f"{origin}: row {i}"
        missing = [k for k in ("question", "selections", "options") if k not in row]
        if missing:
            raise DataFormatError(
                f"{where}: missing column(s) {missing} of the Hub format (question, selections, options, source)"
            )
        options = _string_list(
            parse_literal(row["options"], f"{where}, field 'options'"), f"{where}, field 'options'"
        )
        selections = parse_literal(row["selections"], f"{where}, field 'selections'")
        if not isinstance(selections, Mapping):
            raise DataFormatError(
                f"{where}, field 'selections': expected a dict country -> shares, got {type(selections).__name__}"
            )
        question = _string(row["question"], f"{where}, field 'question'").strip()
        qid = question_key(question, options)
        for country, shares in selections.items():
            out.append(
                {
                    "question_id": qid,
                    "group": str(country),
                    "question": question,
                    "options": options,
                    "shares": _number_list(shares, f"{where}, field 'selections' [{country!r}]"),
                    "where": f"{where} [{country}]",
                }
            )
    if not out:
        raise DataFormatError(f"{origin}: no rows")
    return pd.DataFrame(out, columns=list(SOURCE_COLUMNS))


def load_hub(path: str | Path | None = None, hub_id: str = HUB_ID) -> pd.DataFrame:
    """The Hub dataset through ``datasets``: ``load_dataset(hub_id)`` when ``path`` is None, else a
    local copy of its file (CSV, JSON/JSONL or Parquet) through the matching ``datasets`` builder."""
    import datasets

    datasets.disable_progress_bars()
    if path is None:
        try:
            ds = datasets.load_dataset(hub_id, split="train")
        except Exception as exc:  # offline, unknown id, no access: all surface as different types
            raise DataFormatError(
                f"could not load {hub_id!r} from the Hugging Face Hub ({exc.__class__.__name__}: "
                f"{exc}); offline, set data.globalopinionqa.path to a local copy"
            ) from None
        return hub_records(ds, hub_id)
    path = Path(path)
    builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
        path.suffix.lower()
    )
    if builder is None:
        raise DataFormatError(
            f"{path}: unknown file type {path.suffix!r}; expected .csv, .json, .jsonl or .parquet"
        )
    if builder != "parquet":
        read_text(path)  # clear errors for a missing or non-UTF-8 file before datasets sees it
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: the file is empty")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise DataFormatError(
            f"{path}: cannot be read as {builder} ({exc.__class__.__name__}: {exc})"
        ) from None
    return hub_records(ds, str(path))


def detect_format(path: str | Path) -> str:
    """``"hub"`` when the file has a ``selections`` column/field, else ``"distributional"``."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".parquet"):
        return "hub"
    head = read_text(path)[:20000]
    return "hub" if re.search(r'"selections"\s*:', head) else "distributional"


def is_opinion_file(path: str | Path) -> bool:
    """True for a GlobalOpinionQA file (Hub CSV/JSON or distributional JSON), not a pair table.

    Looks at the CSV header or the first 20,000 characters for the formats' own fields.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json", ".jsonl") or not path.is_file():
        return False
    try:
        head = path.read_bytes()[:20000].decode("utf-8", errors="replace")
    except OSError:
        return False
    if suffix == ".csv":
        header = head.splitlines()[0] if head else ""
        return "selections" in header and "pair_id" not in header
    return (
        bool(re.search(r'"(gold_distribution|selections)"\s*:', head)) and '"pair_id"' not in head
    )


def load_source(cfg: GlobalOpinionQAConfig) -> pd.DataFrame:
    """The configured file or the Hub → the source table, every country (not yet filtered)."""
    if cfg.path is None:
        return load_hub(None, cfg.hub_id)
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    return load_hub(cfg.path) if fmt == "hub" else read_distributional(cfg.path)


# --- pairs ------------------------------------------------------------------------------------


def pair_rng(seed: int, question_id: str, group: str) -> np.random.Generator:
    """A generator that depends only on (seed, question, group): stable under adding countries."""
    digest = hashlib.sha256(f"{question_id}\x1f{group}".encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def choose_pair(shares: list[float], rng: np.random.Generator) -> tuple[int, int]:
    """(chosen, rejected) option indices: argmax of ``shares`` (first on ties), and a uniformly
    drawn other option."""
    values = np.asarray(shares, dtype=float)
    if values.size < 2 or not np.isfinite(values).all():
        raise ValueError(f"need at least two finite shares, got {shares}")
    chosen = int(np.argmax(values))
    others = [i for i in range(values.size) if i != chosen]
    return chosen, int(others[int(rng.integers(len(others)))])


def pairs_from_source(
    source: pd.DataFrame, groups: Iterable[str], seed: int, splits: tuple[float, ...]
) -> pd.DataFrame:
    """The source table → the canonical pair table for ``groups`` (sorted by ``pair_id``).

    Rows whose shares cannot give a pair (fewer than two options, NaN shares, more shares than
    options) are skipped here; the validation suite reports them on the source table. A question
    asked twice for one country (same text and options in two rows, e.g. two survey waves) gives
    one pair, from its first row: two pairs with one prompt would share a ``pair_id``.
    """
    groups = list(groups)
    rows = source[source["group"].isin(groups)]
    unknown = sorted(set(groups) - set(rows["group"]))
    if unknown:
        known = sorted(set(source["group"]))
        raise DataFormatError(
            f"group(s) {unknown} have no rows in the source; check the spelling "
            f"(it has {len(known)} countries, e.g. {known[:8]})"
        )
    pairs, seen = [], set()
    for rec in rows.itertuples(index=False):
        n = len(rec.options)
        if n < 2 or len(rec.shares) != n or not all(math.isfinite(s) for s in rec.shares):
            continue
        if (rec.question_id, rec.group) in seen:
            continue
        seen.add((rec.question_id, rec.group))
        chosen, rejected = choose_pair(list(rec.shares), pair_rng(seed, rec.question_id, rec.group))
        pairs.append(
            {
                "pair_id": f"{rec.question_id}-{rec.group}",
                "question_id": rec.question_id,
                "group": rec.group,
                "prompt": format_prompt(rec.group, rec.question, rec.options),
                "chosen": LETTERS[chosen],
                "rejected": LETTERS[rejected],
            }
        )
    table = pd.DataFrame(pairs, columns=[c for c in COLUMNS if c != "split"])
    assignment = split_by_question(table["question_id"], table["group"], splits, seed)
    table["split"] = table["question_id"].map(assignment)
    table = table[list(COLUMNS)].astype(object)
    return table.sort_values("pair_id", kind="mergesort").reset_index(drop=True)


def build(cfg: GlobalOpinionQAConfig | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, source rows of the configured groups) for the configured file or the Hub."""
    cfg = cfg or GlobalOpinionQAConfig()
    source = load_source(cfg)
    pairs = pairs_from_source(source, cfg.groups, cfg.seed, cfg.splits)
    kept = source[source["group"].isin(cfg.groups)].reset_index(drop=True)
    return pairs, kept


# --- cell checks ------------------------------------------------------------------------------


def _string(value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise DataFormatError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise DataFormatError(f"{where}: expected a string or an integer id, got {value!r}")
    return str(int(value)) if isinstance(value, float) else str(value)


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise DataFormatError(f"{where}: expected a list of answer texts, got {value!r}")
    return [str(v) for v in value]


def _number_list(value: Any, where: str) -> list[float]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise DataFormatError(f"{where}: expected a list of shares, got {value!r}")
    out = []
    for v in value:
        if v is None:
            out.append(float("nan"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise DataFormatError(f"{where}: expected numbers, got {v!r}")
    return out
