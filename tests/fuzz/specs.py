"""Hypothesis strategies for FineTuneJob specs as they arrive on the wire (camelCase JSON).

The strategies are derived from the API models themselves (:mod:`kubetune_api.spec`): every field
of every section is generated from its annotation and its bounds, so a field added to the API is
fuzzed without touching this file. Strings with a syntax (a pattern or a :class:`FieldRule`) get a
generator of their own, looked up by that pattern or rule (:data:`STRING_KINDS`); a new kind of
string without one fails :func:`string_kind` loudly rather than being fuzzed as plain text.

Each model section is drawn either clean (only values its field accepts, as far as a field alone
can tell: cross-field rules still refuse some) or perturbed: near-valid values (``48GB``,
``8 Gi``, ``-1``, a YAML ``no`` read as false, an upper-case bucket, a missing required field, a
snake_case or misspelt key, an object that is a string) mixed into valid ones.
"""

from __future__ import annotations

import functools
import math
import string
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import annotated_types as at
from hypothesis import strategies as st
from pydantic.fields import FieldInfo

from kubetune_api import coordinates
from kubetune_api import spec as api
from kubetune_api.base import ApiModel, FieldRule

Strategy = st.SearchStrategy[Any]
Json = Any

#: Values YAML turns into something else than the string a user meant (and other near-misses).
YAMLISH: Strategy = st.sampled_from(
    [True, False, "yes", "no", "on", "off", "true", "false", "True", "y", "n", "~", "null", "1", "0", 1, 0]
)
#: Any JSON value at all.
JUNK: Strategy = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
#: Text with the characters that break naive handling: separators, controls, astral, RTL, NUL.
AWKWARD = "\u2028\u2029\x85\x00\t\r\n \u00a0\u200b\u202e\ufeff\U0001f600é/:@.-_\\'\""
#: Characters JSON can carry (no lone surrogates), with the awkward ones often.
CHARS: Strategy = st.characters(exclude_categories=["Cs"]) | st.sampled_from(AWKWARD)
AWKWARD_TEXT: Strategy = st.text(alphabet=CHARS, max_size=40)


def mostly(valid: Strategy, near: Strategy) -> Strategy:
    """Valid values about four times in five, near-valid ones otherwise."""
    return st.one_of(valid, valid, valid, valid, near)


# --- strings with a syntax ----------------------------------------------------------------------

_LOWER_ALNUM = string.ascii_lowercase + string.digits
_DNS_LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
DNS_SUBDOMAINS: Strategy = st.lists(_DNS_LABEL, min_size=1, max_size=4).map(".".join)
NEAR_DNS: Strategy = st.one_of(
    st.sampled_from(["", "Data", "my_secret", "-a", "a-", "a..b", "a b", " hf", "hf\n", "ü", "a" * 254]),
    AWKWARD_TEXT,
)

_BUCKET = st.from_regex(r"\A[a-z0-9][a-z0-9.\-]{1,20}[a-z0-9]\Z")
_KEY = st.text(alphabet=CHARS | st.sampled_from("/._-"), max_size=30)
S3_URIS: Strategy = st.one_of(
    _BUCKET.map(lambda b: f"s3://{b}"),
    st.builds(lambda b, k: f"s3://{b}/{k}", _BUCKET, _KEY),
    st.builds(lambda b, k: f"s3://{b}/{k}.jsonl", _BUCKET, st.from_regex(r"\A[a-z0-9/_-]{1,20}\Z")),
)
NEAR_S3: Strategy = st.one_of(
    st.sampled_from(
        [
            "S3://data/train.jsonl",
            "s3://Data/train.jsonl",
            "s3://ab/x",
            "s3:/data/x",
            "https://data.s3.amazonaws.com/train.jsonl",
            " s3://data/x",
            "s3://data/x\n",
            "s3://data_set/x",
            "data/train.jsonl",
            "",
            "s3://" + "a" * 64 + "/x",
        ]
    ),
    st.builds(lambda b, k: f"s3://{b}/{k}", st.text(max_size=8), AWKWARD_TEXT),
)

_HUB_PART = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._\-]{0,20}\Z")
HUB_IDS: Strategy = st.one_of(_HUB_PART, st.builds(lambda o, n: f"{o}/{n}", _HUB_PART, _HUB_PART))
NEAR_HUB: Strategy = st.sampled_from(
    ["org/name/extra", "/name", "org/", "https://huggingface.co/org/name", "org name", "-org/x", "ü/x"]
)

ENDPOINTS: Strategy = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    DNS_SUBDOMAINS | st.just("127.0.0.1"),
    st.sampled_from(["", ":9000", ":443"]),
    st.sampled_from(["", "/", "/s3"]),
)
NEAR_ENDPOINT: Strategy = st.sampled_from(
    ["minio:9000", "ftp://minio", "http://", "http:// minio", "https://minio\u00a0x", "HTTP://minio", "//x"]
)

RESOURCE_NAMES: Strategy = st.one_of(
    st.sampled_from(["nvidia.com/gpu", "amd.com/gpu", "habana.ai/gaudi", "kubernetes.io/gpu"]),
    st.builds(lambda d, n: f"{d}/{n}", DNS_SUBDOMAINS, _DNS_LABEL),
)
NEAR_RESOURCE: Strategy = st.sampled_from(
    [
        "nvidia.com/GPU",
        "nvidia.com//gpu",
        "/gpu",
        "nvidia.com/",
        "g pu",
        "gpu",
        "requests.x.io/gpu",
        "x.io/" + "a" * 64,
    ]
)

SECRET_KEYS: Strategy = st.from_regex(r"\A[-._a-zA-Z0-9]{1,30}\Z").filter(
    lambda k: k != "." and not k.startswith("..")
)
NEAR_SECRET_KEY: Strategy = (
    st.sampled_from(["", ".", "..", "../token", "a b", "a/b", "tøken", "token\n"]) | AWKWARD_TEXT
)

_DIGITS = st.integers(min_value=0, max_value=10**6).map(str)
QUANTITIES: Strategy = st.one_of(
    st.integers(min_value=0, max_value=2**40),
    st.builds(
        lambda n, s: f"{n}{s}",
        _DIGITS | st.sampled_from(["0.5", ".5", "1.", "+2", "1.25"]),
        st.sampled_from(
            ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E"]
        ),
    ),
    st.builds(lambda n, e: f"{n}e{e}", _DIGITS, st.integers(min_value=-9, max_value=9)),
)
NEAR_QUANTITY: Strategy = st.one_of(
    st.sampled_from(
        [
            "48GB",
            "8 Gi",
            -1,
            "-1",
            "-1Gi",
            "1.5.5",
            "1e1.5",
            "1e",
            "1E1000000",
            "1e999999999",
            "Gi",
            "",
            " 1",
            "1 ",
            "1gi",
            "1KB",
            "0x10",
            "1_000",
            "１",
            "٣",
            1.5,
            2.0,
            True,
            "1" * 80,
            10**30,
        ]
    ),
    AWKWARD_TEXT,
)

_TAG = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}\Z")
_REPO = st.lists(st.from_regex(r"\A[a-z0-9]+([._-][a-z0-9]+)?\Z"), min_size=1, max_size=3).map("/".join)
IMAGES: Strategy = st.builds(
    lambda registry, repo, tag, digest: f"{registry}{repo}{tag}{digest}",
    st.sampled_from(["", "registry.example.com/", "localhost:5000/", "ghcr.io/"]),
    _REPO,
    st.one_of(st.just(""), _TAG.map(lambda t: f":{t}")),
    st.one_of(st.just(""), st.from_regex(r"\A[0-9a-f]{64}\Z").map(lambda h: f"@sha256:{h}")),
)
NEAR_IMAGE: Strategy = st.one_of(
    st.sampled_from(
        [
            "https://ghcr.io/org/img:1",
            "Registry.example/Team/Img",
            "img:1 ",
            " img",
            "img :1",
            "img@sha256:abc",
            "img:",
            "img::1",
            "",
            "ghcr.io/org/img:" + "a" * 129,
            "img\n",
        ]
    ),
    AWKWARD_TEXT,
)

_LABEL_VALUE = st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?\Z")
LABEL_VALUES: Strategy = st.one_of(st.just(""), _LABEL_VALUE)
#: (No null: the API server drops a null map value, the models refuse it; see test_specs_apiserver.)
NEAR_LABEL_VALUE: Strategy = st.one_of(
    st.sampled_from(["a b", "-a", "a-", "a" * 64, "a/b", "ü", "a\n", True, 1, 1.5]), AWKWARD_TEXT
)
_NAME_PART = st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?\Z")
LABEL_KEYS: Strategy = st.one_of(_NAME_PART, st.builds(lambda p, n: f"{p}/{n}", DNS_SUBDOMAINS, _NAME_PART))
NEAR_LABEL_KEY: Strategy = st.one_of(
    st.sampled_from(
        ["nvidia.com/", "/gpu", "a/b/c", "Nvidia.com/gpu", "a b", "", "-a", "a" * 64, "kubetune.dev/x", "ü"]
    ),
    AWKWARD_TEXT,
)


@dataclass(frozen=True)
class Kind:
    """How to generate one kind of string: valid values and near-valid ones."""

    valid: Strategy
    near: Strategy


def _rule_of(alias: Any) -> FieldRule:
    return next(m for m in get_args(alias)[1:] if isinstance(m, FieldRule))


def _last_rule(model: type[ApiModel], field: str) -> FieldRule:
    """The FieldRule a field's Bounds keeps (the last of its annotations)."""
    return [m for m in model.model_fields[field].metadata if isinstance(m, FieldRule)][-1]


#: URLs with credentials in them: refused by the tracking URI's own rule.
NEAR_TRACKING_URI: Strategy = st.one_of(
    NEAR_ENDPOINT, st.sampled_from(["https://user:secret@mlflow.example", "http://token@mlflow:5000/"])
)

#: Every string with a syntax in the API, by its pattern or its FieldRule.
STRING_KINDS: dict[Any, Kind] = {
    _last_rule(api.MlflowSpec, "tracking_uri"): Kind(ENDPOINTS, NEAR_TRACKING_URI),
    api.S3_URI_RULE: Kind(S3_URIS, NEAR_S3),
    api.OBJECT_NAME_RULE: Kind(DNS_SUBDOMAINS, NEAR_DNS),
    api.RESOURCE_NAME_RULE: Kind(RESOURCE_NAMES, NEAR_RESOURCE),
    _rule_of(api.SecretKey): Kind(SECRET_KEYS, NEAR_SECRET_KEY),
    _rule_of(api.Endpoint): Kind(ENDPOINTS, NEAR_ENDPOINT),
    _rule_of(api.Quantity): Kind(QUANTITIES, NEAR_QUANTITY),
    _rule_of(api.ImageReference): Kind(IMAGES, NEAR_IMAGE),
    _rule_of(api.LabelValue): Kind(LABEL_VALUES, NEAR_LABEL_VALUE),
    _rule_of(api.TaintKey): Kind(st.one_of(st.just(""), LABEL_KEYS), NEAR_LABEL_KEY),
}
#: A core/v1 Affinity (passed through to the pod unchecked: only core/v1 judges it).
AFFINITIES: Strategy = st.builds(
    lambda key, values: {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": key, "operator": "In", "values": values}]}
                ]
            }
        }
    },
    LABEL_KEYS,
    st.lists(_LABEL_VALUE, min_size=1, max_size=3),
)
#: Fields whose syntax is checked elsewhere (an object rule, or core/v1), by model and field name.
FIELD_KINDS: dict[tuple[type[ApiModel], str], Kind] = {
    (api.ModelSpec, "source"): Kind(HUB_IDS | S3_URIS, NEAR_HUB | NEAR_S3),
    (api.SchedulingSpec, "affinity"): Kind(
        AFFINITIES, st.dictionaries(st.text(max_size=8), JUNK, max_size=3)
    ),
}
#: Map keys: label keys where the map is a set of labels (its rule checks the keys).
KEY_KINDS: dict[tuple[type[ApiModel], str], Kind] = {
    (api.SchedulingSpec, "node_selector"): Kind(LABEL_KEYS, NEAR_LABEL_KEY),
    (api.IdentitySpec, "pod_labels"): Kind(LABEL_KEYS, NEAR_LABEL_KEY),
    (api.IdentitySpec, "service_account_annotations"): Kind(
        st.sampled_from(["eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"]) | LABEL_KEYS,
        NEAR_LABEL_KEY,
    ),
}


# --- constraints of a field ---------------------------------------------------------------------


@dataclass
class Bounds:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int | None = None
    max_len: int | None = None
    syntax: Any = None  # a pattern (str) or a FieldRule

    def add(self, metadata: Iterable[Any]) -> Bounds:
        for item in metadata:
            if isinstance(item, FieldInfo):
                self.add(item.metadata)
            elif isinstance(item, at.Ge):
                self.ge = float(item.ge)  # type: ignore[arg-type]
            elif isinstance(item, at.Gt):
                self.gt = float(item.gt)  # type: ignore[arg-type]
            elif isinstance(item, at.Le):
                self.le = float(item.le)  # type: ignore[arg-type]
            elif isinstance(item, at.Lt):
                self.lt = float(item.lt)  # type: ignore[arg-type]
            elif isinstance(item, at.MinLen):
                self.min_len = item.min_length
            elif isinstance(item, at.MaxLen):
                self.max_len = item.max_length
            elif isinstance(item, FieldRule):
                self.syntax = item
            elif getattr(item, "pattern", None):
                self.syntax = item.pattern
        return self


def string_kind(bounds: Bounds, where: str) -> Kind | None:
    """The generator of a string with a syntax; None for free text."""
    if bounds.syntax is None:
        return None
    if bounds.syntax not in STRING_KINDS:
        raise AssertionError(
            f"{where}: no fuzz strategy for its syntax {bounds.syntax!r}: add it to STRING_KINDS"
        )
    return STRING_KINDS[bounds.syntax]


# --- values from annotations --------------------------------------------------------------------


def _ints(b: Bounds) -> Kind:
    lo = int(b.ge if b.ge is not None else (b.gt + 1 if b.gt is not None else -(2**63)))
    hi = int(b.le if b.le is not None else (b.lt - 1 if b.lt is not None else 2**64))
    # Where Go's int32 and int64 end: a bound the model lacks is one the Job may have.
    widths = [lo, hi, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63]
    valid = st.one_of(
        st.integers(min_value=lo, max_value=min(hi, max(lo, 0) + 10_000)),
        st.integers(min_value=lo, max_value=hi),
        st.sampled_from(sorted({w for w in widths if lo <= w <= hi})),
    )
    near = st.one_of(
        st.sampled_from([lo - 1, hi + 1, -(2**63) - 1, 2**64 + 1]),
        valid.map(str),
        valid.map(lambda n: n + 0.5),
        valid.map(float),
        YAMLISH,
    )
    return Kind(valid, near)


def _floats(b: Bounds) -> Kind:
    lo = b.ge if b.ge is not None else b.gt
    hi = b.le if b.le is not None else b.lt
    valid = st.floats(
        min_value=lo,
        max_value=hi,
        exclude_min=b.gt is not None,
        exclude_max=b.lt is not None,
        allow_nan=False,
        allow_infinity=False,
    )
    edges = [x for x in (lo, hi) if x is not None]
    near = st.one_of(
        st.sampled_from(
            [math.nan, math.inf, -math.inf, *edges, *(x - 1e-9 for x in edges), *(x + 1e-9 for x in edges)]
        ),
        valid.map(repr),
        YAMLISH,
    )
    return Kind(valid, near)


def _literals(values: tuple[Any, ...]) -> Kind:
    near: list[Any] = []
    for value in values:
        if isinstance(value, str):
            near += [value.upper(), value.capitalize(), f"{value} ", value.replace("_", "-")]
        else:
            near += [str(value), float(value), value + 1]
    return Kind(st.sampled_from(values), st.sampled_from(near) | YAMLISH)


def _unwrap(tp: Any, bounds: Bounds) -> tuple[Any, Bounds]:
    while get_origin(tp) is typing.Annotated:
        tp, *extra = get_args(tp)
        bounds = bounds.add(extra)
    return tp, bounds


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


#: How a value is drawn: only valid values, mostly valid ones, or only near-misses.
VALID, MIXED, NEAR = 0, 1, 2


def pick(kind: Kind, mode: int) -> Strategy:
    return (kind.valid, mostly(kind.valid, kind.near), kind.near)[mode]


def value(tp: Any, bounds: Bounds, mode: int, rate: int, *, where: str, keys: Kind | None = None) -> Strategy:
    """A value for annotation ``tp``, drawn as ``mode`` says; nested sections perturbed at ``rate``."""
    tp, bounds = _unwrap(tp, bounds)
    if bounds.syntax is not None and get_origin(tp) is not dict:  # a string kind (or a Quantity)
        kind = string_kind(bounds, where)
        assert kind is not None
        return pick(kind, mode)
    if _is_union(tp):
        members = [m for m in get_args(tp) if m is not type(None)]
        if type(None) in get_args(tp):  # Optional: an explicit null now and then
            rest = members[0] if len(members) == 1 else typing.Union[tuple(members)]  # noqa: UP007
            inner = value(rest, bounds, mode, rate, where=where, keys=keys)
            return st.one_of(inner, st.none()) if mode else inner
        return st.one_of(*(value(m, Bounds(), mode, rate, where=where, keys=keys) for m in members))
    if isinstance(tp, type) and issubclass(tp, ApiModel):
        return JUNK if mode == NEAR else sections(tp, rate)
    if get_origin(tp) is Literal:
        return pick(_literals(get_args(tp)), mode)
    if tp is bool:
        return pick(Kind(st.booleans(), YAMLISH), mode)
    if tp is int:
        return pick(_ints(bounds), mode)
    if tp is float:
        return pick(_floats(bounds), mode)
    if tp is str:
        lo, hi = bounds.min_len or 0, min(bounds.max_len or 64, 64)
        valid = st.text(alphabet=CHARS, min_size=lo, max_size=hi)
        near = st.sampled_from(["", " ", "x" * ((bounds.max_len or 300) + 1)]) | YAMLISH
        return pick(Kind(valid, near), mode)
    if get_origin(tp) is tuple:
        item = value(get_args(tp)[0], Bounds(), min(mode, MIXED), rate, where=f"{where}[]")
        lo, hi = bounds.min_len or 0, min(bounds.max_len or 4, 4)
        too_many = (bounds.max_len or 8) + 1
        near = st.one_of(st.just([]), item, st.lists(item, min_size=too_many, max_size=too_many))
        return pick(Kind(st.lists(item, min_size=lo, max_size=hi), near), mode)
    if get_origin(tp) is dict:
        key_kind = keys or Kind(st.text(min_size=1, max_size=20), st.just(""))
        item = value(get_args(tp)[1], Bounds(), min(mode, MIXED), rate, where=f"{where}{{}}")
        hi = min(bounds.max_len or 4, 4)
        mapping = st.dictionaries(pick(key_kind, min(mode, MIXED)), item, max_size=hi)
        not_mapping = st.one_of(
            st.dictionaries(key_kind.near, item, min_size=1, max_size=2),
            st.lists(item, max_size=2),
            st.text(max_size=5),
        )
        return pick(Kind(mapping, not_mapping), mode)
    if tp is Any:
        return JUNK
    raise AssertionError(f"{where}: no fuzz strategy for {tp!r}")


def _camel(model: type[ApiModel], name: str) -> str:
    return model.model_fields[name].alias or name


@functools.cache
def _field(model: type[ApiModel], name: str, mode: int, rate: int) -> Strategy:
    info = model.model_fields[name]
    where = f"{model.__name__}.{name}"
    if (model, name) in FIELD_KINDS:
        return pick(FIELD_KINDS[(model, name)], mode)
    keys = KEY_KINDS.get((model, name))
    return value(info.annotation, Bounds().add(info.metadata), mode, rate, where=where, keys=keys)


def _unknown_keys(model: type[ApiModel]) -> Strategy:
    """Keys a user might write by mistake: snake_case, a typo, another section's field."""
    names = list(model.model_fields)
    near = [n for n in names if _camel(model, n) != n]  # snake_case (the Python name)
    near += [_camel(model, n)[:-1] for n in names if len(_camel(model, n)) > 2]
    return st.sampled_from([*near, "foo", "apiVersion", "spec"]) if near else st.sampled_from(["foo", "spec"])


@functools.cache
def sections(model: type[ApiModel], rate: int) -> Strategy:
    """A model's wire form: required fields always (unless perturbed), optional ones at random.

    With ``rate``, one section in ``rate`` is perturbed: near-misses mixed into its values, a
    required field left out or a misspelt key added now and then, or no object at all.
    """

    @st.composite
    def build(draw: Callable[[Strategy], Any]) -> Json:
        perturbed = bool(rate) and draw(st.integers(min_value=0, max_value=rate - 1)) == 0
        if perturbed and draw(st.integers(min_value=0, max_value=9)) == 0:
            return draw(JUNK)  # not an object at all
        out: dict[str, Json] = {}
        for name, info in model.model_fields.items():
            present = info.is_required() or draw(st.booleans())
            if perturbed and draw(st.integers(min_value=0, max_value=9)) == 0:
                present = not present
            if present:
                out[_camel(model, name)] = draw(_field(model, name, MIXED if perturbed else VALID, rate))
        if perturbed and draw(st.integers(min_value=0, max_value=4)) == 0:
            out[draw(_unknown_keys(model))] = draw(JUNK)
        return out

    return build()


# --- one field off ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A field of the API, by its wire path: each step's key and the model found there (if one)."""

    steps: tuple[tuple[str | int, Any], ...]
    near: Strategy

    @property
    def path(self) -> str:
        return ".".join(str(key) for key, _ in self.steps)


def _optional_member(tp: Any) -> Any:
    tp, _ = _unwrap(tp, Bounds())
    if _is_union(tp):
        members = [m for m in get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0], Bounds())[0]
    return tp


def leaves(model: type[ApiModel], prefix: tuple[tuple[str | int, Any], ...] = ()) -> list[Leaf]:
    """Every field of ``model`` and its sections (list items through their first item)."""
    found = []
    for name, info in model.model_fields.items():
        key = _camel(model, name)
        tp = _optional_member(info.annotation)
        item = _optional_member(get_args(tp)[0]) if get_origin(tp) is tuple else None
        if isinstance(tp, type) and issubclass(tp, ApiModel):
            found.append(Leaf((*prefix, (key, None)), JUNK))  # the section is not an object
            found += leaves(tp, (*prefix, (key, tp)))
        elif isinstance(item, type) and issubclass(item, ApiModel):
            found.append(Leaf((*prefix, (key, None)), _field(model, name, NEAR, 0)))
            found += leaves(item, (*prefix, (key, [item]), (0, item)))
        else:
            found.append(Leaf((*prefix, (key, None)), _field(model, name, NEAR, 0)))
    return found


def one_field_off(model: type[ApiModel]) -> Strategy:
    """A clean spec with exactly one field (anywhere) set to a near-miss: every field gets its turn."""
    all_leaves = leaves(model)

    @st.composite
    def build(draw: Callable[[Strategy], Any]) -> Json:
        spec: Json = draw(sections(model, 0))
        leaf = draw(st.sampled_from(all_leaves))
        node = spec
        for (key, kind), _ in zip(leaf.steps, leaf.steps[1:], strict=False):
            if isinstance(node, list):
                node = node[0]
                continue
            if not isinstance(node.get(key), dict | list) or node.get(key) == []:
                node[key] = (
                    [draw(sections(kind[0], 0))] if isinstance(kind, list) else draw(sections(kind, 0))
                )
            node = node[key]
        node[leaf.steps[-1][0]] = draw(leaf.near)
        return spec

    return build()


def specs() -> Strategy:
    """FineTuneJob specs: clean ones, ones with about one section in six perturbed, and clean ones
    with exactly one field off (in equal parts)."""
    spec = api.FineTuneJobSpec
    return st.one_of(sections(spec, 0), sections(spec, 6), one_field_off(spec))


#: Names the API server accepts for a FineTuneJob.
FTJ_NAMES: Strategy = st.from_regex(
    rf"\A[a-z0-9]([-a-z0-9]{{0,{coordinates.MAX_NAME_LENGTH - 2}}}[a-z0-9])?\Z"
)
