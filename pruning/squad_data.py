"""SQuAD's records and files: a question with its context and gold answers (:class:`Example`), a predicted answer
(:class:`Answer`), and the official JSON files they are read from.

* :func:`load_squad` reads SQuAD v1.1 and v2.0 data (nested articles, or the flat records HuggingFace ``datasets``
  writes), plain or gzip-compressed;
* :func:`load_predictions` reads official ``{question id: answer}`` predictions;

both fail with a one-line :class:`SquadFormatError` naming the file and the question.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import parser_limit

__all__ = ["SquadFormatError", "Example", "Answer", "lone_surrogate", "short_repr", "show_id", "load_squad",
           "load_predictions"]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
# Half of a UTF-16 surrogate pair: JSON escapes it ("\\ud83d") and Python reads it, but it is no character, and
# the tokenizer, like any UTF-8 writer, refuses it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class SquadFormatError(ValueError):
    """A SQuAD data or predictions file is unreadable or malformed; the message names the file and the question."""


@dataclass(frozen=True)
class Example:
    """One question with its context and gold answers (``answers[i]`` starts at character ``answer_starts[i]``;
    ``answer_starts`` is empty for a question read for scoring whose answers do not all give their start).
    ``impossible``: an unanswerable question (SQuAD v2.0), without answers: its right answer is no answer."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...] = ()
    answer_starts: tuple[int, ...] = ()
    impossible: bool = False

    def __post_init__(self) -> None:
        # One text given for the answers was scored as answers of one character each ("P" matched "Paris").
        for name, what in (("answers", "texts"), ("answer_starts", "character offsets")):
            value = getattr(self, name)
            if isinstance(value, (str, bytes, int)):
                shown = short_repr(value) if isinstance(value, str) else repr(value)
                raise TypeError(f"Example {self.id!r}: {name} must be a tuple of {what}, got the "
                                f"{type(value).__name__} {shown}: write ({shown},) for one")


@dataclass(frozen=True)
class Answer:
    """A predicted span: ``context[start:end] == text``; ``score`` is its start logit plus its end logit.

    A model that answers "no answer" (SQuAD v2.0, :func:`pruning.squad.postprocess_predictions` with
    ``null_answers``) also gives ``null_margin``, how much the question's "no answer" scores above its best span (inf
    when it has no span): the answer is "no answer" where that exceeds the threshold the predictions were made with,
    and is then the empty text with the score of "no answer", and ``span`` the best span it beat (None without one).
    """

    text: str
    score: float
    start: int
    end: int
    null_margin: float | None = None
    span: Answer | None = None


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------

def short_repr(text: str, limit: int = 40) -> str:
    """``repr`` of a text cut to ``limit`` characters, so that messages stay on one line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def show_id(qid: str) -> str:
    """A question id as a message names it: as it is when printable (a SQuAD id is hexadecimal), else its
    :func:`short_repr`, so that a line break or an escape sequence in an id cannot break a one-line error."""
    return qid if qid.isprintable() and qid == qid.strip() and len(qid) <= 64 else short_repr(qid)


class _JsonLines(list):
    """The values of a JSON Lines file, one per non-empty line, in order; ``lines[i]``: the line of value ``i``."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []


def _read_json(path: Path, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
               lines: bool = False) -> Any:
    """The JSON value of ``path`` (gzip-compressed or not; UTF-8, or UTF-16 with its mark); with ``lines``, a file
    of one JSON value per line (JSON Lines) is read as the :class:`_JsonLines` list of them."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SquadFormatError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if raw[:2] == _GZIP_MAGIC:  # a compressed download (train-v1.1.json.gz) is read as it is
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise SquadFormatError(f"{path}: a damaged gzip file ({exc})") from None
    if not raw.strip():
        raise SquadFormatError(f"{path}: empty file")
    # UTF-8, with or without a byte-order mark; UTF-16 only with its mark (what Windows editors and PowerShell's
    # redirection write).
    utf16 = raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SquadFormatError(f"{path}: invalid {'UTF-16' if utf16 else 'UTF-8'} at byte {exc.start}") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        # One JSON value per line (JSON Lines) parses up to its first line break, then finds more; a file whose
        # first value spans lines (an indented JSON file with something after it) is one broken JSON value.
        json_lines = exc.msg == "Extra data" and exc.colno == 1 and _first_line_is_value(text)
        if json_lines and lines:
            return _json_lines(path, text, object_pairs_hook)
        hint = " (JSON Lines? the file must be one JSON object)" if json_lines else ""
        raise SquadFormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
                               f"{hint}") from None
    except (RecursionError, ValueError) as exc:
        if (limit := parser_limit(exc)) is None:
            raise
        raise SquadFormatError(f"{path}: not readable JSON ({limit})") from None


def _lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split at line feeds only (with a carriage return before one dropped), since
    JSON strings may hold U+2028, U+2029 and U+0085 as they are, where ``str.splitlines`` would split too."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _first_line_is_value(text: str) -> bool:
    """Whether the first non-blank line of ``text`` is a JSON value by itself."""
    first = next((line for line in _lines(text) if line.strip()), "")
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def _json_lines(path: Path, text: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None
                ) -> _JsonLines:
    values = _JsonLines()
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line, object_pairs_hook=object_pairs_hook))
        except json.JSONDecodeError as exc:
            raise SquadFormatError(f"{path}: invalid JSON at line {number} column {exc.colno}: {exc.msg}") from None
        except (RecursionError, ValueError) as exc:  # as for a whole file, in _read_json
            if (limit := parser_limit(exc)) is None:
                raise
            raise SquadFormatError(f"{path}: not readable JSON at line {number} ({limit})") from None
        values.lines.append(number)
    return values


# A question written as one flat record, as HuggingFace ``datasets`` writes SQuAD, instead of nested in paragraphs:
# its question and context side by side (a nested file's questions have no context of their own). Its answers are
# checked as the record is read, so that a record without them is named as such.
_FLAT_KEYS = frozenset({"context", "question"})


def _flat_record(value: Any) -> bool:
    """Whether ``value`` (or the first item of a list) is a flat per-question record (HuggingFace ``datasets``)."""
    if isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, dict) and _FLAT_KEYS <= value.keys()


def _get(obj: Any, key: str, kind: type, fail: Callable[[str], SquadFormatError]) -> Any:
    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise fail(f"missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise fail(f"{key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def lone_surrogate(text: str) -> str | None:
    """Where ``text`` holds a lone surrogate, which no tokenizer takes: e.g. ``"\\ud83d at character 7"``; None when
    it holds none.

    JSON's ``"\\ud83d"`` escape without its partner (half of an emoji cut off where a file or request was written)
    and a command-line argument that is not valid UTF-8 (Python keeps each undecodable byte as one) read as such.
    """
    bad = _SURROGATE.search(text)
    return None if bad is None else f"\\u{ord(bad.group()):04x} at character {bad.start()}"


def _text(obj: dict, key: str, fail: Callable[[str], SquadFormatError]) -> str:
    """``obj[key]``, a string that holds only characters: a lone surrogate escape is refused."""
    value = _get(obj, key, str, fail)
    bad = lone_surrogate(value)
    if bad is not None:
        raise fail(f"{key!r} holds a lone surrogate {bad}, which is not a character (half of one cut off where "
                   "the file was written)")
    return value


def load_squad(path: str | Path, limit: int | None = None, spans: bool = True) -> list[Example]:
    """Read and validate a SQuAD v1.1 or v2.0 JSON file (gzip-compressed or not).

    The file must hold at least one question. Every question must have an ``id`` (unique in the file), a non-empty
    ``question``, a non-empty ``context`` and at least one answer whose ``answer_start`` points at its ``text`` in
    the paragraph's ``context`` (with ``spans`` False, an answer's ``answer_start`` may be off or left out); or be
    unanswerable, as SQuAD v2.0 marks one: ``"is_impossible": true`` and no ``answers`` (its ``plausible_answers``
    are not read). The flat records HuggingFace ``datasets`` writes SQuAD as (JSON Lines, a JSON list, or
    ``{"data": [...]}`` of records with ``id``, ``title``, ``context``, ``question`` and ``answers: {"text": [...],
    "answer_start": [...]}``, empty lists for an unanswerable question) are read as the same questions.

    Args:
        path: the JSON file (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``, or flat records).
        limit: keep only the first ``limit`` questions (only those are validated); None keeps all. A file with
            fewer questions is read whole, with one warning that says so.
        spans: check that each ``answer_start`` points at its text. Training needs that; the metric reads the
            answer texts only, so scoring (as the official evaluation script does) takes a file whose
            ``answer_start`` values are off or left out.

    Returns:
        The questions in file order.

    Raises:
        SquadFormatError: the file is missing, empty, not UTF-8, not JSON, malformed or holds no question; the message
            names the file and the question id (or its JSON path when the id itself is missing).
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(path)
    root = _read_json(path, lines=True)

    def at(where: str) -> Callable[[str], SquadFormatError]:
        return lambda message: SquadFormatError(f"{path}: {where}: {message}")

    flat = _flat_records(root)
    if flat is not None:
        questions = _flat_questions(flat, at)
    else:
        if not isinstance(root, dict) or "data" not in root:
            raise SquadFormatError(f"{path}: missing 'data' (not a SQuAD file)")
        version = root.get("version")
        if version is not None and str(version).removeprefix("v") not in ("1.1", "2.0"):
            logger.warning("%s: version %r, expected SQuAD v1.1 or v2.0", path, version)
        questions = _nested_questions(_get(root, "data", list, at("top level")), at)

    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for where, title, context, qa in questions:
        qid = _text(qa, "id", at(where))
        if not qid:
            raise at(where)("empty 'id'")
        example = _parse_question(qa, qid, title, context, at(f"question {show_id(qid)} ({where})"), spans)
        if qid in first_seen:
            raise at(f"question {show_id(qid)} ({where})")(f"duplicate id (first at {first_seen[qid]})")
        first_seen[qid] = where
        examples.append(example)
        if limit is not None and len(examples) == limit:
            return examples
    if not examples:
        raise SquadFormatError(f"{path}: data: no questions (the file holds no paragraph with a question)")
    if limit is not None:
        logger.warning("%s: holds %d questions, fewer than the %d asked for: all %d are used", path, len(examples),
                       limit, len(examples))
    return examples


def _nested_questions(data: list, at: Callable[[str], Callable[[str], SquadFormatError]]
                      ) -> Iterator[tuple[str, str, str, Any]]:
    """(where, title, context, question record) of each question of SQuAD's ``data`` list of articles."""
    for a, article in enumerate(data):
        where = f"data[{a}]"
        paragraphs = _get(article, "paragraphs", list, at(where))
        title = article.get("title", "")
        if not isinstance(title, str):
            raise at(where)(f"'title' must be a str, got {type(title).__name__}")
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = _text(paragraph, "context", at(where))
            qas = _get(paragraph, "qas", list, at(where))
            if qas and not context.strip():  # its questions would score 0 with an empty answer, unexplained
                raise at(where)(f"empty 'context' for {len(qas)} question{'s' if len(qas) > 1 else ''}")
            for q, qa in enumerate(qas):
                yield f"data[{a}].paragraphs[{p}].qas[{q}]", title, context, qa


def _flat_records(root: Any) -> tuple[list, Callable[[int], str]] | None:
    """The flat question records of a file in HuggingFace ``datasets``' layout, and how to name record ``i`` (its
    line, or its place in the list); None for the nested SQuAD layout.

    ``datasets`` writes SQuAD as JSON Lines (``Dataset.to_json``), or as a JSON list or a ``{"data": [...]}`` object
    of records, each question with its ``context`` and ``answers: {"text": [...], "answer_start": [...]}``.
    """
    if isinstance(root, _JsonLines):
        return root, lambda i: f"line {root.lines[i]}"
    if isinstance(root, dict) and _flat_record(root):  # a JSON Lines file of one record
        return [root], lambda i: "line 1"
    if isinstance(root, list) and root and isinstance(root[0], dict) and "paragraphs" not in root[0]:
        return root, lambda i: f"[{i}]"  # (a list of articles is SQuAD's "data" without its object)
    data = root.get("data") if isinstance(root, dict) else None
    if isinstance(data, list) and _flat_record(data):
        return data, lambda i: f"data[{i}]"
    return None


def _flat_questions(flat: tuple[list, Callable[[int], str]], at: Callable[[str], Callable[[str], SquadFormatError]]
                    ) -> Iterator[tuple[str, str, str, Any]]:
    """(where, title, context, question record in SQuAD's nested form) of each flat record: its ``answers`` lists
    become answer objects, and empty ones an unanswerable question (as ``datasets`` writes SQuAD v2.0's)."""
    records, name = flat
    for i, record in enumerate(records):
        where = name(i)
        if not isinstance(record, dict):
            raise at(where)(f"expected a question record (a JSON object), got {type(record).__name__}")
        qid = _text(record, "id", at(where))
        if not qid:
            raise at(where)("empty 'id'")
        fail = at(f"question {show_id(qid)} ({where})")
        title = record.get("title", "")
        if not isinstance(title, str):
            raise fail(f"'title' must be a str, got {type(title).__name__}")
        context = _text(record, "context", fail)
        if not context.strip():
            raise fail("empty 'context'")
        answers = _get(record, "answers", dict, fail)
        texts = _get(answers, "text", list, lambda m: fail(f"answers: {m}"))
        starts = _get(answers, "answer_start", list, lambda m: fail(f"answers: {m}"))
        if len(texts) != len(starts):
            raise fail(f"answers: {len(texts)} texts but {len(starts)} answer_start values")
        qa = {key: record[key] for key in ("id", "question") if key in record}
        qa["answers"] = [{"text": text, "answer_start": start} for text, start in zip(texts, starts)]
        qa["is_impossible"] = record.get("is_impossible", not texts)
        yield where, title, context, qa


def _parse_question(qa: dict, qid: str, title: str, context: str, fail: Callable[[str], SquadFormatError],
                    spans: bool = True) -> Example:
    question = _text(qa, "question", fail)
    if not question.strip():
        raise fail("empty question")
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise fail(f"'is_impossible' must be true or false, got {impossible!r}")
    answers = _get(qa, "answers", list, fail)
    if impossible:  # SQuAD v2.0: no answer is the right one; plausible_answers are distractors, not gold
        if answers:
            raise fail(f"'is_impossible' is true, but it has {len(answers)} answer{'s' if len(answers) > 1 else ''} "
                       "(an unanswerable question has none)")
        return Example(id=qid, title=title, context=context, question=question, impossible=True)
    if not answers:
        raise fail("no answers (an unanswerable question says \"is_impossible\": true, as in SQuAD v2.0)")
    texts, starts = [], []
    for k, answer in enumerate(answers):
        text = _get(answer, "text", str, fail)
        if not text.strip():  # whitespace alone: no token to label, so training would take it for no answer
            raise fail(f"answer {k} has an empty text{' (only whitespace)' if text else ''}")
        texts.append(text)
        if not spans and "answer_start" not in answer:  # the metric reads the text alone, as the official script
            continue
        start = _get(answer, "answer_start", int, fail)
        if spans and (not 0 <= start <= len(context) - len(text) or context[start:start + len(text)] != text):
            found = context.find(text)
            if found >= 0:
                hint = f" (the text occurs at {found})"
            elif unicodedata.normalize("NFC", text) in unicodedata.normalize("NFC", context):
                # The same letters written another way: composed (é) in one, a base letter and a combining mark
                # (e + U+0301) in the other, as macOS and some editors write them.
                hint = (" (the text is in the context with its accents composed differently: normalize the file's "
                        "texts to one Unicode form, NFC)")
            else:
                hint = " (the text is not in the context)"
            raise fail(f"answer {k} {short_repr(text)} is not at answer_start {start} of its context{hint}")
        starts.append(start)
    return Example(id=qid, title=title, context=context, question=question, answers=tuple(texts),
                   answer_starts=tuple(starts) if len(starts) == len(texts) else ())


def load_predictions(path: str | Path) -> dict[str, str]:
    """Read official-format predictions: one JSON object ``{question id: answer text}`` (gzip-compressed or not).

    Raises:
        SquadFormatError: the file is missing, empty, not UTF-8, not JSON, not an object of strings, or repeats an id.
    """
    path = Path(path)

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise SquadFormatError(f"{path}: question {show_id(key)}: duplicate id")
            result[key] = value
        return result

    root = _read_json(path, object_pairs_hook=unique)
    if not isinstance(root, dict):
        raise SquadFormatError(f"{path}: expected a JSON object {{question id: answer text}}, "
                               f"got {type(root).__name__}")
    if isinstance(root.get("data"), list):  # the data file, given twice or in the predictions' place
        raise SquadFormatError(f"{path}: a SQuAD data file ('data' holds its articles), not predictions "
                               "{question id: answer text}")
    for qid, text in root.items():
        if not isinstance(text, str):
            raise SquadFormatError(f"{path}: question {show_id(qid)}: the prediction must be a string, "
                                   f"got {type(text).__name__}")
    return root
