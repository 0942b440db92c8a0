"""`flask backup`: a copy of the embedded default taken while clients replace and delete
images, which a service started on it serves as the store was when the copy began."""

from __future__ import annotations

from datetime import timedelta

import pytest

from image_api import backup
from image_api.repair import repair
from tests.helpers import ImagesClient, make_image


def test_a_backup_taken_while_images_change_serves_them_as_they_were(make_app, tmp_path, clock):
    """The README said: copy the database (`.backup`), then `blobs/`. A replace or delete
    between the two, once its old blob's time was up, deleted a blob the copied database
    names: that image was a 404 in the restored store, and repair then removed it. Now
    deletions wait while `flask backup` copies the blobs."""
    live = make_app({"DATA_DIR": str(tmp_path / "data")})
    client, service = live.test_client(), live.extensions["image_api"]
    images = ImagesClient(client)
    originals = {
        name: make_image("PNG", (20 + i, 20), color=color)
        for i, (name, color) in enumerate(
            [("replaced", "red"), ("deleted", "blue"), ("kept", "teal")]
        )
    }
    made = {name: images.create(data, filename=f"{name}.png") for name, data in originals.items()}
    assert client.get(f"/api/images/{made['kept']['_id']}/download?w=8").status_code == 200

    def meanwhile(key: str) -> None:
        if meanwhile.done:
            return
        meanwhile.done = True
        images.replaced(made["replaced"]["_id"], make_image("PNG", (9, 9), color="black"))
        clock.advance(service.retention + timedelta(seconds=1))  # its old blob is due
        assert client.delete(f"/api/images/{made['deleted']['_id']}").status_code == 200

    meanwhile.done = False
    destination = tmp_path / "copy"
    report = backup.backup(
        service.settings, service.storage, service.repository, destination, copied=meanwhile
    )
    assert meanwhile.done and report.images == 3

    restored = make_app({"DATA_DIR": str(destination)}).test_client()
    for name, data in originals.items():
        url = f"/api/images/{made[name]['_id']}"
        assert restored.get(url).get_json()["sha256"] == made[name]["sha256"], name
        assert restored.get(f"{url}/download").data == data, name
    copied = repair(make_app({"DATA_DIR": str(destination)}).extensions["image_api"], timedelta(0))
    assert not [finding for finding in copied.findings if finding.kind != "orphan_blob"]

    # The live store held its deletions: repair collects what is due now.
    assert not service.storage.held()
    clock.advance(timedelta(hours=1))  # past the blobs' modification times (real ones)
    swept = repair(service, grace=timedelta(0), apply=True)
    assert {finding.kind for finding in swept.findings} == {"orphan_blob"}
    assert len(swept.findings) == 2  # the replaced image's old blob and the deleted one's
    assert client.get(f"/api/images/{made['deleted']['_id']}").status_code == 404


def test_the_backup_command_names_a_new_directory_and_repair_waits_for_it(make_app, tmp_path):
    live = make_app({"DATA_DIR": str(tmp_path / "data")})
    ImagesClient(live.test_client()).create(make_image(), filename="a.png")
    runner = live.test_cli_runner()
    result = runner.invoke(args=["backup", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Copied 1 images (1 blobs, ")
    again = runner.invoke(args=["backup", str(tmp_path / "copy")])
    assert again.exit_code == 1 and "is not an empty directory" in again.output
    service = live.extensions["image_api"]
    with service.storage.deletions_held():
        held = runner.invoke(args=["repair", "--apply"])
        assert held.exit_code == 1 and "a backup is copying the blobs" in held.output
    assert runner.invoke(args=["repair", "--apply"]).exit_code == 0


def test_a_copy_that_paused_longer_than_deletions_are_held_fails(make_app, tmp_path):
    """The hold on deletions goes stale after a minute without news (a backup that died
    must not stop deletions for ever). A copy stopped that long (Ctrl-Z, a paused VM)
    reported success while blobs deleted meanwhile were missing from it."""
    live = make_app({"DATA_DIR": str(tmp_path / "data")})
    images = ImagesClient(live.test_client())
    for _ in range(2):
        images.create(make_image(), filename="a.png")
    service = live.extensions["image_api"]
    now = [1000.0]

    def paused(key: str) -> None:
        now[0] += 61  # as long as the copy was stopped

    with pytest.raises(backup.BackupStalled, match="paused for 61 s"):
        backup.backup(
            service.settings, service.storage, service.repository, tmp_path / "copy",
            copied=paused, monotonic=lambda: now[0],
        )  # fmt: skip
    assert not service.storage.held()


def test_a_refused_copy_leaves_its_destination_as_it_was(make_app, tmp_path):
    """Refused while another backup ran, it left DEST/blobs, and the retry then found DEST
    not empty; an empty DEST every user may write took the keys (found by the second
    outside attack)."""
    live = make_app({"DATA_DIR": str(tmp_path / "data")})
    ImagesClient(live.test_client()).create(make_image(), filename="a.png")
    runner, service = live.test_cli_runner(), live.extensions["image_api"]
    destination = tmp_path / "copy"
    with service.storage.deletions_held():
        busy = runner.invoke(args=["backup", str(destination)])
        assert busy.exit_code == 1 and "Another backup is copying the blobs" in busy.output
    assert list(destination.iterdir()) == []
    assert runner.invoke(args=["backup", str(destination)]).exit_code == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused = runner.invoke(args=["backup", str(shared)])
    assert refused.exit_code == 1 and "may be written by every user" in refused.output
    assert list(shared.iterdir()) == []
