"""The stack's Azurite answers single-blob requests correctly after the rewrite of its lookups
(localstack/azurite/lookup_order.py), on every path the rewrite touched: create and overwrite,
create-if-absent, properties, download, snapshots, staged blocks and their commit, the block
list, and delete. Many other blobs sit in the same container and in another one with the same
blob names, so that a lookup that lost its container or name condition would find the wrong
blob here.

Runs against the running stack's Azurite; the unit side is tests/stack/test_azurite_lookup_order.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobBlock, BlobServiceClient

from tests.conftest import stack_setting

pytestmark = pytest.mark.storage


@pytest.fixture
def service() -> Iterator[BlobServiceClient]:
    client = BlobServiceClient.from_connection_string(
        stack_setting("AZURE_STORAGE_CONNECTION_STRING")
    )
    yield client
    client.close()


@pytest.fixture
def containers(service: BlobServiceClient, unique: str):
    names = [f"lookups-{unique}", f"lookups-other-{unique}"]
    clients = [service.create_container(name) for name in names]
    yield clients
    for name in names:
        service.delete_container(name)


def test_single_blob_requests_find_their_own_blob(containers) -> None:
    mine, other = containers
    for index in range(40):
        mine.upload_blob(f"neighbour-{index}.json", f"neighbour {index}".encode())
        other.upload_blob(f"neighbour-{index}.json", f"other {index}".encode())
    other.upload_blob("album.json", b"the other container's album")

    album = mine.get_blob_client("album.json")
    album.upload_blob(b"first")
    album.upload_blob(b"second, longer", overwrite=True)
    with pytest.raises(ResourceExistsError):
        album.upload_blob(b"never written", overwrite=False)

    assert album.download_blob().readall() == b"second, longer"
    assert album.get_blob_properties().size == len(b"second, longer")
    assert mine.get_blob_client("neighbour-7.json").download_blob().readall() == b"neighbour 7"
    assert other.get_blob_client("album.json").download_blob().readall() == (
        b"the other container's album"
    )

    snapshot = album.create_snapshot()
    album.upload_blob(b"third", overwrite=True)
    frozen = mine.get_blob_client("album.json", snapshot=snapshot["snapshot"])
    assert frozen.download_blob().readall() == b"second, longer"
    assert album.download_blob().readall() == b"third"

    staged = mine.get_blob_client("staged.json")
    staged.stage_block("b1", b"part one, ")
    staged.stage_block("b2", b"part two")
    other.get_blob_client("staged.json").stage_block("b1", b"someone else's block")
    committed, uncommitted = staged.get_block_list("all")
    assert (len(committed), sorted(b.id for b in uncommitted)) == (0, ["b1", "b2"])
    staged.commit_block_list([BlobBlock("b1"), BlobBlock("b2")])
    assert staged.download_blob().readall() == b"part one, part two"
    committed, uncommitted = staged.get_block_list("all")
    assert ([b.id for b in committed], uncommitted) == (["b1", "b2"], [])

    album.delete_blob(delete_snapshots="include")
    with pytest.raises(ResourceNotFoundError):
        album.get_blob_properties()
    assert other.get_blob_client("album.json").get_blob_properties().size == len(
        b"the other container's album"
    )
    assert len(list(mine.list_blobs())) == 41  # 40 neighbours and the staged blob
