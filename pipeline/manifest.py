"""The manifest: YAML read safely, validated once by pydantic, paths resolved.

Every relative path is resolved against the manifest's folder (``data.root``, the weak
labels and the store: the operator's own files) or against ``data.root`` (the rest of
``data``: images, gold masks), and those data paths must stay inside ``data.root``. Image
lists and Parquet indexes may be anywhere (a subset of a read-only dataset): a relative
one is looked for beside the manifest, then under ``data.root``; their entries must stay
inside it. The result is a frozen ``Manifest`` that the rest of seglab trusts.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from seglab.pipeline.base.errors import ManifestError
from seglab.pipeline.base.objecturl import read_bytes
from seglab.pipeline.core.objects import Location, LocationError
from seglab.pipeline.core.paths import check_data_root, check_glob_walk, is_url, object_key, resolve_index, url_root
from seglab.pipeline.core.paths import resolve as _resolve
from seglab.pipeline.core.registry import STAGES
from seglab.stages.base import ROUND_SEPARATOR
from seglab.workers.model_configs import Sam2Config, SamConfig
from seglab.workers.weightfree import WeightFreeConfig

if TYPE_CHECKING:
    from seglab.stages.calibrate import CalibrateConfig
    from seglab.stages.embed import EmbedConfig
    from seglab.stages.ingest import IngestConfig
    from seglab.stages.prompts import PromptsConfig
    from seglab.stages.refine import RefineConfig
    from seglab.stages.retrain import RetrainConfig
    from seglab.stages.select import SelectConfig

BackendConfig = Annotated[WeightFreeConfig | SamConfig | Sam2Config, Field(discriminator="name")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageSource(_Frozen):
    """Exactly one way of listing images."""

    glob: str | None = Field(None, description="Glob relative to data.root, e.g. 'images/*.png' ('**' recurses).")
    list: str | None = Field(
        None,
        description="Text file with one image path per line, relative to data.root and "
        "inside it. The file itself may be anywhere: a relative path is looked for beside the "
        "manifest, then under data.root.",
    )
    parquet: str | None = Field(
        None,
        description="Parquet index with one image path per row (relative to data.root and inside it); found like list.",
    )
    column: str = Field("path", description="Column of the Parquet index holding the image path.")
    sample: tuple[str, ...] | None = Field(
        None, description="Names of photographs bundled with scikit-image (e.g. astronaut, coffee) for demos."
    )

    @field_validator("glob")
    @classmethod
    def _safe_glob(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and is_url(v):
            raise ValueError(f"glob '{v}' is a URL; only local paths relative to data.root are accepted")
        if v is not None and (Path(v).is_absolute() or ".." in Path(v).parts):
            raise ValueError(f"glob '{v}' must be relative to data.root and must not contain '..'")
        if v is not None and info.context and url_root(info) is None:
            check_glob_walk(v, Path(info.context["root"]))
        return v

    @field_validator("list", "parquet")
    @classmethod
    def _resolve_files(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else resolve_index(v, info)

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, raw: object) -> object:
        """Before the fields: a missing index file is moot when two sources are given."""
        if isinstance(raw, dict):
            given = [k for k in ("glob", "list", "parquet", "sample") if raw.get(k) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of glob, list, parquet, sample (got {given or 'none'})")
        return raw

    @model_validator(mode="after")
    def _index_readable(self, info: ValidationInfo) -> ImageSource:
        if info.context and (self.list is not None or self.parquet is not None):
            _check_index(self, url_root(info))  # a manifest being loaded: its image index must be readable now
        return self


def index_entries(source: ImageSource) -> list[str]:
    """The image paths an image list (blank and '#' lines skipped) or a Parquet index holds,
    in order; the index is a local file or an object (read whole either way). OSError,
    UnicodeDecodeError or pyarrow's errors when it cannot be read."""
    name = source.list if source.list is not None else source.parquet
    assert name is not None  # only for a list or a Parquet index
    data = read_bytes(name)
    if source.list is not None:
        lines = data.decode("utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    table = pq.ParquetFile(pa.BufferReader(data)).read(columns=[source.column])
    return [str(v) for v in table.column(0).to_pylist()]


def _check_index(source: ImageSource, root_url: str | None) -> None:
    """An image list or Parquet index must be a readable file (or object) of local paths:
    ValueError naming it otherwise. Under a URL data root (``root_url``) its entries are keys
    and one escaping the root is refused here; under a folder, when listed."""
    index = source.list if source.list is not None else source.parquet
    what = "image list" if source.list is not None else "Parquet index"
    try:
        entries = index_entries(source)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {index} is not UTF-8 text ({exc})") from None
    except Exception as exc:  # OSError, pyarrow's errors for a corrupt file or a missing column
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {index} cannot be read: {reason}") from None
    urls = [entry for entry in entries if is_url(entry)]
    if urls:
        raise ValueError(
            f"{what} {index} names URLs ({', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''}); "
            f"only {'keys' if root_url else 'local paths'} relative to data.root are accepted"
        )
    if root_url is not None:
        _check_keys(entries, root_url, f"{what} {index}")


def _check_keys(entries: Sequence[str], root_url: str, index: str) -> None:
    """ValueError naming ``index`` for the first entry (blank and '#' lines aside) that would
    leave the URL data root ``root_url``."""
    for entry in entries:
        if entry and not entry.startswith("#"):
            try:
                object_key(entry, root_url)
            except ValueError as exc:
                raise ValueError(f"{index}: {exc}") from None


class WeakLabels(_Frozen):
    kind: Literal["points", "scribbles", "coarse", "boxes"]
    path: str = Field(
        description="points/boxes: one table (JSON, CSV or Parquet) for all images; "
        "scribbles/coarse: a folder of PNG label maps named like the images (<stem>.png). "
        "Relative to the manifest's folder (like the store), not to data.root, and not confined to it; "
        "under an s3:// or gs:// data.root it may be a URL too (a table object, or a prefix of label maps)."
    )
    unlabelled: int = Field(255, ge=0, le=65535, description="Label-map value meaning 'no label'.")
    background: int | None = Field(
        None,
        ge=0,
        le=65534,
        description="Boxes only; one of data.classes' ids. The class of everything no box "
        "covers; it gets no boxes of its own and may appear anywhere, including inside other classes' boxes. "
        "Unset: every class that appears has boxes, and a class appears only inside its boxes.",
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, v: str, info: ValidationInfo) -> str:
        if is_url(v) and (not info.context or url_root(info) is not None):
            return _url_location(v, "weak label")
        if is_url(v):
            raise ValueError(f"'{v}' is a URL; weak labels may be one only when data.root is an s3:// or gs:// URL")
        return _resolve(v, info, under_root=False)

    @field_validator("background")
    @classmethod
    def _boxes_only(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")  # absent when kind itself is invalid: that error is reported instead
        if v is not None and kind is not None and kind != "boxes":
            raise ValueError(
                f"is only for kind: boxes, not kind: {kind} (the other kinds label the background "
                f"like any class, where it is drawn)"
            )
        return v


class ClassSpec(_Frozen):
    id: int = Field(ge=0, le=65534)
    name: str = Field(min_length=1)


class GoldSet(_Frozen):
    """Images with full ground-truth masks: <masks>/<image stem>.png (or .bmp, .tif, .tiff)
    holding a class id, or a value listed in ``ignore``, per pixel."""

    images: ImageSource
    masks: str = Field(
        description="Folder of gold masks named <image stem>.png|.bmp|.tif|.tiff, under data.root "
        "(a key prefix under an s3:// or gs:// data.root)."
    )
    ignore: tuple[int, ...] = Field(
        (), description="Gold mask values excluded from every metric (e.g. CamVid 11, GrabCut's border band 128)."
    )

    @field_validator("masks")
    @classmethod
    def _resolve_masks(cls, v: str, info: ValidationInfo) -> str:
        return _resolve(v, info)


class DataConfig(_Frozen):
    root: str = Field(
        ".",
        description="Existing folder the images, the entries of image lists and gold masks are "
        "relative to and must stay inside (weak labels are relative to the manifest); or an "
        "s3://bucket/prefix or gs://bucket/prefix URL, whose objects they are then keys under "
        "(listed when the run starts), or a file:///folder URL.",
    )
    images: ImageSource
    weak: WeakLabels
    classes: tuple[ClassSpec, ...] = Field(min_length=1)
    ignore_id: int = Field(255, ge=0, le=65535, description="Id written for pixels without a trusted label.")
    calibration: GoldSet | None = Field(None, description="Gold-labelled images for conformal calibration.")
    evaluation: GoldSet | None = Field(None, description="Gold-labelled images for measuring label quality.")

    @field_validator("root")
    @classmethod
    def _resolve_root(cls, v: str, info: ValidationInfo) -> str:
        root = _url_location(v, "dataset") if is_url(v) else _resolve(v, info, under_root=False)
        if info.context and not is_url(root):  # a bucket is not asked after before the run lists it
            check_data_root(Path(root))
        return root

    @model_validator(mode="after")
    def _classes_consistent(self) -> DataConfig:
        ids = [c.id for c in self.classes]
        names = [c.name for c in self.classes]
        columns: tuple[tuple[str, Sequence[int | str]], ...] = (("id", ids), ("name", names))
        for what, values in columns:
            dupes = sorted({v for v in values if values.count(v) > 1}, key=str)
            if dupes:
                raise ValueError(f"class {what}s must be unique; repeated: {dupes}")
        if self.ignore_id in ids:
            raise ValueError(f"ignore_id {self.ignore_id} is also a class id")
        if self.weak.unlabelled in ids:
            raise ValueError(f"weak.unlabelled {self.weak.unlabelled} is also a class id")
        if self.weak.background is not None and self.weak.background not in ids:
            raise ValueError(f"weak.background {self.weak.background} is not a class id (the classes are {ids})")
        for section in ("calibration", "evaluation"):
            gold = getattr(self, section)
            clashes = sorted(set(gold.ignore) & set(ids)) if gold else []
            if clashes:
                raise ValueError(f"{section}.ignore {clashes} are also class ids")
        return self


def _url_location(text: str, what: str) -> str:
    """A URL -> the absolute path of a file:// URL, or the s3:// / gs:// URL normalised (no
    trailing '/'); ValueError for another scheme or a URL without a bucket."""
    try:
        location = Location.parse(text, what=what)
    except LocationError as exc:
        raise ValueError(str(exc)) from None
    return str(location)


class RunSection(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = 0


class StoreConfig(_Frozen):
    path: str | None = Field(
        None,
        description="Where the store is: a folder, or an s3://bucket/prefix, gs://bucket/prefix or "
        "file:///folder URL; default runs/<run.name>.zarr beside the manifest.",
    )
    shard_size: int = Field(
        128,
        ge=1,
        le=65536,
        description="Units per shard of a new store: a worker's batch is at most one shard, "
        "written as one object per output. Kept by a store once made.",
    )

    @field_validator("path")
    @classmethod
    def _resolve_store(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        if is_url(v):
            try:
                location = Location.parse(v)
            except LocationError as exc:
                raise ValueError(str(exc)) from None
            return str(location.local) if location.local is not None else v
        return _resolve(v, info, under_root=False)


class RayConfig(_Frozen):
    address: str | None = Field(None, description="Ray cluster address; none starts Ray on this machine.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    workers: int | None = Field(None, ge=1, description="Worker actors per map stage (default: what the CPUs allow).")
    max_retries: int = Field(2, ge=0, le=20, description="Retries of a unit after a transient failure.")
    engine: Literal["pool", "data"] = Field(
        "pool",
        description="What runs the map stages: 'pool', seglab's actor pool (kept across stages "
        "of the same resources), or 'data', Ray Data's map_batches over an actor pool per stage "
        "(the README's Scaling out section compares the two).",
    )
    stall_timeout: float = Field(
        1800.0,
        gt=0,
        description="A stage fails, naming a unit in flight, when no batch "
        "finishes for this many seconds (hung workers, or none can be scheduled).",
    )
    worker_start_timeout: float = Field(
        120.0,
        gt=0,
        description="A worker started to replace a lost one that does "
        "not answer within this many seconds (no room left on the cluster) is given "
        "up: the stage goes on with fewer workers.",
    )


if TYPE_CHECKING:

    class StageSections(_Frozen):
        """What type checkers see of the model built below from the registry: one field per
        stage, its Config (a stage added to the registry needs its line here too)."""

        ingest: IngestConfig = IngestConfig()
        embed: EmbedConfig = EmbedConfig()
        prompts: PromptsConfig = PromptsConfig()
        select: SelectConfig = SelectConfig()
        calibrate: CalibrateConfig = CalibrateConfig()
        refine: RefineConfig = RefineConfig()
        retrain: RetrainConfig = RetrainConfig()

else:
    _stage_fields: dict[str, Any] = {name: (stage.Config, stage.Config()) for name, stage in STAGES.items()}
    StageSections = create_model(
        "StageSections",
        __base__=_Frozen,
        __doc__="One manifest key per stage of the registry (pipeline/core/registry.py), holding its Config.",
        **_stage_fields,
    )


class Manifest(StageSections):
    """A validated manifest. ``path`` is the file it came from. Its stage keys (ingest,
    embed, ..., retrain) come from the stage registry, so a new stage needs no edit here."""

    path: str = Field("", description="Set by the loader; not written in YAML.", exclude=True)
    run: RunSection
    data: DataConfig
    backend: BackendConfig = WeightFreeConfig()
    store: StoreConfig = StoreConfig()
    ray: RayConfig = RayConfig()
    rounds: int = Field(
        0,
        ge=0,
        le=20,
        description="Rounds of segmenter retraining: R runs refine -> retrain R "
        "times, each round's mean teacher feeding the next refine (store groups retrain, refine.1, "
        "retrain.1, ..., refine.R); 0: no retraining.",
    )

    @property
    def store_location(self) -> str:
        """The store's location: an absolute local path or an object-storage URL."""
        if self.store.path:
            return self.store.path
        return str(Path(self.path).resolve().parent / "runs" / f"{self.run.name}.zarr")

    def stage_config(self, stage: str):
        """The manifest section of ``stage``; every round's instance ('refine.2') shares its stage's."""
        return getattr(self, stage.split(ROUND_SEPARATOR, 1)[0])


#: largest manifest file read (real ones are a few KB); bounds the YAML parser's work
MAX_MANIFEST_BYTES = 1 << 20
#: most nodes aliases may add to a manifest once expanded (real ones add a few dozen)
MAX_YAML_NODES = 100_000


class _Refused(yaml.MarkedYAMLError):
    """A document refused before it is built (an alias bomb, a recursive alias)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _written_size(root: yaml.Node) -> int:
    """Distinct nodes of the document as written: an anchored node counts once, however
    many aliases name it."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return len(seen)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of the document with every alias expanded, counted without expanding anything
    (each shared node is sized once); _Refused for a recursive alias, or when aliases add
    more than MAX_YAML_NODES nodes to those written (a large plain document is not a bomb:
    MAX_MANIFEST_BYTES bounds it)."""
    limit = _written_size(root) + MAX_YAML_NODES
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            ancestors.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > limit:
                raise _Refused(
                    problem=f"its aliases expand to more than {limit} values from {limit - MAX_YAML_NODES} "
                    f"written (an alias bomb, like 'billion laughs'?); refused without expanding it",
                    problem_mark=node.start_mark,
                )
        elif id(node) not in sizes:
            if id(node) in ancestors:
                raise _Refused(
                    problem="an alias refers to a node that contains it (a recursive alias)",
                    problem_mark=node.start_mark,
                )
            ancestors.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


class _StrictLoader(yaml.SafeLoader):
    """safe_load that also refuses duplicate keys (YAML would keep the last silently), alias
    bombs and recursive aliases (before anything is built), and reports values that do not
    convert (e.g. the date 2024-13-45) as YAML errors at their line."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # ValueError, AttributeError, ... from PyYAML's converters
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot convert the value {node.value!r:.80} ({exc})", node.start_mark
            ) from None


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def parse_manifest(raw: object, path: Path) -> Manifest:
    """Validate an already-parsed YAML document; every problem is listed with its location."""
    if not isinstance(raw, dict):
        raise ManifestError(path, [("", "the manifest must be a mapping of sections (run, data, ...)")])
    manifest_dir = path.resolve().parent
    data = raw.get("data")
    data = data if isinstance(data, dict) else {}
    root_value = data.get("root", ".") if isinstance(data.get("root", "."), str) else "."
    try:
        return Manifest.model_validate(
            {**raw, "path": str(path.resolve())},
            context={"manifest_dir": str(manifest_dir), "root": _context_root(root_value, manifest_dir)},
        )
    except ValidationError as exc:
        problems = [(_location(err["loc"]), err["msg"].removeprefix("Value error, ")) for err in exc.errors()]
        raise ManifestError(path, problems) from None


def _context_root(root_value: str, manifest_dir: Path) -> str:
    """data.root as the validators of data paths see it: an absolute path, or an s3:// /
    gs:// URL; the manifest's folder when it is unusable (the data.root validator names why)."""
    try:
        if is_url(root_value):
            return str(Location.parse(root_value))
        return str((manifest_dir / root_value).resolve() if not Path(root_value).is_absolute() else Path(root_value))
    except (LocationError, OSError, ValueError, RuntimeError):  # e.g. a NUL byte
        return str(manifest_dir)


def _read_text(path: Path) -> str:
    """The manifest file's text; ManifestError when it cannot be read, is not UTF-8, or is
    larger than MAX_MANIFEST_BYTES (read no further than that: it may be a stream)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
            size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise ManifestError(path, [("", f"cannot read: {exc}")]) from None
    if len(data) > MAX_MANIFEST_BYTES:
        limit = f"{MAX_MANIFEST_BYTES >> 20} MB"
        shown = f"{size / 2**20:.1f} MB" if size > MAX_MANIFEST_BYTES else f"over {limit}"
        raise ManifestError(path, [("", f"is {shown}; a manifest is a few KB, refusing files over {limit}")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, [("", f"cannot read: {exc}")]) from None


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message (problem, then 'in "<file>", line L, column C') as one line."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def load_manifest(path: Path | str) -> Manifest:
    path = Path(path)
    stream = io.StringIO(_read_text(path))
    stream.name = str(path)  # YAML's marks then read 'in "<path>", line 3', not "<unicode string>"
    try:
        raw = yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise ManifestError(path, [("", f"refused: {_one_line(exc)}")]) from None
    except yaml.YAMLError as exc:
        raise ManifestError(path, [("", f"not valid YAML: {_one_line(exc)}")]) from None
    except RecursionError:
        raise ManifestError(path, [("", "not valid YAML: nested too deeply")]) from None
    return parse_manifest(raw, path)


def manifest_schema() -> dict:
    """JSON schema of the manifest (what manifests/schema.json holds)."""
    schema = Manifest.model_json_schema()
    schema["properties"].pop("path", None)
    return schema


EMBEDDED = {"demo": "demo.yaml"}


def open_manifest(arg: str | Path, *, store: Path | str | None = None) -> Manifest:
    """Load a manifest file, or an embedded one by name ('demo') when no such file exists.

    An embedded manifest lives inside the installed package, so its store defaults to
    ./runs/<run.name>.zarr under the current folder. ``store`` overrides either.
    """
    path = Path(arg)
    if not path.exists() and str(arg) in EMBEDDED:
        path = Path(str(files("seglab.manifests") / EMBEDDED[str(arg)]))
        manifest = load_manifest(path)
        store = store or str(Path.cwd() / "runs" / f"{manifest.run.name}.zarr")
    else:
        manifest = load_manifest(path)
    if store is not None:
        where = str(store) if is_url(str(store)) else str(Path(store).resolve())
        manifest = manifest.model_copy(update={"store": manifest.store.model_copy(update={"path": where})})
    return manifest
