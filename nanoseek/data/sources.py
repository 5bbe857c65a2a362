"""Where samples come from: every `--tasks` entry (and `sft --data`) goes through `resolve`.

An entry is one of
  * a built-in task name (add, sub, ... in tasks.py), generated per split;
  * gym:NAME, any reasoning-gym dataset (gym.py), generated per split, graded by its own scorer;
  * a data file: JSONL, JSON, Parquet or CSV, or a folder written by `datasets`' save_to_disk, all
    read with the `datasets` library. FILE@train, FILE@validation and FILE@test keep the rows whose
    prompt hashes into that split (the 80/10/10 split of the generated tasks); for a saved
    DatasetDict, @NAME picks its split of that name when it has one.

Splits. Generated entries draw the split a command asks for (train in GRPO and rejection sampling,
test in eval), so train and test never share a prompt. A file is the user's own set, used as it is:
eval takes its first --n rows (n questions per entry, as for the generated tasks); GRPO and rejection
sampling use every row (--n-prompts sizes the generated entries only). The speedrun trains and
evaluates on the same entries, so it splits each file by hash: FILE@train to train, FILE@test to eval.
GRPO's held-out accuracy uses the test split of generated entries and FILE@test for a FILE@train entry.

Fields. A row's prompt is the first of prompt / question / problem / input it has, its answer the first
of answer / ground_truth / target / solution / output; --prompt-field / --answer-field name other
columns (dotted names reach into nested ones: reward_model.ground_truth). A prompt given as a chat (a
list of messages) is its last user turn. A GSM8K answer "rationale #### 42" gives the reference "42",
a solution with \\boxed{...} the boxed content (nested braces fine); the rationale goes to meta.

Checkers (meta["check"], a column of the eval report): int for a plain integer reference, math
(math-verify) for other numbers, fractions, expressions and LaTeX, string (normalized exact match) for
the rest; a `check` column overrides it per row. gym samples use reasoning-gym's scorer ("gym").
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data.gym import gym_datasets
from nanoseek.data.task_registry import SPLITS, Sample, split_of
from nanoseek.data.tasks import get_task, list_tasks, mix
from nanoseek.data.verify import last_boxed
from nanoseek.errors import UsageError

PROMPT_FIELDS = ("prompt", "question", "problem", "input")
ANSWER_FIELDS = ("answer", "ground_truth", "target", "solution", "output")

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FILE_CHECKS = ("int", "math", "string", "list", "symbol")  # what a `check` column may say
ACCEPTED = ("gym:NAME (any reasoning-gym dataset) or a data file (.jsonl, .json, .parquet, .csv, "
            "a datasets save_to_disk folder)")
_FLAG = {"prompt": "--prompt-field", "answer": "--answer-field"}


def column_option(kind: str):
    """The --prompt-field / --answer-field option of every command that reads data files."""
    names = PROMPT_FIELDS if kind == "prompt" else ANSWER_FIELDS
    return field(default="", metadata={
        "help": f"data files: the {kind} column (default: the first of {'/'.join(names)})"})


# ------------------------------------------------------------------------------ reference answers

_THOUSANDS = re.compile(r"[-−]?\d{1,3}(,\d{3})+")
_INTEGER = re.compile(r"[-+−]?\d+")
_NUMBER = re.compile(r"[-+−]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?")
_MATH_TEXT = re.compile(r"[\d\s.,+\-−*/^()\[\]{}=<>!%|:]*")
_MATH_WORDS = {"sqrt", "pi", "inf", "infty", "infinity", "log", "ln", "exp", "sin", "cos", "tan", "frac"}


def reference_answer(text: str) -> tuple[str, str]:
    """(reference, rationale) of an answer column: "...#### 42" (GSM8K) -> ("42", "..."); a solution
    with \\boxed{x} -> ("x", the solution); anything else -> (text, ""). Thousands separators go:
    "1,234" -> "1234"."""
    text = str(text).strip()
    rationale = ""
    if "####" in text:
        rationale, _, ref = text.rpartition("####")
        text, rationale = ref.strip(), rationale.strip()
    elif (boxed := last_boxed(text)) is not None and boxed.strip():
        text, rationale = boxed.strip(), text
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text, rationale


def choose_check(answer: str) -> str:
    """The checker for a reference: int (a plain integer), math (numbers, fractions, expressions,
    LaTeX: math-verify decides equivalence) or string (words: normalized exact match)."""
    a = answer.strip()
    if _INTEGER.fullmatch(a):
        return "int"
    if "\\" in a or "$" in a or _NUMBER.fullmatch(a):
        return "math"
    words = re.findall(r"[A-Za-z]+", a)
    rest = re.sub(r"[A-Za-z]+", "", a)
    mathy = all(len(w) == 1 or w.lower() in _MATH_WORDS for w in words) and _MATH_TEXT.fullmatch(rest)
    return "math" if mathy and re.search(r"[\d+\-−*/^=<>]", a) else "string"


# ------------------------------------------------------------------------------ reading files

def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets`, without its progress bars and log lines, caching into a temporary folder."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UsageError("reading data files needs the datasets library: pip install 'nanoseek[data]'") from e
    level, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    cache = tempfile.mkdtemp(prefix="nanoseek-data-")
    try:
        yield datasets, cache
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()
        shutil.rmtree(cache, ignore_errors=True)


def _why_unreadable(path: Path, fmt: str, error: Exception) -> str:
    """A one-line reason a file could not be read, naming the bad JSON line where there is one."""
    if fmt == "json":
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        for n, line in lines if len(lines) > 1 else []:  # JSONL: the first line that is not JSON
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line"
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file holds one JSON value, a .jsonl file one per line"
    cause = error.__cause__ or error
    return f"{path}: cannot read it as {fmt.upper()} ({type(cause).__name__}: {_one_line(cause, 120)})"


def _exact_rows(datasets, ds) -> list[dict]:
    """ds.to_list(), except in columns of mixed types (ints in some rows, text in others), which `datasets`
    keeps as JSON text and decodes with a float parser that turns the answer "0.3" into
    0.30000000000000004 and "007" into 7: there a cell is its JSON string, or its literal as written."""
    rows = ds.to_list()
    json_type = getattr(datasets, "Json", None)
    for name, feature in ds.features.items():
        if json_type is not None and isinstance(feature, json_type):
            for row, text in zip(rows, ds.data.column(name).to_pylist()):
                row[name] = json.loads(text) if text and text[0] in "\"[{" else text
    return rows


def read_records(path: str | Path, split: str | None = None) -> tuple[list[dict], bool]:
    """The rows of a data file or datasets folder, as dicts, read with `datasets`. For a saved
    DatasetDict: its `split` if it has one (then the second value is True: the split was taken),
    else its train split, else its first. UsageError for a missing, unsupported, unreadable or
    empty file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"data file {p} does not exist; give an existing .jsonl, .json, .parquet or .csv file "
                         "or a datasets save_to_disk folder")
    fmt = "datasets folder" if p.is_dir() else FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise UsageError(f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; use .jsonl, .json, .parquet, "
                         ".csv or a datasets save_to_disk folder")
    if p.is_file() and p.stat().st_size == 0:
        raise UsageError(f"{p} is empty; it needs one record per row (e.g. {{\"prompt\": ..., \"answer\": ...}})")
    took_split = False
    with _quiet_datasets() as (datasets, cache):
        try:
            if p.is_dir():
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    took_split = split in ds
                    ds = ds[split] if took_split else ds["train"] if "train" in ds else next(iter(ds.values()))
            elif fmt == "json":
                ds = datasets.Dataset.from_json(str(p), cache_dir=cache, keep_in_memory=True)
            elif fmt == "parquet":
                ds = datasets.Dataset.from_parquet(str(p), cache_dir=cache, keep_in_memory=True)
            else:  # every CSV column as text: "007" stays "007", an answer "1.50" stays "1.50"
                with open(p, newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f), [])
                features = datasets.Features({c: datasets.Value("string") for c in header})
                ds = datasets.Dataset.from_csv(str(p), cache_dir=cache, keep_in_memory=True, features=features,
                                               keep_default_na=False)
            rows = _exact_rows(datasets, ds)
        except FileNotFoundError as e:
            if p.is_dir():
                raise UsageError(f"{p} is a folder but not one written by datasets' save_to_disk; give a data "
                                 "file (.jsonl, .json, .parquet, .csv) or such a folder") from e
            raise UsageError(_why_unreadable(p, fmt, e)) from e
        except Exception as e:  # noqa: BLE001 - whatever the reader says, the user gets one line
            raise UsageError(_why_unreadable(p, fmt, e)) from e
    if not rows:
        raise UsageError(f"{p} is empty: no records in it")
    return rows, took_split


def _get(record: dict, name: str):
    """record[name]; a dotted name reads a nested field (reward_model.ground_truth)."""
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _present(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _field(record: dict, given: str, candidates: tuple[str, ...]):
    if given:
        return _get(record, given)
    return next((record[k] for k in candidates if _present(record.get(k))), None)


def _prompt_text(value) -> str:
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):  # a chat: last user turn
        users = [m.get("content") for m in value if m.get("role") == "user"]
        return str(users[-1] or "") if users else ""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


def _answer_text(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


def _check_fields(origin: str, columns: list[str], prompt_field: str, answer_field: str) -> None:
    for what, given in (("prompt", prompt_field), ("answer", answer_field)):
        if given and given.split(".")[0] not in columns:
            raise UsageError(f"{origin} has no column {given!r} (given by {_FLAG[what]}); its columns: "
                             f"{', '.join(columns)}")


def _missing(origin: str, i: int, what: str, given: str, columns: list[str]) -> UsageError:
    if given:
        return UsageError(f"{origin}: row {i + 1} has no value in column {given!r} ({_FLAG[what]})")
    looked = ", ".join(PROMPT_FIELDS if what == "prompt" else ANSWER_FIELDS)
    return UsageError(f"{origin}: row {i + 1} has no {what} field (looked for {looked}); its columns: "
                      f"{', '.join(columns)}; name the {what} column with {_FLAG[what]} COLUMN")


def row_sample(record: dict, i: int, name: str, origin: str, columns: list[str], prompt_field: str = "",
               answer_field: str = "") -> Sample:
    """Row i of a file as a Sample of task `name`, its checker chosen from the reference answer."""
    prompt, answer = _field(record, prompt_field, PROMPT_FIELDS), _field(record, answer_field, ANSWER_FIELDS)
    if not _present(prompt) or not _prompt_text(prompt).strip():
        raise _missing(origin, i, "prompt", prompt_field, columns)
    if not _present(answer):
        raise _missing(origin, i, "answer", answer_field, columns)
    reference, rationale = reference_answer(_answer_text(answer))
    check = record.get("check")
    if _present(check):
        check = "math" if str(check).strip().lower() == "auto" else str(check).strip().lower()
        if check not in FILE_CHECKS:
            raise UsageError(f"{origin}: row {i + 1}: check {record['check']!r} is not one of "
                             f"{', '.join(FILE_CHECKS)} (or auto); fix the check column")
    else:
        check = choose_check(reference)
    meta = {"check": check, "source": origin, "row": i}
    if rationale:
        meta["rationale"] = rationale
    try:
        difficulty = int(record.get("difficulty") or 1)
    except (TypeError, ValueError):
        difficulty = 1
    return Sample(name, _prompt_text(prompt).strip(), reference, difficulty, meta)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows[:1000] for k in r))


def load_samples(path: str | Path, name: str | None = None, prompt_field: str = "", answer_field: str = "",
                 split: str | None = None) -> list[Sample]:
    """Every row of a data file as a Sample of task `name` (default: the file's stem); split keeps the
    rows of that hash split (or a saved DatasetDict's split of that name)."""
    p = Path(path)
    rows, took = read_records(p, split)
    columns = _columns(rows)
    _check_fields(str(p), columns, prompt_field, answer_field)
    samples = [row_sample(r, i, name or p.stem, str(p), columns, prompt_field, answer_field)
               for i, r in enumerate(rows)]
    if split and not took:
        samples = [s for s in samples if split_of(s.prompt) == split]
        if not samples:
            raise UsageError(f"{p}@{split}: none of its {len(rows)} rows hashes into the {split} split; "
                             f"use the whole file ({p}) or more rows")
    return samples


def _chat_messages(value, origin: str, i: int) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and m.get("role") for m in value):
        raise UsageError(f"{origin}: row {i + 1}: messages must be a list of {{\"role\": ..., \"content\": ...}}")
    # arrow gives every message every key any message has: drop the empty ones again
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def load_records(path: str | Path, task: str | None = None, prompt_field: str = "",
                 answer_field: str = "") -> list:
    """Rows of a data file: chat rows ({"messages": [...]}) as chat records, the others as Samples."""
    p = Path(path)
    rows, _ = read_records(p)
    columns = _columns(rows)
    _check_fields(str(p), columns, prompt_field, answer_field)
    return [{"messages": _chat_messages(r["messages"], str(p), i)} if r.get("messages") is not None
            else row_sample(r, i, task or p.stem, str(p), columns, prompt_field, answer_field)
            for i, r in enumerate(rows)]


def load_chat(path: str | Path, prompt_field: str = "", answer_field: str = "") -> list[dict]:
    """SFT conversations from a data file: OpenAI-style chat rows ({"messages": [...]}) as they are,
    prompt + answer rows as one user turn and one assistant turn (a GSM8K or \\boxed rationale
    becomes the turn's reasoning_content, the reference its content)."""
    out = []
    for r in load_records(path, None, prompt_field, answer_field):
        if isinstance(r, dict):
            out.append(r)
            continue
        reply = {"role": "assistant", "content": r.answer}
        if r.meta.get("rationale"):
            reply["reasoning_content"] = r.meta["rationale"]
        out.append({"messages": [{"role": "user", "content": r.prompt}, reply]})
    return out


# ------------------------------------------------------------------------------ --tasks entries

@dataclass
class Source:
    """One resolved `--tasks` entry: a task or gym dataset (generated) or a file's rows."""
    spec: str                       # as the user wrote it
    name: str                       # in reports: the task name, gym:NAME, or the file's stem
    kind: str                       # "task", "gym" or "file"
    rows: list[Sample] = field(default_factory=list, repr=False)  # a file's (split's) rows
    path: str = ""
    split: str | None = None        # FILE@split
    fields: tuple[str, str] = ("", "")

    def generated(self) -> bool:
        return self.kind != "file"


def _unknown_task(spec: str) -> UsageError:
    own = list_tasks(own_only=True)
    close = difflib.get_close_matches(spec, own, n=3, cutoff=0.6)
    try:
        gym = gym_datasets()
    except ImportError:  # reasoning-gym not installed: no gym suggestions
        gym = []
    close += [f"gym:{g}" for g in ([spec] if spec in gym else difflib.get_close_matches(spec, gym, n=2, cutoff=0.75))]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UsageError(f"unknown task {spec!r}; {hint}built-in tasks: {', '.join(own)}; also accepted: {ACCEPTED}; "
                      "`nanoseek data --list` lists them")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix != ""


def resolve(spec: str, prompt_field: str = "", answer_field: str = "") -> Source:
    """A `--tasks` entry as a Source; UsageError (one line: the problem and the fix) if it is none.
    Files are read here, so a bad file fails before a command creates anything."""
    spec = str(spec).strip()
    if not spec:
        raise UsageError(f"an empty --tasks entry; give task names, {ACCEPTED}, comma separated")
    if spec.startswith("gym:"):
        get_task(spec)  # an unknown dataset raises UsageError with close names
        return Source(spec, spec, "gym")
    if spec in list_tasks(own_only=True):
        return Source(spec, spec, "task")
    base, split = spec, None
    head, at, tail = spec.rpartition("@")
    if at and head and tail in SPLITS and not Path(spec).exists():
        base, split = head, tail
    if not Path(base).exists() and not _looks_like_path(base):
        raise _unknown_task(spec)
    rows = load_samples(base, Path(base).stem, prompt_field, answer_field, split)
    return Source(spec, Path(base).stem, "file", rows, base, split, (prompt_field, answer_field))


def resolve_all(specs: list[str] | None, prompt_field: str = "", answer_field: str = "") -> list[Source]:
    """Every entry resolved (default: our own tasks). Two files with the same stem keep distinct
    report names (the second is named by its path)."""
    sources, names = [], set()
    for spec in (list(specs) if specs else list_tasks(own_only=True)):
        s = resolve(spec, prompt_field, answer_field)
        if s.name in names:
            s.name = s.spec
            s.rows = [Sample(s.name, r.prompt, r.answer, r.difficulty, r.meta) for r in s.rows]
        names.add(s.name)
        sources.append(s)
    if not sources:
        raise UsageError(f"no tasks given; name built-in tasks, {ACCEPTED}")
    return sources


def with_split(specs: list[str], split: str) -> list[str]:
    """Data files restricted to a hash split (FILE -> FILE@split); other entries (and files that already
    name a split) unchanged."""
    own = list_tasks(own_only=True)
    return [f"{s}@{split}" if s not in own and Path(s).exists() else s for s in (str(x).strip() for x in specs)]


def eval_samples(sources: list[Source], n: int, difficulty: int | None = None, seed: int = 0) -> list[Sample]:
    """n test questions per entry: the test split of generated entries, a file's first n rows."""
    out = []
    for s in sources:
        if s.generated():
            out += get_task(s.name).generate(n, "test", difficulty, seed)
            continue
        if len(s.rows) > n:
            print(f"{s.name}: the first {n} of {len(s.rows)} rows of {s.spec} (--n {len(s.rows)} for all)")
        out += s.rows[:n]
    return out


def train_samples(sources: list[Source], n: int, difficulty: int | None = None, seed: int = 0,
                  split: str = "train") -> list[Sample]:
    """A training pool: n samples of `split` spread evenly over the generated entries (tasks.mix),
    plus every row of each file, shuffled by the seed. Without files it is exactly tasks.mix."""
    generated = [s.name for s in sources if s.generated()]
    out = mix(generated, n, split, difficulty, seed) if generated else []
    files = [r for s in sources if not s.generated() for r in s.rows]
    if files:
        out += files
        random.Random(f"sources/{seed}").shuffle(out)
    return out


def heldout_samples(sources: list[Source], n: int, difficulty: int | None = None, seed: int = 0) -> list[Sample]:
    """About n held-out questions: the test split of the generated entries, and FILE@test for each
    FILE@train entry, split evenly; a whole file has no held-out part (evaluate it with `nanoseek eval`)."""
    tests = [s for s in sources if s.generated()]
    tests += [resolve(f"{s.path}@test", *s.fields) for s in sources if not s.generated() and s.split == "train"]
    if not tests:
        return []
    counts = [n // len(tests) + (i < n % len(tests)) for i in range(len(tests))]
    generated = sum(k for s, k in zip(tests, counts) if s.generated())
    names = [s.name for s in tests if s.generated()]
    out = mix(names, generated, "test", difficulty, seed) if names else []
    return out + [r for s, k in zip(tests, counts) if not s.generated() for r in s.rows[:k]]
