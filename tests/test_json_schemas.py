"""Every command's --json output matches its JSON Schema in spec/json/."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from click.testing import CliRunner
from referencing import Registry, Resource

from nnpatch.cli import cli

SPEC = os.path.join(os.path.dirname(__file__), os.pardir, "spec")


def _load(rel):
    with open(os.path.join(SPEC, rel), encoding="utf-8") as f:
        return json.load(f)


def check(name: str, stdout: str) -> dict:
    obj = json.loads(stdout)
    schema = _load(f"json/{name}.schema.json")
    registry = Registry().with_resources([
        ("../header.schema.json", Resource.from_contents(_load("header.schema.json"))),
        ("release-manifest.schema.json", Resource.from_contents(_load("json/release-manifest.schema.json")))])
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
    return obj


@pytest.fixture
def files(tmp_path, pair):
    base, target = pair()
    return tmp_path, base, target


def test_json_outputs(files):
    tmp, base, target = files
    run = CliRunner().invoke
    patch = str(tmp / "p.nnpatch")
    check("diff", run(cli, ["diff", base, target, "-o", patch, "--json"]).stdout)
    check("apply", run(cli, ["apply", base, patch, "-o", str(tmp / "o.safetensors"), "--json"]).stdout)
    rpatch = str(tmp / "r.nnpatch")
    run(cli, ["diff", base, target, "-o", rpatch, "--reversible", "--no-stat"])
    check("revert", run(cli, ["revert", target, rpatch, "-o", str(tmp / "back.safetensors"), "--json"]).stdout)
    check("recover", run(cli, ["recover", str(tmp / "o.safetensors"), "--json"]).stdout)
    check("verify", run(cli, ["verify", patch, "--base", base, "--target", target, "--json"]).stdout)
    check("hash", run(cli, ["hash", "--tensors", base, target, "--json"]).stdout)
    (tmp / "SUMS").write_text(run(cli, ["hash", base]).stdout)
    check("hash-check", run(cli, ["hash", "--check", str(tmp / "SUMS"), "--json"]).stdout)
    check("show", run(cli, ["show", patch, "--json"]).stdout)
    rel = tmp / "dist"
    check("release", run(cli, ["release", base, "--to", target, "-o", str(rel), "--json"]).stdout)
    model = tmp / "model.safetensors"
    model.write_bytes((tmp / "base.safetensors").read_bytes())
    r = run(cli, ["update", str(model), "--manifest", str(rel / "manifest.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert check("update", r.stdout)["updated"] is True
    pytest.importorskip("cryptography")
    check("keygen", run(cli, ["keygen", "-o", str(tmp / "k"), "--json"]).stdout)
    check("sign", run(cli, ["sign", patch, "--key", str(tmp / "k.pem"), "--json"]).stdout)
    check("textconv", run(cli, ["textconv", base, "--json"]).stdout)


def test_every_success_object_says_ok(files):
    """`nnpatch CMD --json | jq -e .ok` holds on success for every command (issue 27, item 3)."""
    tmp, base, target = files
    run = CliRunner().invoke
    patch = str(tmp / "p.nnpatch")
    outputs = [run(cli, ["diff", base, target, "-o", patch, "--json"]),
               run(cli, ["apply", base, patch, "-o", str(tmp / "o.safetensors"), "--json"]),
               run(cli, ["recover", str(tmp / "o.safetensors"), "--json"]),
               run(cli, ["hash", base, "--json"]),
               run(cli, ["show", patch, "--json"]),
               run(cli, ["textconv", patch, "--json"]),
               run(cli, ["release", base, "--to", target, "-o", str(tmp / "dist"), "--json"])]
    for r in outputs:
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["ok"] is True, r.stdout


def test_demo_json(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path), "--json", "--synthetic"])
    check("demo", r.stdout)
