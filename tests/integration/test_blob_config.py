"""cases.md #36: ``UseDevelopmentStorage=true`` fails when the resource is set up, with a
clear error naming the fix; the explicit Azurite string works."""

from __future__ import annotations

import pytest
from dagster import DagsterResourceFunctionError, build_resources

from snapmap_pipeline.resources.blob import BlobConfigError, BlobStorageResource

pytestmark = pytest.mark.storage


@pytest.mark.parametrize("value", ["UseDevelopmentStorage=true", " UseDevelopmentStorage=true; "])
def test_the_development_shortcut_fails_at_set_up_with_the_fix_named(value):
    with pytest.raises(DagsterResourceFunctionError) as raised:
        with build_resources({"blob": BlobStorageResource(connection_string=value)}):
            pass
    cause = raised.value.__cause__
    assert isinstance(cause, BlobConfigError)
    assert "explicit Azurite string" in str(cause)


def test_the_explicit_azurite_string_sets_up_and_reaches_the_emulator(blob):
    with build_resources({"blob": blob}) as resources:
        with resources.blob.service() as client:
            resources.blob.ensure_container(client)
            assert client.get_container_client(blob.manifest_container).exists()
            client.delete_container(blob.manifest_container)
