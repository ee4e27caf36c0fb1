"""``configs/metadata.json`` against the local bundle schema, MONAI's offline check and the model's layout.

``configs/meta_schema.json`` is a local JSON Schema written from the MONAI Bundle specification's
required keys (the official ``meta_schema_20240725.json`` cannot be downloaded here).
``monai.bundle.verify_metadata`` uses an existing file at ``filepath`` without downloading when no
hash is given (``monai.apps.utils.download_url`` returns early when the file exists and
``check_hash`` passes with ``hash_val=None``); the test below also blocks the network to prove it.
"""

import copy
import json
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.networks.deploy import describe_layout

REPO = Path(__file__).resolve().parents[1]
META = REPO / "configs" / "metadata.json"
SCHEMA = REPO / "configs" / "meta_schema.json"
TRAIN = REPO / "configs" / "train.yaml"


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads(META.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


def _validate(instance: dict, schema: dict) -> None:
    jsonschema.validate(instance=instance, schema=schema, cls=jsonschema.Draft7Validator)


def test_schema_is_valid_draft7_and_local(schema):
    jsonschema.Draft7Validator.check_schema(schema)
    refs = [v for v in _walk(schema, "$ref")]
    assert refs and all(r.startswith("#/") for r in refs), "the local schema must not point anywhere else"


def _walk(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_metadata_validates_against_local_schema(meta, schema):
    _validate(meta, schema)
    # not expressible in JSON Schema: the changelog has an entry for the current version
    assert meta["version"] in meta["changelog"]


def test_metadata_json_formatting():
    text = META.read_text()
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("key", ["version", "monai_version", "network_data_format", "copyright"])
def test_missing_required_key_fails(meta, schema, key):
    broken = copy.deepcopy(meta)
    del broken[key]
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, schema)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.__setitem__("version", "0.1"),
        lambda m: m.__setitem__("changelog", {"v0.1.0": "x"}),
        lambda m: m["network_data_format"]["outputs"]["pred"].pop("channel_def"),
        lambda m: m["network_data_format"]["inputs"]["image"].pop("modality"),
        lambda m: m["network_data_format"]["outputs"]["pred"].__setitem__("num_channels", "12"),
        lambda m: m["network_data_format"]["outputs"]["pred"].__setitem__("is_patch_data", "no"),
    ],
    ids=["version-not-semver", "changelog-key", "no-channel-def", "input-no-modality", "num-channels-str", "patch-str"],
)
def test_invalid_values_fail(meta, schema, mutate):
    broken = copy.deepcopy(meta)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, schema)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or MONAI download raises."""

    def _blocked(*args, **kwargs):
        raise OSError("network access attempted in offline test")

    import monai.apps.utils

    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", _blocked)


def test_monai_verify_metadata_offline(no_network):
    from monai.bundle import verify_metadata

    before = SCHEMA.read_bytes()
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))
    assert SCHEMA.read_bytes() == before  # used as is, not replaced by a download


def test_monai_verify_metadata_rejects_missing_version(no_network, meta, tmp_path):
    from monai.bundle import verify_metadata

    broken = copy.deepcopy(meta)
    del broken["version"]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="version"):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA))


def test_pred_matches_deploy_layout(meta):
    layout = describe_layout(load_catalog("synthetic_ct"))
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == layout["num_rows"]
    assert pred["spatial_shape"] == [layout["K"]]
    assert pred["channel_def"] == layout["channel_def"]
    assert pred["channel_def"][str(layout["num_rows"] - 1)] == "study"
    assert pred["columns"] == layout["columns"]
    assert pred["pad_value"] == layout["pad_value"]
    assert pred["box_mode"] == layout["box_mode"]
    assert pred["layout_version"] == layout["version"]
    assert pred["dtype"] == "float32" and pred["is_patch_data"] is False
    assert pred["value_range"] == [-1, 1] and layout["pad_value"] == -1


def test_input_matches_train_config(meta):
    train = yaml.safe_load(TRAIN.read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == list(train["roi_size"])
    assert image["modality"].lower() == str(train["modality"]).lower()


def test_top_level_metadata_is_symlink():
    top = REPO / "metadata.json"
    assert top.is_symlink()
    assert top.resolve() == META.resolve()


def test_every_copy_of_the_version_is_the_packages(meta):
    # the version is written by hand in four files; a release that bumps some of them ships two versions
    import tomllib

    from anatomy_vlp_bundle import __version__

    app = yaml.safe_load((REPO / "anatomy_vlp_bundle" / "apps" / "deploy" / "app.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"metadata.json": meta["version"], "app.yaml": str(app["application"]["version"]), "pyproject.toml": project["version"]} == {
        k: __version__ for k in ("metadata.json", "app.yaml", "pyproject.toml")
    }
