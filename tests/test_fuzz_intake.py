"""Property-based fuzzing of intake and audit (issue 12): only named refusals, state untouched.

Hypothesis mutates a valid bundle (flip, insert, delete bytes in header and
body; truncate), rewrites its header JSON with random values, re-signs random
manifests with an enrolled key (so the input reaches the checks after the
signature) and generates headers from scratch. ``read_bundle``,
``audit_bundle`` and ``Atlas.verify_bundle`` must fail only with a
``FedarchesError`` whose message starts with its check, and the atlas
directory must stay byte-identical.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedarches.errors import FedarchesError
from fedarches.format.bundle import audit_bundle, read_bundle
from test_atlas_support import bundle_for, enrolled_key, new_atlas, tree_digest
from test_intake_limits import resign, rewrite_header, split, with_header

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


class World:
    """One atlas with an enrolled site and a valid bundle, shared by every example."""

    def __init__(self, tmp):
        self.atlas = new_atlas(tmp)
        self.key = enrolled_key(self.atlas, "site-a")
        self.good = bundle_for(self.atlas, self.key, "site-a", ["q1"])
        self.config = self.atlas.version(1).model.config
        self.before = tree_digest(self.atlas.path)

    def probe(self, data: bytes) -> None:
        """Every entry point either accepts ``data`` or refuses it naming its check."""
        for call in (read_bundle, lambda d: audit_bundle(d, self.config), self.atlas.verify_bundle):
            try:
                call(data)
            except FedarchesError as exc:
                assert str(exc).startswith(exc.check), (type(exc).__name__, str(exc)[:200])
        assert tree_digest(self.atlas.path) == self.before


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("fuzz"))


def _mutate(data: bytes, ops: list[tuple[str, float, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, where, n, extra in ops:
        if not buf:
            break
        pos = min(int(where * len(buf)), len(buf) - 1)
        if op == "flip":
            buf[pos] ^= n % 255 + 1
        elif op == "insert":
            buf[pos:pos] = extra
        elif op == "delete":
            del buf[pos : pos + n % 64 + 1]
        else:
            del buf[pos:]
    return bytes(buf)


# header offsets are small; bias positions towards the start so the header gets most hits
positions = st.one_of(st.floats(0, 0.05), st.floats(0, 1, exclude_max=True))
mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), positions, st.integers(0, 1000), st.binary(max_size=16))


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_bytes_are_named_refusals(world, ops):
    world.probe(_mutate(world.good, ops))


@FUZZ
@given(path=st.lists(st.sampled_from(["__metadata__", "encoder/q1", "decoder/q1", "dtype", "shape", "data_offsets",
                                       "fedarches.contribution", "fedarches.signature", "x"]), min_size=1, max_size=3),
       value=json_values)
def test_rewritten_header_values_are_named_refusals(world, path, value):
    def edit(header: dict[str, Any]) -> None:
        node: Any = header
        for k in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(k), dict):
                break
            node = node[k]
        if isinstance(node, dict):
            node[path[-1]] = value

    world.probe(rewrite_header(world.good, edit))


@FUZZ
@given(field=st.sampled_from(["atlas", "site", "key_id", "parent", "parent_number", "strategy", "conditions",
                              "tensors", "metrics", "format", "extra"]), value=json_values,
       tensor_field=st.sampled_from([None, "sha256", "shape", "dtype"]))
def test_signed_random_manifests_are_named_refusals(world, field, value, tensor_field):
    def edit(m: dict[str, Any]) -> None:
        if tensor_field is not None:
            m["tensors"]["encoder/q1"][tensor_field] = value
        else:
            m[field] = value

    world.probe(resign(world.good, world.key, edit))


@FUZZ
@given(header=st.dictionaries(st.text(max_size=12), json_values, max_size=5), body=st.binary(max_size=256),
       real_meta=st.booleans())
def test_generated_headers_are_named_refusals(world, header, body, real_meta):
    if real_meta:
        header["__metadata__"] = json.loads(split(world.good)[0])["__metadata__"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    world.probe(with_header(raw + b" " * (-len(raw) % 8), body))
