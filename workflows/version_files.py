"""Reading a registered version's files back: whether they are whole, and the model they serve.

A version's files lie in the artifact store beside its registry entry; deleting them by hand leaves the version
registered but unservable. :func:`lost_files` says what is gone (checked once per registration while
:func:`checked_once` holds); :func:`load_version` and :func:`fetch_version` download only the files of the one model
a version serves (its ONNX Runtime export in the variant its model config names, or its packed PyTorch model), not
the whole version: ``fineprune select`` times the models of :func:`load_version`, ``fineprune eval`` and ``ask``
run those of :func:`fetch_version`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlflow
from mlflow.exceptions import MlflowException

from pruning import atomic
from pruning.config import EVALUATION_KEYS
from pruning.errors import error_line, name_hint
from workflows import record
from workflows.record import ARTIFACT_MODEL_DIR, ARTIFACT_ONNX_DIR
from workflows.served_model import served_variant, torch_served

__all__ = ["VersionError", "FewerPositions", "checked_once", "lost_files", "version_files_lost", "served_model_dir",
           "load_version", "fetch_version", "number_ranges"]


class VersionError(ValueError):
    """A registered version that cannot be found, whose files are gone, or whose model cannot be loaded."""


# The versions (artifact locations) found whole so far by one registration, while :func:`checked_once` holds.
_WHOLE: contextvars.ContextVar[set | None] = contextvars.ContextVar("fineprune_whole_versions", default=None)


@contextlib.contextmanager
def checked_once() -> Iterator[None]:
    """Check each version's files once while this holds: ``register --frontier`` checks every frontier version it
    reuses, then the champion's, one of them, and ``best_f1_under_latency`` loads them all to time them after; a
    sweep's end then writes its report, which checks the champion's. Held already, it goes on as it is."""
    if _WHOLE.get() is not None:
        yield
        return
    token = _WHOLE.set(set())
    try:
        yield
    finally:
        _WHOLE.reset(token)


def lost_files(root: str, tracking_uri: str, dst: str | None = None) -> str | None:
    """What of a served model's files is gone from ``root`` (a version's or a logged model's artifact location):
    its ``MLmodel``, or a file or directory its pyfunc loads (the pickled model, the code, the packed model, the
    ONNX export); None when all of them are there. Files deleted from the artifact store by hand leave the version
    in the registry, but it can no longer be loaded or served.

    ``dst``: where the ``MLmodel`` read for the check is kept, for a caller that goes on to load the model from
    there (default: a temporary directory, removed). A version found whole earlier under :func:`checked_once` is
    not listed again."""
    from mlflow.models import Model

    root = root.rstrip("/")
    whole = _WHOLE.get()
    seen = whole is not None and (tracking_uri, root) in whole
    if seen and dst is None:
        return None
    listed: dict[str, list] = {}  # each directory is listed once, however many of the needed files it holds

    def listing(path: str) -> list:
        if path not in listed:
            try:
                listed[path] = list(mlflow.artifacts.list_artifacts(artifact_uri=f"{root}/{path}".rstrip("/"),
                                                                    tracking_uri=tracking_uri))
            except (MlflowException, OSError):
                listed[path] = []
        return listed[path]

    def named(infos: list, leaf: str) -> list:
        return [info for info in infos if info.path.rstrip("/").rsplit("/", 1)[-1] == leaf]

    def present(path: str) -> bool:
        path = path.strip("/")
        parent, _, leaf = path.rpartition("/")
        if not parent or parent in listed:  # the files beside the MLmodel: the root's one listing names them all
            found = named(listing(parent), leaf)
            return bool(found) and (not found[0].is_dir or bool(listing(path)))  # an emptied directory is gone too
        # A directory deeper down is listed itself; what lists nothing is a file (named in its parent) or gone.
        return bool(listing(path)) or any(not info.is_dir for info in named(listing(parent), leaf))

    with contextlib.ExitStack() as stack:
        where = dst if dst is not None else stack.enter_context(atomic.scratch_dir("download"))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=where,
                                                tracking_uri=tracking_uri)
            flavor = Model.load(where).flavors.get("python_function", {})
        except (MlflowException, OSError, ValueError):
            return f"its MLmodel is gone from {root}"
    if seen:
        return None
    needed = [(what, flavor.get(what)) for what in ("python_model", "code")]
    if flavor.get("model_code_path"):  # a model logged as code: the file it runs, copied beside its MLmodel
        needed.append(("python_model", Path(flavor["model_code_path"]).name))
    needed += [(key, (spec or {}).get("path")) for key, spec in (flavor.get("artifacts") or {}).items()]
    for what, path in needed:
        if path and not present(str(path)):
            return f"its {what} ({path}) is gone from {root}"
    if whole is not None:
        whole.add((tracking_uri, root))
    return None


def version_files_lost(client, name: str, version) -> str | None:
    """What of the files the served model of ``version`` of ``name`` loads is gone from the registry's artifact
    store (:func:`lost_files`), or None when it loads and serves. The files are the version's own: a version is
    made from a model logged in its experiment's artifact location, which deleting its trial run, or removing it for
    good with `mlflow gc`, leaves."""
    return lost_files(client.get_model_version_download_uri(name, str(version)), client.tracking_uri)


class FewerPositions(Exception):
    """A version's model takes fewer positions (``limit``) than the input it is to be timed on."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def served_model_dir(mlmodel: str | Path) -> str | None:
    """Where, among a version's (or a logged model's) files, the packed model its served model loads lies, as the
    ``MLmodel`` file or directory ``mlmodel`` names it; None when it names none."""
    from mlflow.models import Model

    flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
    return ((flavor.get("artifacts") or {}).get(ARTIFACT_MODEL_DIR) or {}).get("path")


def _positions_of(local: str, fetch) -> int | None:
    """The longest window the packed model of a version whose ``MLmodel`` is in ``local`` takes, read from its
    ``config.json`` alone (``fetch(path)`` brings the version's file ``path`` into ``local``); None when it cannot
    be read (loading the model then says why)."""
    from types import SimpleNamespace

    from pruning.structure import max_positions

    try:
        model_dir = served_model_dir(local)
        if not model_dir:
            return None
        fetch(f"{model_dir}/config.json")
        config = (Path(local) / model_dir / "config.json").read_text(encoding="utf-8")
        return max_positions(SimpleNamespace(**json.loads(config)))
    except Exception:  # noqa: BLE001 - whatever is wrong with it, loading the model names it
        return None


def load_version(client, name: str, version: str, dst: str, runtime: str = "served", threads: int | None = None,
                  seq_len: int | None = None):
    """The model a registered version serves, read from the version's own artifacts, and how it runs.

    ``runtime="served"``: what the version's pyfunc serves by default: its ONNX Runtime model (the ``onnx_variant``
    of its model config) when it carries one, else its packed PyTorch model, in bf16 where the version was
    measured in bf16 and this CPU supports it (as its pyfunc serves it). ``runtime="torch"``: the packed PyTorch
    model in fp32. Returns ``(model, label)`` with label ``onnxruntime-int8``, ``onnxruntime-fp32``, ``torch-bf16``
    or ``torch``.

    Only the files that model is read from are downloaded into ``dst`` (the version's ``MLmodel``, then the one ONNX
    file it serves with its config and manifest, or the packed model directory), not the whole version: a version
    also carries the packed weights, both ONNX variants and the project's code, several times what one model needs.

    ``seq_len``: the input it is to be timed on. A version whose model takes fewer positions (its packed model's
    ``config.json`` says so) is found before its weights are downloaded: :class:`FewerPositions`.
    """
    # From where the client's registry says the version's files are: MLflow resolves a models:/ URI through the
    # registry of its environment (MLFLOW_REGISTRY_URI), which need not be the client's.
    root = client.get_model_version_download_uri(name, version).rstrip("/")
    fetch = _fetcher(root, client.tracking_uri, dst)
    try:
        # A file the served model needs, which this timing may not: the check brings the version's MLmodel into dst.
        lost = lost_files(root, client.tracking_uri, dst)
        if lost is not None:
            raise VersionError(lost)
        limit = _positions_of(dst, fetch) if seq_len is not None else None
        if limit is not None and seq_len > limit:
            raise FewerPositions(limit)
        return _open_version(dst, name, version, runtime, threads, fetch)
    except FewerPositions:
        raise
    except Exception as err:
        # Its files named as they are in the version, not in the temporary copy, which is gone by the time one reads
        # the message.
        raise VersionError(error_line(err).replace(str(dst), f"models:/{name}/{version}")) from err


def _fetcher(root: str, tracking_uri: str, dst: str | Path):
    """``fetch(path)``: the file or directory ``path`` of the version whose files are at ``root``, downloaded to the
    same path under ``dst``."""
    def fetch(path: str) -> None:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{path}", dst_path=str(Path(dst, path).parent),
                                            tracking_uri=tracking_uri)
    return fetch


@dataclasses.dataclass(frozen=True)
class _ServedFiles:
    """What a version's ``MLmodel`` says its served model runs: where its ONNX export and its packed model lie among
    its files (None: it has none), its model config, and the ONNX variant it serves (``none``: the packed model)."""

    onnx_dir: str | None
    model_dir: str | None
    settings: dict[str, Any]
    variant: str


def _served_files(local: str | Path) -> _ServedFiles:
    """The :class:`_ServedFiles` of the version whose ``MLmodel`` is in ``local``.

    Raises:
        ValueError: its model config's ``onnx_variant`` is unknown or names an export it does not carry.
    """
    from mlflow.models import Model

    flavor = Model.load(str(local)).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    onnx_dir = (artifacts.get(ARTIFACT_ONNX_DIR) or {}).get("path")
    settings = flavor.get("config") or {}
    return _ServedFiles(onnx_dir, (artifacts.get(ARTIFACT_MODEL_DIR) or {}).get("path"), settings,
                        served_variant(settings, onnx_dir is not None))


def _open_version(local: str, name: str, version: str, runtime: str, threads: int | None, fetch):
    """The model of a version whose ``MLmodel`` is in ``local``, and how it runs (see :func:`load_version`);
    ``fetch(path)`` brings the version's file or directory ``path`` into ``local``."""
    # torch and the library are needed only to run a model; this module stays light without them.
    from pruning.checkpoint import load_model
    from pruning.export import MANIFEST_NAME, load_exported, read_manifest

    served = _served_files(local)
    onnx_dir, variant = served.onnx_dir, served.variant
    if runtime == "served" and variant != "none":
        for path in (MANIFEST_NAME, "config.json"):
            fetch(f"{onnx_dir}/{path}")
        onnx_file = read_manifest(Path(local) / onnx_dir)["files"].get(variant)
        if onnx_file:  # else load_exported names the variant the export lacks
            fetch(f"{onnx_dir}/{onnx_file}")
        # Timed round-robin with other models: ORT's threads must not spin between calls.
        return load_exported(Path(local) / onnx_dir, variant=variant, threads=threads, spin=False), \
            f"onnxruntime-{variant}"
    model_dir = served.model_dir
    if not model_dir:
        raise VersionError(f"version {version} of {name} holds no packed model (no model_dir artifact)")
    fetch(model_dir)
    model = load_model(Path(local) / model_dir)
    if runtime != "served":
        return model, "torch"
    model, precision = torch_served(model, served.settings)
    return model, "torch-bf16" if precision == "bf16" else "torch"


def _missing(client, name: str, alias: str | None, number: str | None) -> str | None:
    """What of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` the registry does not have, with the names it
    has; None where it cannot tell (the registry does not answer, or has them all)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            return None
        return f"no registered model {name!r}{record.registered_model_hint(client, name)}"
    if alias is not None:
        aliases = sorted(model.aliases or {})
        if alias in aliases:
            return None
        if not aliases:
            return f"registered model {name!r} has no alias {alias!r} (it has none)"
        return (f"registered model {name!r} has no alias {alias!r} (its aliases: {', '.join(aliases)})"
                f"{name_hint(alias, aliases)}")
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return None
    if number is None or int(number) in versions:
        return None
    held = f"its versions: {number_ranges(versions)}" if versions else "it has none"
    return f"registered model {name!r} has no version {number} ({held})"


def number_ranges(numbers: Iterable[int], most: int = 12) -> str:
    """Sorted distinct ``numbers`` as a person reads them: runs of three or more as ``first-last`` (``1-40, 42, 43,
    45-1047``); past ``most`` pieces, the first and last ``most // 2`` around ``...``, with the count."""
    values = sorted(set(numbers))
    pieces: list[str] = []
    start = 0
    for end in range(len(values)):
        if end + 1 < len(values) and values[end + 1] == values[end] + 1:
            continue
        run = values[start:end + 1]
        pieces.extend([f"{run[0]}-{run[-1]}"] if len(run) >= 3 else map(str, run))
        start = end + 1
    if len(pieces) > most:
        half = max(1, most // 2)
        pieces = [*pieces[:half], f"... ({len(values)} in all)", *pieces[-half:]]
    return ", ".join(pieces)


def fetch_version(client, uri: str, dst: str | Path,
                  variant: str | None = None) -> tuple[Path, str, str | None, dict[str, Any]]:
    """The files that run the registered version ``uri`` (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) as it
    serves, downloaded into ``dst``: its ONNX Runtime export, to be run in ``variant`` (``fp32`` or ``int8``; None:
    the variant its model config serves), when it carries one and serves through it or ``variant`` asks for it;
    else its packed PyTorch model directory. Only those files: a version also carries the other model and the code.

    Returns:
        ``(directory, version, variant, settings)``: the model directory under ``dst``, the version number, the ONNX
        variant to run (None for the packed PyTorch model), and the windows and span search it serves with (its
        model config's :data:`~pruning.config.EVALUATION_KEYS`).

    Raises:
        VersionError: in one line naming ``uri``: not of either form, no such model, version or alias, files of
            the version gone from the artifact store, or a ``variant`` of a version with no ONNX export.
    """
    rest = uri[len(record.MODELS_SCHEME):] if uri.startswith(record.MODELS_SCHEME) else ""
    name, at, alias = rest.partition("@")
    if not at:
        name, _, number = rest.rpartition("/")
    if not name or "/" in name or not (alias if at else number.isdigit()):
        raise VersionError(f"{uri}: not a registered version (models:/NAME/VERSION or models:/NAME@ALIAS)")
    try:
        found = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, number)
    except MlflowException as err:
        missing = _missing(client, name, alias if at else None, number if not at else None)
        raise VersionError(f"{uri}: {missing or error_line(err, 'not found')} (in {client.tracking_uri})") from None
    version = str(found.version)
    root = client.get_model_version_download_uri(name, version).rstrip("/")
    lost = lost_files(root, client.tracking_uri, str(dst))
    if lost is not None:
        raise VersionError(f"{uri} (version {version}): {lost}")
    try:
        served = _served_files(dst)
    except ValueError as err:
        raise VersionError(f"{uri} (version {version}): {err}") from None
    if variant is not None and served.onnx_dir is None:
        raise VersionError(f"{uri} (version {version}): --variant {variant}: the version carries no ONNX export "
                             "(registered without one); it runs as its packed PyTorch model")
    chosen = variant or (served.variant if served.variant != "none" else None)
    path = served.onnx_dir if chosen is not None else served.model_dir
    if not path:
        raise VersionError(f"{uri} (version {version}): holds no packed model (no {ARTIFACT_MODEL_DIR} artifact)")
    _fetcher(root, client.tracking_uri, dst)(path)
    settings = {key: served.settings[key] for key in EVALUATION_KEYS if key in served.settings}
    return Path(dst, path), version, chosen, settings
